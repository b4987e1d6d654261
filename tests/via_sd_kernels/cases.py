"""Random ragged batches and the invariants every verification result must satisfy.

Shared by the torch tests and the Triton-interpreter tests, so both backends are held to the same
contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from via_sd_kernels.gate import GateOutput
from via_sd_kernels.metadata import SpecMetadata
from via_sd_kernels.sampling import logits_to_probs
from via_sd_kernels.verify import VerifyOutput


@dataclass
class Batch:
    meta: SpecMetadata
    slim_probs: torch.Tensor  # [T+B, V] q' at temperature 1 (the gate's input)
    slim_scaled: torch.Tensor  # [T+B, V] q' after the request's temperature (one-hot if greedy)
    full_probs: torch.Tensor  # [T+B, V]
    draft_probs: torch.Tensor | None  # [T, V]
    uniforms: torch.Tensor  # [T]
    noise: torch.Tensor  # [T+B, V]
    accept: torch.Tensor  # [B]
    escalate: torch.Tensor  # [B]
    bonus_conf: torch.Tensor  # [B]
    greedy_seq: torch.Tensor  # [B] bool

    @property
    def vocab(self) -> int:
        return self.full_probs.shape[1]


def random_batch(
    seed: int,
    batch: int,
    gamma: int,
    vocab: int,
    *,
    with_draft_probs: bool = True,
    greedy_fraction: float = 0.3,
    agree: float = 3.0,
) -> Batch:
    """A batch where drafts often (not always) agree with the verifiers, so every tier, accept
    and reject path occurs; some sequences are greedy (one-hot scaled rows), thresholds vary per
    sequence and sometimes exceed 1 (binary-style sequences, bonus always from the full model)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, gamma + 1, (batch,), generator=g)
    n[torch.randint(0, batch, (1,), generator=g)] = gamma  # γmax is reached
    t = int(n.sum())
    draft_logits = torch.randn(t, vocab, generator=g) * 2
    draft_probs = draft_logits.softmax(-1)
    drafts = torch.multinomial(draft_probs, 1, generator=g).squeeze(1) if t else torch.zeros(0, dtype=torch.long)
    meta = SpecMetadata.from_tensors(drafts, n, gamma)

    def verifier_logits() -> torch.Tensor:
        logits = torch.randn(t + batch, vocab, generator=g) * 2
        bump = torch.rand(t, generator=g) < 0.6  # make the draft the favourite at some positions
        logits[meta.token_rows, drafts] += bump.float() * agree
        return logits

    slim_logits, full_logits = verifier_logits(), verifier_logits()
    greedy_seq = torch.rand(batch, generator=g) < greedy_fraction
    temp_seq = torch.where(greedy_seq, 0.0, 0.5 + torch.rand(batch, generator=g))
    rows_seq = torch.repeat_interleave(torch.arange(batch), n + 1)
    temp_rows = temp_seq[rows_seq]
    accept = 0.5 + 0.5 * torch.rand(batch, generator=g)
    escalate = accept * torch.rand(batch, generator=g)
    escalate[torch.rand(batch, generator=g) < 0.2] = 1.5
    bonus_conf = torch.rand(batch, generator=g)
    bonus_conf[torch.rand(batch, generator=g) < 0.2] = 1.5
    return Batch(
        meta=meta,
        slim_probs=slim_logits.softmax(-1),
        slim_scaled=logits_to_probs(slim_logits, temp_rows),
        full_probs=logits_to_probs(full_logits, temp_rows),
        draft_probs=draft_probs if with_draft_probs else None,
        uniforms=torch.rand(t, generator=g),
        noise=torch.empty(t + batch, vocab).exponential_(generator=g),
        accept=accept,
        escalate=escalate,
        bonus_conf=bonus_conf,
        greedy_seq=greedy_seq,
    )


def gate_by_loops(b: Batch) -> GateOutput:
    """The gate written as the plain per-token loop it is defined as (an independent check)."""
    meta = b.meta
    cu, n = meta.cu_num_draft_tokens.tolist(), meta.num_draft_tokens.tolist()
    drafts = meta.draft_token_ids.tolist()
    tiers = [-1] * meta.num_tokens
    stops, stop_tiers, needs_full, bonus_slim = [], [], [], []
    for i in range(meta.batch_size):
        row0 = cu[i] + i
        stop, stop_tier = n[i], 0
        for j in range(n[i]):
            row = b.slim_probs[row0 + j]
            m, qd = row.max(), row[drafts[cu[i] + j]]
            # same float32 products as the kernels; m == 0 is tier C; C is tested first
            if not (m > 0 and qd >= b.escalate[i] * m):
                tier = 2
            elif qd >= b.accept[i] * m:
                tier = 0
            else:
                tier = 1
            tiers[cu[i] + j] = tier
            if tier != 0:
                stop, stop_tier = j, tier
                break
        all_a = stop == n[i]
        slim_bonus = bool(all_a and b.slim_probs[row0 + n[i]].max() >= b.bonus_conf[i])
        stops.append(stop)
        stop_tiers.append(stop_tier)
        bonus_slim.append(slim_bonus)
        needs_full.append(stop_tier == 2 or (all_a and not slim_bonus))
    return GateOutput(
        tiers=torch.tensor(tiers, dtype=torch.int8),
        stop=torch.tensor(stops, dtype=torch.int64),
        stop_tier=torch.tensor(stop_tiers, dtype=torch.int8),
        needs_full=torch.tensor(needs_full, dtype=torch.bool),
        bonus_from_slim=torch.tensor(bonus_slim, dtype=torch.bool),
    )


def assert_same_gate(a: GateOutput, b: GateOutput) -> None:
    for name in ("tiers", "stop", "stop_tier", "needs_full", "bonus_from_slim"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), f"{name}: {x} != {y}"


def assert_same_output(a: VerifyOutput, b: VerifyOutput) -> None:
    assert torch.equal(a.output_token_ids, b.output_token_ids), (a.output_token_ids, b.output_token_ids)
    assert torch.equal(a.num_output, b.num_output)
    assert a.tiers.dtype == b.tiers.dtype and torch.equal(a.tiers, b.tiers), (a.tiers, b.tiers)
    assert torch.equal(a.counts.table(), b.counts.table())


def check_invariants(meta: SpecMetadata, out: VerifyOutput, vocab: int, gate_out: GateOutput | None = None) -> None:
    """Shapes, padding, vocabulary range, kept drafts, and counts that add up."""
    b, w = meta.batch_size, meta.max_num_draft_tokens + 1
    assert out.output_token_ids.shape == (b, w) and out.output_token_ids.dtype == torch.int64
    assert out.num_output.shape == (b,) and out.tiers.shape == (meta.num_tokens,)
    assert out.tiers.dtype == torch.int8
    c = out.counts
    n = meta.num_draft_tokens
    assert torch.equal(c.draft_tokens, n)
    assert bool((out.num_output >= 1).all()) and bool((out.num_output <= n + 1).all())
    assert torch.equal(c.accepted + c.slim_regenerated + c.full_emitted, out.num_output)
    assert bool(((c.slim_regenerated + c.full_emitted) <= 1).all())
    cols = torch.arange(w)
    emitted = cols[None, :] < out.num_output[:, None]
    toks = out.output_token_ids
    assert bool((toks[emitted] >= 0).all()) and bool((toks[emitted] < vocab).all())
    assert bool((toks[~emitted] == -1).all())
    undecided = torch.zeros(b, dtype=torch.int64).index_add_(0, meta.token_seq_ids, (out.tiers == -1).long())
    for tier, count in ((0, c.tier_accept), (1, c.tier_slim), (2, c.tier_full)):
        per_seq = torch.zeros(b, dtype=torch.int64).index_add_(0, meta.token_seq_ids, (out.tiers == tier).long())
        assert torch.equal(per_seq, count), (tier, per_seq, count)
    assert torch.equal(c.tier_accept + c.tier_slim + c.tier_full + undecided, n)
    # kept drafts are a prefix of the draft, and every decided position comes before undecided ones
    cu = meta.cu_num_draft_tokens.tolist()
    for i in range(b):
        k = int(c.accepted[i])
        assert toks[i, :k].tolist() == meta.draft_token_ids[cu[i] : cu[i] + k].tolist()
        tiers_i = out.tiers[cu[i] : cu[i + 1]].tolist()
        decided = [x != -1 for x in tiers_i]
        assert decided == sorted(decided, reverse=True), tiers_i
    if gate_out is not None:
        assert torch.equal(c.tier_accept, gate_out.stop)
        no_full = ~gate_out.needs_full
        assert bool((c.full_emitted[no_full] == 0).all()) and bool((c.tier_full[no_full] == 0).all())
        assert bool((c.slim_regenerated[gate_out.needs_full] == 0).all())
