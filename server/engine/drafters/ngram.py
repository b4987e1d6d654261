"""Prompt lookup (n-gram) drafting: find the latest earlier occurrence of the context's last
n tokens (n from `n_max` down to `n_min`) in prompt and output, and propose what followed it.

Model-free and deterministic (p is one-hot). Proposes nothing when there is no match, and fewer
tokens than asked when the match is near the end of the context.
"""

from __future__ import annotations

import torch

from server.engine.drafters.base import DraftBatch, Drafter


def ngram_lookup(ids: torch.Tensor, n_min: int, n_max: int, k: int) -> list[int]:
    """`ids [L]` int64. The continuation (up to k tokens) of the most recent earlier match of
    the longest suffix n-gram, n in [n_min, n_max]; [] when none matches."""
    L = ids.shape[0]
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = ids[L - n:]
        windows = ids[: L - 1].unfold(0, n, 1)  # [L - n, n], windows that end before the last token
        hits = (windows == suffix).all(-1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return ids[start : start + k].tolist()
    return []


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, n_min: int = 1, n_max: int = 4):
        if not (1 <= n_min <= n_max):
            raise ValueError("ngram sizes need 1 <= n_min <= n_max")
        self.n_min, self.n_max = n_min, n_max

    def propose(self, seqs, max_tokens: list[int]) -> DraftBatch:
        out = []
        for seq, k in zip(seqs, max_tokens):
            if k <= 0:
                out.append([])
                continue
            ids = torch.tensor(seq.token_ids, dtype=torch.int64)
            out.append(ngram_lookup(ids, self.n_min, self.n_max, k))
        return DraftBatch(out)
