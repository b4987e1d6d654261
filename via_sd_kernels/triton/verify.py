"""Verification as a Triton kernel: one program per sequence.

The program reads the sequence's stop and kind (what happens at the stop: bonus after all-A
drafts, a tier-B test against q', or binary verification against q), scans the draft positions
from the stop with the acceptance test (sampling: gathers of t(d), p(d) and the uniform; greedy:
one argmax pass over each scanned row), then makes the token after the kept drafts in one pass
over its row: the argmax of residual/noise and, for a residual without mass, of target/noise
(greedy: the row's argmax). Rows of the other verifier, rows past the first rejection and the rows
of sequences that need no full pass are never read. It writes the padded output row, the final
tiers and the seven counts directly; the wrapper only allocates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..metadata import SpecMetadata
from ..verify import VerifyCounts, VerifyOutput
from ._common import block_size, select_row_argmax


@triton.jit
def _verify_kernel(
    slim_ptr,  # [T+B, V] q'
    full_ptr,  # [T+B, V] q
    stride_s,
    stride_f,
    V,
    draft_ptr,  # [T] int64
    cu_ptr,  # [B+1] int64
    p_ptr,  # [T, V] draft probs (HAS_P)
    stride_p,
    u_ptr,  # [T] fp32 (not GREEDY)
    noise_ptr,  # [T+B, V] (not GREEDY)
    stride_n,
    stop_ptr,  # [B] int64
    kind_ptr,  # [B] int64: 0 bonus, 1 slim test at stop, 2 full verification from stop
    bonus_slim_ptr,  # [B] bool as int8
    out_ptr,  # [B, W] int64, prefilled with -1
    W,
    num_ptr,  # [B] int64
    tiers_ptr,  # [T] int8, prefilled with the gate's tiers
    counts_ptr,  # [7, B] int64
    B,
    GREEDY: tl.constexpr,
    HAS_P: tl.constexpr,
    BLOCK: tl.constexpr,
    WBLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    start = tl.load(cu_ptr + i)
    n = tl.load(cu_ptr + i + 1) - start
    row0 = start + i
    stop = tl.load(stop_ptr + i)
    kind = tl.load(kind_ptr + i)
    bonus_slim = tl.load(bonus_slim_ptr + i) != 0
    scan_slim = kind == 1
    scan_full = kind != 1
    lim = tl.where(kind == 2, n, tl.where(kind == 1, stop + 1, stop))

    # scan: keep drafts while the test passes, from the stop up to lim
    j = stop
    go = j < lim
    while go:
        t = start + j
        row = row0 + j
        d = tl.load(draft_ptr + t)
        if GREEDY:
            a = select_row_argmax(slim_ptr, full_ptr, row, stride_s, stride_f, V, scan_slim, scan_full, BLOCK)
            accept = a.to(tl.int64) == d
        else:
            ts = tl.load(slim_ptr + row * stride_s + d, mask=scan_slim, other=0.0).to(tl.float32)
            tf = tl.load(full_ptr + row * stride_f + d, mask=scan_full, other=0.0).to(tl.float32)
            target_d = tl.where(scan_slim, ts, tf)
            if HAS_P:
                p_d = tl.load(p_ptr + t * stride_p + d).to(tl.float32)
            else:
                p_d = 1.0
            accept = tl.load(u_ptr + t) * p_d < target_d
        j = tl.where(accept, j + 1, j)
        go = accept & (j < lim)
    k = j
    has_final = (kind != 1) | (k < lim)
    from_slim = (kind == 1) | ((kind == 0) & bonus_slim)
    from_full = from_slim == 0
    final_row = row0 + k

    # the token after the kept drafts
    if GREEDY:
        final = select_row_argmax(slim_ptr, full_ptr, final_row, stride_s, stride_f, V, from_slim, from_full, BLOCK)
    else:
        has_p = k < n  # a rejected draft position (else the bonus row: residual = target)
        tk = start + k
        dk = tl.load(draft_ptr + tk, mask=has_p, other=-1)
        offs = tl.arange(0, BLOCK)
        best_r = -1.0
        idx_r = 0
        best_q = -1.0
        idx_q = 0
        any_pos = 0
        # masks as comparisons against 0 or V: (block & scalar) is not portable to the interpreter
        v_slim = tl.where(from_slim, V, 0)
        v_full = tl.where(from_full, V, 0)
        v_p = tl.where(has_p, V, 0)
        for off in range(0, V, BLOCK):
            idx = off + offs
            valid = idx < V
            xs = tl.load(slim_ptr + final_row * stride_s + idx, mask=idx < v_slim, other=0.0).to(tl.float32)
            xf = tl.load(full_ptr + final_row * stride_f + idx, mask=idx < v_full, other=0.0).to(tl.float32)
            target = tl.where(from_slim, xs, xf)
            if HAS_P:
                p = tl.load(p_ptr + tk * stride_p + idx, mask=idx < v_p, other=0.0).to(tl.float32)
            else:
                p = tl.where(idx.to(tl.int64) == dk, 1.0, 0.0)
            residual = tl.maximum(target - p, 0.0)
            nz = tl.load(noise_ptr + final_row * stride_n + idx, mask=valid, other=1.0).to(tl.float32)
            sr = tl.where(valid, tl.math.div_rn(residual, nz), -1.0)
            sq = tl.where(valid, tl.math.div_rn(target, nz), -1.0)
            any_pos = any_pos | tl.max(((residual > 0) & valid).to(tl.int32), axis=0)
            mr, ar = tl.max(sr, axis=0, return_indices=True, return_indices_tie_break_left=True)
            mq, aq = tl.max(sq, axis=0, return_indices=True, return_indices_tie_break_left=True)
            idx_r = tl.where(mr > best_r, off + ar, idx_r)
            best_r = tl.maximum(best_r, mr)
            idx_q = tl.where(mq > best_q, off + aq, idx_q)
            best_q = tl.maximum(best_q, mq)
        final = tl.where(any_pos != 0, idx_r, idx_q)

    # outputs
    w = tl.arange(0, WBLOCK)
    kept = w < k
    drafts = tl.load(draft_ptr + start + w, mask=kept, other=-1)
    tl.store(out_ptr + i * W + w, drafts, mask=kept)
    tl.store(out_ptr + i * W + k, final.to(tl.int64), mask=has_final)
    tl.store(num_ptr + i, k + has_final.to(tl.int64))
    full_end = tl.minimum(k + 1, n)  # the full model decided positions [stop, full_end)
    decided = (w >= stop) & (w < tl.where(kind == 2, full_end, 0))
    tl.store(tiers_ptr + start + w, tl.full([WBLOCK], 2, tl.int8), mask=decided)
    tl.store(counts_ptr + 0 * B + i, n)
    tl.store(counts_ptr + 1 * B + i, k)
    tl.store(counts_ptr + 2 * B + i, stop)
    tl.store(counts_ptr + 3 * B + i, scan_slim.to(tl.int64))
    tl.store(counts_ptr + 4 * B + i, tl.where(kind == 2, full_end - stop, 0))
    tl.store(counts_ptr + 5 * B + i, (has_final & from_slim).to(tl.int64))
    tl.store(counts_ptr + 6 * B + i, (has_final & from_full).to(tl.int64))


def _rowmajor(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def verify_core_triton(
    meta: SpecMetadata,
    stop: torch.Tensor,  # [B] int64
    kind: torch.Tensor,  # [B] int64
    bonus_from_slim: torch.Tensor,  # [B] bool
    base_tiers: torch.Tensor,  # [T] int8
    slim: torch.Tensor,  # [T+B, V]
    full: torch.Tensor,  # [T+B, V]
    draft_probs: torch.Tensor | None,  # [T, V]
    uniforms: torch.Tensor | None,  # [T]
    noise: torch.Tensor | None,  # [T+B, V]
) -> VerifyOutput:
    """Same contract as `verify.verify_core_torch`."""
    device = full.device
    b = meta.batch_size
    width = meta.max_num_draft_tokens + 1
    slim, full, draft_probs, noise = _rowmajor(slim), _rowmajor(full), _rowmajor(draft_probs), _rowmajor(noise)
    greedy = noise is None
    out = torch.full((b, width), -1, dtype=torch.int64, device=device)
    num = torch.empty(b, dtype=torch.int64, device=device)
    tiers = base_tiers.clone()
    counts = torch.empty(7, b, dtype=torch.int64, device=device)
    if b > 0:
        blk = block_size(full.shape[1])
        dummy = full  # stands in for the absent optional inputs; never read
        _verify_kernel[(b,)](
            slim,
            full,
            slim.stride(0),
            full.stride(0),
            full.shape[1],
            meta.draft_token_ids,
            meta.cu_num_draft_tokens,
            draft_probs if draft_probs is not None else dummy,
            draft_probs.stride(0) if draft_probs is not None else 0,
            uniforms.float().contiguous() if not greedy else dummy,
            noise if not greedy else dummy,
            noise.stride(0) if not greedy else 0,
            stop.to(torch.int64).contiguous(),
            kind.to(torch.int64).contiguous(),
            bonus_from_slim.to(torch.int8).contiguous(),
            out,
            width,
            num,
            tiers,
            counts,
            b,
            GREEDY=greedy,
            HAS_P=draft_probs is not None,
            BLOCK=blk,
            WBLOCK=triton.next_power_of_2(width),
            num_warps=8 if blk >= 2048 else 4,
            enable_fp_fusion=False,  # no a*b+c contraction: decisions match the reference bit for bit
        )
    return VerifyOutput(out, num, tiers, VerifyCounts.from_table(counts))
