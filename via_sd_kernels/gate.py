"""The VIA-SD gate: route every draft token to tier A (accept), B (slim) or C (full).

Terms
-----
q'      the slim verifier's distribution at temperature 1 (`slim_probs`, one row per draft
        position plus the bonus row, laid out as in `SpecMetadata`).
ratio   r = q'(d) / max q' for the draft token d at its position. The gate compares without
        dividing, `q'(d) >= θ * max q'`, so the torch reference and the kernels decide bit for bit
        alike; a row with max q' = 0 (a slim pass that did not run) is always tier C.
tier A  r >= accept_threshold: the draft token is kept; the scan continues.
tier B  escalate_threshold <= r < accept_threshold: the slim verifier regenerates this position,
        the block ends here.
tier C  r < escalate_threshold: the full model verifies from here, the block ends for the gate.
stop    the index of the first non-A position, or n_i when every draft is tier A.
bonus   when all n_i drafts are tier A, position n_i (the bonus) comes from the slim verifier if
        max q'_bonus >= bonus_confidence, else from the full model.

Positions after `stop` are not decided by the gate (tier -1); when the stop is tier C the full
model decides some of them later and `verify_three_tier` marks those tier 2.

Tier C is decided first (r < escalate_threshold), then A (r >= accept_threshold), else B; with
the usual escalate <= accept this is the table above. Per-sequence thresholds let modes share a
batch: escalate_threshold > 1 makes every draft tier C whatever accept_threshold is (`binary`
sequences), bonus_confidence > 1 sends the bonus to the full model.

Worked example (θ_accept = 0.7, θ_escalate = 0.5, bonus_confidence = 0.9), one sequence with
drafts d = [3, 1, 2] over a 4-token vocabulary:

    row 0: q' = [0.10, 0.05, 0.05, 0.80]   d=3: r = 0.80/0.80 = 1.00  -> A
    row 1: q' = [0.30, 0.45, 0.15, 0.10]   d=1: r = 0.45/0.45 = 1.00  -> A
    row 2: q' = [0.50, 0.10, 0.30, 0.10]   d=2: r = 0.30/0.50 = 0.60  -> B (stop = 2)
    row 3: (bonus, not read because the scan stopped)

    tiers = [0, 0, 1], stop = 2, stop_tier = 1, needs_full = False, bonus_from_slim = False.

Had row 2 been [0.50, 0.10, 0.20, 0.20] (r = 0.40), position 2 would be tier C and needs_full =
True. Had all three been A and max q'_3 = 0.95 >= 0.9, bonus_from_slim = True, needs_full = False.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._backend import resolve_backend
from .metadata import SpecMetadata

TIER_ACCEPT = 0
TIER_SLIM = 1
TIER_FULL = 2
TIER_UNDECIDED = -1


@dataclass(frozen=True)
class GateOutput:
    tiers: torch.Tensor  # [T] int8: 0 = A, 1 = B, 2 = C, -1 = after the stop
    stop: torch.Tensor  # [B] int64: first non-A position, n_i when all A
    stop_tier: torch.Tensor  # [B] int8: tier at `stop` (1 or 2), 0 when all drafts are A
    needs_full: torch.Tensor  # [B] bool: the full model must run for this sequence
    bonus_from_slim: torch.Tensor  # [B] bool: all A and the slim verifier emits the bonus


def gate(
    slim_probs: torch.Tensor,  # [T+B, V] q' at temperature 1
    meta: SpecMetadata,
    accept_threshold: torch.Tensor,  # [B] float
    escalate_threshold: torch.Tensor,  # [B] float
    bonus_confidence: torch.Tensor,  # [B] float
    *,
    backend: str = "auto",
) -> GateOutput:
    """Route each draft token to a tier (see the module docstring). backend: "auto" | "torch" |
    "triton"; auto picks the Triton kernel on CUDA."""
    _check(slim_probs, meta, accept_threshold, escalate_threshold, bonus_confidence)
    if resolve_backend(backend, slim_probs.device) == "triton":
        from .triton.gate import gate_triton

        return gate_triton(slim_probs, meta, accept_threshold, escalate_threshold, bonus_confidence)
    return gate_torch(slim_probs, meta, accept_threshold, escalate_threshold, bonus_confidence)


def gate_torch(
    slim_probs: torch.Tensor,  # [T+B, V]
    meta: SpecMetadata,
    accept_threshold: torch.Tensor,  # [B]
    escalate_threshold: torch.Tensor,  # [B]
    bonus_confidence: torch.Tensor,  # [B]
) -> GateOutput:
    """The reference: every row reduced at once, the stop found with a segment minimum."""
    device = slim_probs.device
    n = meta.num_draft_tokens  # [B]
    seq = meta.token_seq_ids  # [T]
    pos = meta.token_positions  # [T]
    row_max = slim_probs.amax(-1).float()  # [T+B]
    m = row_max[meta.token_rows]  # [T]
    qd = slim_probs[meta.token_rows, meta.draft_token_ids].float()  # [T]
    acc = accept_threshold.float()[seq]
    esc = escalate_threshold.float()[seq]
    positive = m > 0
    # tier C is tested first, so escalate > 1 forces C whatever accept is
    escalate_ok = positive & (qd >= esc * m)
    tier = torch.where(
        ~escalate_ok, TIER_FULL, torch.where(qd >= acc * m, TIER_ACCEPT, TIER_SLIM)
    )  # [T] int64

    # stop = min over the sequence of the positions that are not A (n_i if none)
    cand = torch.where(tier != TIER_ACCEPT, pos, n[seq])
    stop = n.clone().scatter_reduce_(0, seq, cand, "amin", include_self=True)  # [B]
    stop_t = stop[seq]
    at_stop = pos == stop_t
    tiers = torch.where(pos < stop_t, TIER_ACCEPT, torch.where(at_stop, tier, TIER_UNDECIDED)).to(torch.int8)
    stop_tier = torch.zeros_like(n).scatter_reduce_(0, seq, torch.where(at_stop, tier, 0), "amax")

    all_a = stop == n
    bonus_from_slim = all_a & (row_max[meta.bonus_rows] >= bonus_confidence.float().to(device))
    needs_full = (stop_tier == TIER_FULL) | (all_a & ~bonus_from_slim)
    return GateOutput(
        tiers=tiers,
        stop=stop,
        stop_tier=stop_tier.to(torch.int8),
        needs_full=needs_full,
        bonus_from_slim=bonus_from_slim,
    )


def _check(slim_probs, meta, *per_seq) -> None:
    if slim_probs.dim() != 2 or slim_probs.shape[0] != meta.num_rows:
        raise ValueError(f"slim_probs must be [T+B, V] = [{meta.num_rows}, V], got {tuple(slim_probs.shape)}")
    for t in per_seq:
        if t.shape != (meta.batch_size,):
            raise ValueError(f"per-sequence thresholds must be [B] = [{meta.batch_size}], got {tuple(t.shape)}")
