"""Ragged speculative-decoding batches as flat tensors plus one metadata dataclass.

A batch holds B sequences; sequence i proposed n_i draft tokens (0 <= n_i <= γ). All draft tokens
are laid out flat, sequence after sequence, in `draft_token_ids [T]` with T = Σ n_i, and
`cu_num_draft_tokens [B+1]` marks where each sequence's drafts start (vLLM's SpecDecodeMetadata
does the same).

Verifiers produce one distribution row per draft position plus one for the bonus position, so
sequence i owns n_i + 1 rows of every `[T+B, V]` probability tensor, again flat:

    cu_num_rows = cu_num_draft_tokens + arange(B+1)

Example, drafts [[5, 7], [], [9]]:

    draft_token_ids      = [5, 7, 9]
    cu_num_draft_tokens  = [0, 2, 2, 3]
    cu_num_rows          = [0, 3, 4, 6]      rows: seq0 -> 0,1,2 (2 = bonus); seq1 -> 3 (bonus);
                                                   seq2 -> 4, 5 (5 = bonus)
    token_seq_ids        = [0, 0, 2]
    token_positions      = [0, 1, 0]
    token_rows           = [0, 1, 4]         the row that verifies each draft token
    bonus_rows           = [2, 3, 5]

Every derived tensor is computed once, at construction, without a host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpecMetadata:
    draft_token_ids: torch.Tensor  # [T] int64
    num_draft_tokens: torch.Tensor  # [B] int64, n_i
    cu_num_draft_tokens: torch.Tensor  # [B+1] int64, cu[0] = 0, cu[B] = T
    cu_num_rows: torch.Tensor  # [B+1] int64, cu_num_draft_tokens + arange(B+1)
    token_seq_ids: torch.Tensor  # [T] int64, the sequence of each draft token
    token_positions: torch.Tensor  # [T] int64, j in 0..n_i-1 within its sequence
    token_rows: torch.Tensor  # [T] int64, row of the distribution that verifies each draft token
    bonus_rows: torch.Tensor  # [B] int64, row of each sequence's bonus position
    max_num_draft_tokens: int  # γmax: the widest sequence may have this many drafts (host int)

    @property
    def batch_size(self) -> int:
        return self.num_draft_tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        """T, the number of draft tokens in the batch."""
        return self.draft_token_ids.shape[0]

    @property
    def num_rows(self) -> int:
        """T + B, the number of distribution rows the verifiers produce."""
        return self.num_tokens + self.batch_size

    @property
    def device(self) -> torch.device:
        return self.draft_token_ids.device

    @classmethod
    def from_tensors(
        cls,
        draft_token_ids: torch.Tensor,  # [T] int
        num_draft_tokens: torch.Tensor,  # [B] int
        max_num_draft_tokens: int | None = None,
    ) -> "SpecMetadata":
        """Build from the flat drafts and per-sequence counts (on any device).

        `max_num_draft_tokens` should be given (the engine knows γ); when None it is read from
        the tensor, which costs a host sync on CUDA.
        """
        device = draft_token_ids.device
        draft = draft_token_ids.to(torch.int64)
        n = num_draft_tokens.to(device=device, dtype=torch.int64)
        b = n.shape[0]
        t = draft.shape[0]
        zero = torch.zeros(1, dtype=torch.int64, device=device)
        cu = torch.cat([zero, n.cumsum(0)])  # [B+1]
        seq_arange = torch.arange(b, dtype=torch.int64, device=device)
        cu_rows = cu + torch.arange(b + 1, dtype=torch.int64, device=device)
        # output_size avoids the host sync repeat_interleave would otherwise need on CUDA
        token_seq = torch.repeat_interleave(seq_arange, n, output_size=t)  # [T]
        token_idx = torch.arange(t, dtype=torch.int64, device=device)
        token_pos = token_idx - cu[token_seq]
        token_rows = token_idx + token_seq
        bonus_rows = cu[1:] + seq_arange
        if max_num_draft_tokens is None:
            max_num_draft_tokens = int(n.max().item()) if b else 0
        return cls(
            draft_token_ids=draft,
            num_draft_tokens=n,
            cu_num_draft_tokens=cu,
            cu_num_rows=cu_rows,
            token_seq_ids=token_seq,
            token_positions=token_pos,
            token_rows=token_rows,
            bonus_rows=bonus_rows,
            max_num_draft_tokens=int(max_num_draft_tokens),
        )

    @classmethod
    def from_lists(cls, draft_token_ids: list[list[int]], device: torch.device | str | None = None) -> "SpecMetadata":
        """Build from one list of draft token ids per sequence (lists may be empty)."""
        flat = [tok for seq in draft_token_ids for tok in seq]
        counts = [len(seq) for seq in draft_token_ids]
        return cls.from_tensors(
            torch.tensor(flat, dtype=torch.int64, device=device),
            torch.tensor(counts, dtype=torch.int64, device=device),
            max(counts, default=0),
        )
