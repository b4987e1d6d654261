"""Verification: binary (lossless SD) and three-tier (VIA-SD), batched over ragged sequences.

Terms (per sequence, n draft tokens d_0..d_{n-1}, distribution rows 0..n as in `SpecMetadata`)
--------------------------------------------------------------------------------------------
p          the drafter's distribution (`draft_probs [T, V]`); None means a deterministic drafter
           (n-gram, greedy draft), i.e. p = one-hot(d).
q          the full model's distribution after the request's sampling parameters.
q'         the slim verifier's distribution after the request's sampling parameters
           (`slim_probs_scaled`; the gate uses the temperature-1 q' instead).
accepted   a draft token kept in the output: tier A, or a verifier's test kept it. A test against
           a target t keeps d w.p. min(1, t(d)/p(d)); as a comparison, `u * p(d) < t(d)` with the
           position's uniform u in [0, 1) (a token with t(d) = 0 is never kept).
recovered  the token a verifier emits in place of the first rejected draft: a sample of the
           residual norm(max(0, t - p)) (of t itself if the residual has no mass). "Regenerated"
           when the slim verifier emits it (tier B).
bonus      the token after the last draft when every draft was accepted, sampled from the
           verifier's row n (q, or q' when the gate let the slim verifier emit it).

Every emitted token is exactly one of: an accepted draft, a recovered/regenerated token, or a
bonus; so `accepted + slim_regenerated + full_emitted == num_output` for every sequence.

Greedy decoding needs no separate path: a one-hot target row (as `logits_to_probs` makes for
temperature 0) turns the rule above into "keep d iff d == argmax t, else emit argmax t" whatever
the randoms. Passing `uniforms=None, noise=None` treats *every* row greedily by argmax (the same
result on one-hot rows, and no noise to draw).

Randomness is explicit so a request's seed reproduces its output whatever shares the batch: the
caller draws `uniforms [T]` (one per draft position) and `noise [T+B, V]` (Exp(1), one row per
distribution row) from each request's generator; sampling a row t uses the exponential race
argmax(t / noise) (see `sampling.py`), which needs no normalisation. The embedded engine draws
them per token position instead and, for deterministic drafts, couples them to each row's own
sample (`sampling.winning_noise`), so that every emitted token is that sample.

Worked example (binary, sampling, V = 3), one sequence, drafts d = [2, 0], p = one-hot:

    row 0: q = [0.2, 0.2, 0.6]   u_0 = 0.50: 0.50 * 1 < q(2) = 0.6   -> accept d_0 = 2
    row 1: q = [0.1, 0.7, 0.2]   u_1 = 0.30: 0.30 * 1 < q(0) = 0.1 ? no -> reject d_1 = 0
           residual max(0, q - one-hot(0)) = [0, 0.7, 0.2]; noise row 1 = [1.0, 2.0, 0.1]:
           argmax([0/1.0, 0.7/2.0, 0.2/0.1]) = 2          -> recovered token 2
    output_token_ids = [2, 2, -1], num_output = 2, tiers = [2, 2],
    accepted = 1, full_emitted = 1, tier_full = 2.

Three-tier adds the gate's decisions (`gate.py`). Positions before the gate's stop are tier A and
kept. At the stop: tier B tests d against q' (kept w.p. min(1, q'(d)/p(d)), else regenerated from
the residual of q'), and the block ends there with no bonus; tier C runs the binary rule above
against q from the stop to the end of the draft plus the bonus from q, and each position the full
model decided becomes tier 2. When all drafts are A, the bonus comes from q' if
`bonus_from_slim`, else from q. Same example at temperature 1 with the gate (θ_accept = 0.7,
θ_escalate = 0.5) saying tiers = [0, 1]: d_0 = 2 is kept (tier A); q'_1 = [0.30, 0.45, 0.25] gives
d_1 = 0 the ratio 0.30/0.45 = 0.67, tier B; its test 0.30 * 1 < q'(0) = 0.30 fails, so the slim
verifier regenerates from the residual [0, 0.45, 0.25]: argmax([0/1.0, 0.45/2.0, 0.25/0.1]) = 2.
output_token_ids = [2, 2, -1], accepted = 1, slim_regenerated = 1, tier_accept = 1,
tier_slim = 1, tier_full = 0, and the full model never ran.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from . import cpu as cpu_kernels
from ._backend import resolve_backend
from .gate import TIER_FULL, TIER_UNDECIDED, GateOutput
from .metadata import SpecMetadata

# What a sequence does at its stop (the `kind` passed to the core): the bonus after all-A drafts,
# a tier-B test against q', or a binary verification against q from the stop.
KIND_BONUS = 0
KIND_SLIM = 1
KIND_FULL = 2


@dataclass(frozen=True)
class VerifyCounts:
    """Per-sequence counts ([B] int64 each), for attributing decisions to requests.

    draft_tokens      n_i
    accepted          draft tokens kept in the output (any tier)
    tier_accept       draft positions the gate passed as tier A
    tier_slim         draft positions decided by the slim verifier (tier B; 0 or 1)
    tier_full         draft positions decided by the full model (tier C)
    slim_regenerated  tokens the slim verifier emitted that are not kept drafts: a regenerated
                      tier-B token or the slim bonus
    full_emitted      tokens the full model emitted that are not kept drafts: recovered or bonus

    tier_accept + tier_slim + tier_full <= draft_tokens; the rest were never decided (after a
    stop or after the full model's first rejection).
    """

    draft_tokens: torch.Tensor
    accepted: torch.Tensor
    tier_accept: torch.Tensor
    tier_slim: torch.Tensor
    tier_full: torch.Tensor
    slim_regenerated: torch.Tensor
    full_emitted: torch.Tensor

    @classmethod
    def from_table(cls, table: torch.Tensor) -> "VerifyCounts":  # table [7, B]
        return cls(*table.unbind(0))

    def table(self) -> torch.Tensor:  # [7, B] int64
        return torch.stack([getattr(self, f.name) for f in fields(self)])


@dataclass(frozen=True)
class VerifyOutput:
    output_token_ids: torch.Tensor  # [B, γmax+1] int64, padded with -1
    num_output: torch.Tensor  # [B] int64, tokens emitted (>= 1 per sequence)
    tiers: torch.Tensor  # [T] int8: 0 A, 1 B, 2 C, -1 never decided
    counts: VerifyCounts

    def cpu(self) -> "VerifyOutput":
        """Everything on the host with one device-to-host copy (the step's one sync)."""
        b, w = self.output_token_ids.shape
        t = self.tiers.shape[0]
        packed = torch.cat(
            [self.output_token_ids.reshape(-1), self.num_output, self.tiers.long(), self.counts.table().reshape(-1)]
        ).cpu()
        tok, num, tiers, table = packed.split([b * w, b, t, 7 * b])
        return VerifyOutput(tok.view(b, w), num, tiers.to(torch.int8), VerifyCounts.from_table(table.view(7, b)))


def verify_binary(
    meta: SpecMetadata,
    target_probs: torch.Tensor,  # [T+B, V] q
    draft_probs: torch.Tensor | None,  # [T, V] p, or None for a deterministic drafter
    uniforms: torch.Tensor | None,  # [T] in [0, 1), None = greedy
    noise: torch.Tensor | None,  # [T+B, V] Exp(1), None = greedy
    *,
    backend: str = "auto",
) -> VerifyOutput:
    """Lossless speculative decoding (Leviathan et al.): the output follows q exactly."""
    _check_inputs(meta, target_probs, draft_probs, uniforms, noise)
    b = meta.batch_size
    device = target_probs.device
    stop = torch.zeros(b, dtype=torch.int64, device=device)
    kind = torch.full((b,), KIND_FULL, dtype=torch.int64, device=device)
    bonus_from_slim = torch.zeros(b, dtype=torch.bool, device=device)
    base_tiers = torch.full((meta.num_tokens,), TIER_UNDECIDED, dtype=torch.int8, device=device)
    return _verify(
        meta, stop, kind, bonus_from_slim, base_tiers, target_probs, target_probs, draft_probs, uniforms, noise, backend
    )


def verify_binary_greedy_host(drafts: list[list[int]], target_argmax: list[int]) -> list[tuple[list[int], dict[str, int]]]:
    """`verify_binary` for greedy rows and deterministic drafts, on the host: keep d_j while it is
    the argmax of row j, then emit that row's argmax. `target_argmax` holds every row's argmax,
    sequence by sequence (n_i + 1 rows each, as `SpecMetadata` lays them out). Per sequence, the
    emitted tokens and the counts `verify_binary` gives (`VerifyCounts`' fields but full_emitted,
    which is always 1 here). The same decisions as the tensor path on the same argmaxes, without
    its thirty small tensor ops: the decode step's verification at batch 1 (tested against
    `verify_binary`)."""
    out = []
    row = 0
    for d in drafts:
        n = len(d)
        k = 0
        while k < n and d[k] == target_argmax[row + k]:
            k += 1
        counts = {"draft_tokens": n, "accepted": k, "tier_accept": 0, "tier_slim": 0,
                  "tier_full": min(k + 1, n), "slim_regenerated": 0}
        out.append((d[:k] + [target_argmax[row + k]], counts))
        row += n + 1
    if row != len(target_argmax):
        raise ValueError(f"target_argmax has {len(target_argmax)} rows, the drafts need {row}")
    return out


def verify_three_tier(
    meta: SpecMetadata,
    gate_out: GateOutput,
    slim_probs_scaled: torch.Tensor,  # [T+B, V] q' after temperature / top-k / top-p
    full_probs: torch.Tensor,  # [T+B, V] q; rows of sequences without needs_full are not read
    draft_probs: torch.Tensor | None,  # [T, V] p, or None
    uniforms: torch.Tensor | None,  # [T], None = greedy
    noise: torch.Tensor | None,  # [T+B, V], None = greedy
    *,
    backend: str = "auto",
) -> VerifyOutput:
    """VIA-SD verification after the gate (see the module docstring). Lossy by design in tiers A
    and B; with every draft gated tier C (escalate_threshold > 1) and the bonus sent to the full
    model (bonus_confidence > 1) it is exactly `verify_binary` under the same randoms."""
    _check_inputs(meta, full_probs, draft_probs, uniforms, noise)
    if slim_probs_scaled.shape != full_probs.shape:
        raise ValueError(
            f"slim_probs_scaled {tuple(slim_probs_scaled.shape)} and full_probs {tuple(full_probs.shape)} must match"
        )
    return _verify(
        meta,
        gate_out.stop,
        gate_out.stop_tier.long(),  # 0 all-A -> bonus, 1 -> slim, 2 -> full: the KIND_* values
        gate_out.bonus_from_slim,
        gate_out.tiers,
        slim_probs_scaled,
        full_probs,
        draft_probs,
        uniforms,
        noise,
        backend,
    )


def _verify(meta, stop, kind, bonus_from_slim, base_tiers, slim, full, draft_probs, uniforms, noise, backend):
    if resolve_backend(backend, full.device) == "triton":
        from .triton.verify import verify_core_triton

        core = verify_core_triton
    else:
        core = verify_core_torch
    return core(meta, stop, kind, bonus_from_slim, base_tiers, slim, full, draft_probs, uniforms, noise)


def verify_core_torch(
    meta: SpecMetadata,
    stop: torch.Tensor,  # [B] int64, first position that is not tier A
    kind: torch.Tensor,  # [B] int64, KIND_*
    bonus_from_slim: torch.Tensor,  # [B] bool
    base_tiers: torch.Tensor,  # [T] int8, the gate's tiers (all -1 for binary)
    slim: torch.Tensor,  # [T+B, V] q'
    full: torch.Tensor,  # [T+B, V] q
    draft_probs: torch.Tensor | None,  # [T, V]
    uniforms: torch.Tensor | None,  # [T]
    noise: torch.Tensor | None,  # [T+B, V]
) -> VerifyOutput:
    """The reference, vectorised over tokens with segment reductions; no host sync."""
    device = full.device
    b, t = meta.batch_size, meta.num_tokens
    width = meta.max_num_draft_tokens + 1
    n = meta.num_draft_tokens  # [B]
    cu = meta.cu_num_draft_tokens  # [B+1]
    seq, pos, rows, d = meta.token_seq_ids, meta.token_positions, meta.token_rows, meta.draft_token_ids
    greedy = noise is None
    stop_t, kind_t = stop[seq], kind[seq]  # [T]
    slim_scan = kind_t == KIND_SLIM  # tokens tested against q' rather than q

    # 1. the test at every draft position (only those in the scan window matter)
    if greedy:
        slim_am = cpu_kernels.argmax(slim)  # [T+B]; x.argmax(-1), on the calling thread on the CPU
        full_am = slim_am if full is slim else cpu_kernels.argmax(full)  # binary passes q as both
        acc = torch.where(slim_scan, slim_am[rows], full_am[rows]) == d  # [T]
    else:
        target_d = torch.where(slim_scan, slim[rows, d], full[rows, d]).float()  # [T]
        if draft_probs is None:
            p_d = torch.ones_like(target_d)
        else:
            p_d = draft_probs[torch.arange(t, device=device), d].float()
        acc = uniforms.float() * p_d < target_d

    # 2. the scan: kept drafts K = first rejection in [stop, lim), or lim
    lim = torch.where(kind == KIND_FULL, n, torch.where(kind == KIND_SLIM, stop + 1, stop))  # [B]
    lim_t = lim[seq]
    rejected_here = (pos >= stop_t) & (pos < lim_t) & ~acc
    k = lim.clone().scatter_reduce_(0, seq, torch.where(rejected_here, pos, lim_t), "amin", include_self=True)
    has_final = (kind != KIND_SLIM) | (k < lim)  # tier B ends without a new token when d is kept
    from_slim = (kind == KIND_SLIM) | ((kind == KIND_BONUS) & bonus_from_slim)
    final_row = meta.cu_num_rows[:-1] + k  # [B]

    # 3. the token after the kept drafts: recovered / regenerated / bonus
    if greedy:
        final = torch.where(from_slim, slim_am[final_row], full_am[final_row])
    else:
        target = torch.where(from_slim[:, None], slim[final_row], full[final_row]).float()  # [B, V]
        has_p = k < n  # a rejected draft position, not the bonus
        if t == 0:
            p_row = torch.zeros_like(target)
        else:
            tok_idx = (cu[:-1] + k).clamp(max=t - 1)  # [B]
            if draft_probs is None:
                p_row = torch.zeros_like(target).scatter_(1, d[tok_idx][:, None], 1.0)
            else:
                p_row = draft_probs[tok_idx].float()
            p_row = p_row * has_p[:, None]
        residual = (target - p_row).clamp_min(0.0)  # [B, V], unnormalised: the race ignores scale
        nz = noise[final_row].float()
        final = torch.where((residual > 0).any(-1), (residual / nz).argmax(-1), (target / nz).argmax(-1))

    # 4. outputs; a scratch column at `width` absorbs the writes that must not land
    out = torch.full((b, width + 1), -1, dtype=torch.int64, device=device)
    col = torch.where(pos < k[seq], pos, width)
    out.view(-1).scatter_(0, seq * (width + 1) + col, d)
    rows_b = torch.arange(b, device=device)
    out.view(-1).scatter_(0, rows_b * (width + 1) + torch.where(has_final, k, width), final)
    output_token_ids = out[:, :width].contiguous()
    num_output = k + has_final.long()

    full_end = torch.minimum(k + 1, n)  # positions the full model decided: [stop, full_end)
    full_decided = (kind_t == KIND_FULL) & (pos >= stop_t) & (pos < full_end[seq])
    tiers = torch.where(full_decided, torch.full_like(base_tiers, TIER_FULL), base_tiers)
    counts = VerifyCounts(
        draft_tokens=n.clone(),
        accepted=k,
        tier_accept=stop.clone(),
        tier_slim=(kind == KIND_SLIM).long(),
        tier_full=torch.where(kind == KIND_FULL, full_end - stop, 0),
        slim_regenerated=(has_final & from_slim).long(),
        full_emitted=(has_final & ~from_slim).long(),
    )
    return VerifyOutput(output_token_ids, num_output, tiers, counts)


def _check_inputs(meta, probs, draft_probs, uniforms, noise) -> None:
    if probs.dim() != 2 or probs.shape[0] != meta.num_rows:
        raise ValueError(f"target probabilities must be [T+B, V] = [{meta.num_rows}, V], got {tuple(probs.shape)}")
    v = probs.shape[1]
    if (uniforms is None) != (noise is None):
        raise ValueError("pass both uniforms and noise (sampling) or neither (greedy)")
    if noise is not None:
        if uniforms.shape != (meta.num_tokens,):
            raise ValueError(f"uniforms must be [T] = [{meta.num_tokens}], got {tuple(uniforms.shape)}")
        if noise.shape != probs.shape:
            raise ValueError(f"noise must be [T+B, V] = {tuple(probs.shape)}, got {tuple(noise.shape)}")
    if draft_probs is not None and draft_probs.shape != (meta.num_tokens, v):
        raise ValueError(f"draft_probs must be [T, V] = [{meta.num_tokens}, {v}], got {tuple(draft_probs.shape)}")
