"""The gate as a Triton kernel: one program per sequence.

The program walks its draft positions in order and stops at the first non-A one, so the rows
after the stop (and the bonus row, unless every draft is A) are never read; the torch reference
reduces every row instead. Each visited row costs one pass over the vocabulary for max q'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gate import GateOutput
from ..metadata import SpecMetadata
from ._common import block_size, row_max


@triton.jit
def _gate_kernel(
    probs_ptr,  # [T+B, V]
    stride,
    V,
    draft_ptr,  # [T] int64
    cu_ptr,  # [B+1] int64
    accept_ptr,  # [B] fp32
    escalate_ptr,  # [B] fp32
    bonus_conf_ptr,  # [B] fp32
    tiers_ptr,  # [T] int8, prefilled with -1
    stop_ptr,  # [B] int64
    stop_tier_ptr,  # [B] int8
    needs_full_ptr,  # [B] int8
    bonus_slim_ptr,  # [B] int8
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    start = tl.load(cu_ptr + i)
    n = tl.load(cu_ptr + i + 1) - start
    row0 = start + i  # rows of sequence i: row0 .. row0 + n (bonus)
    acc = tl.load(accept_ptr + i)
    esc = tl.load(escalate_ptr + i)

    stop = n
    stop_tier = tl.zeros_like(n).to(tl.int32)
    j = tl.zeros_like(n)
    while j < stop:
        row = row0 + j
        m = row_max(probs_ptr, row, stride, V, BLOCK)
        d = tl.load(draft_ptr + start + j)
        qd = tl.load(probs_ptr + row * stride + d).to(tl.float32)
        positive = m > 0
        escalate_ok = positive & (qd >= esc * m)  # C first: escalate > 1 forces C
        tier = tl.where(escalate_ok, tl.where(qd >= acc * m, 0, 1), 2).to(tl.int32)
        tl.store(tiers_ptr + start + j, tier.to(tl.int8))
        stop = tl.where(tier != 0, j, stop)
        stop_tier = tier
        j = j + 1

    all_a = stop == n
    bonus_max = tl.zeros_like(n).to(tl.float32)
    if all_a:
        bonus_max = row_max(probs_ptr, row0 + n, stride, V, BLOCK)
    bonus_slim = all_a & (bonus_max >= tl.load(bonus_conf_ptr + i))
    needs_full = (stop_tier == 2) | (all_a & (bonus_slim == 0))
    tl.store(stop_ptr + i, stop)
    tl.store(stop_tier_ptr + i, stop_tier.to(tl.int8))
    tl.store(needs_full_ptr + i, needs_full.to(tl.int8))
    tl.store(bonus_slim_ptr + i, bonus_slim.to(tl.int8))


def gate_triton(
    slim_probs: torch.Tensor,  # [T+B, V]
    meta: SpecMetadata,
    accept_threshold: torch.Tensor,  # [B]
    escalate_threshold: torch.Tensor,  # [B]
    bonus_confidence: torch.Tensor,  # [B]
) -> GateOutput:
    device = slim_probs.device
    b, t = meta.batch_size, meta.num_tokens
    if slim_probs.stride(-1) != 1:
        slim_probs = slim_probs.contiguous()
    tiers = torch.full((t,), -1, dtype=torch.int8, device=device)
    stop = torch.empty(b, dtype=torch.int64, device=device)
    flags = torch.empty(3, b, dtype=torch.int8, device=device)  # stop_tier, needs_full, bonus_from_slim
    if b > 0:
        blk = block_size(slim_probs.shape[1])
        _gate_kernel[(b,)](
            slim_probs,
            slim_probs.stride(0),
            slim_probs.shape[1],
            meta.draft_token_ids,
            meta.cu_num_draft_tokens,
            accept_threshold.to(device=device, dtype=torch.float32).contiguous(),
            escalate_threshold.to(device=device, dtype=torch.float32).contiguous(),
            bonus_confidence.to(device=device, dtype=torch.float32).contiguous(),
            tiers,
            stop,
            flags[0],
            flags[1],
            flags[2],
            BLOCK=blk,
            num_warps=8 if blk >= 2048 else 4,
            enable_fp_fusion=False,  # no a*b+c contraction: decisions match the reference bit for bit
        )
    return GateOutput(
        tiers=tiers,
        stop=stop,
        stop_tier=flags[0],
        needs_full=flags[1].view(torch.bool),
        bonus_from_slim=flags[2].view(torch.bool),
    )
