"""Weights that are exactly 4-bit blocks, kept as such for the skinny GEMM.

A model converted from a GGUF Q4_1 file (the bundled SmolLM2 is one) holds fp32 matrices whose
every block of 32 values along K is `d * q + m`: d and m fp16, q in 0..15. `pack` finds d, m and
q for each block and returns the blocks in GGUF's layout (20 bytes per 32 values: d, m, then 16
bytes whose low nibbles are values 0-15 and high nibbles 16-31), or None when any block is not
of that form; `unpack` is its inverse. The kernel (`decode.cpp`, `Q4Block`) dequantizes in
registers to the same fp32 values and runs the same fused multiply-adds in the same order, so a
pass on packed weights is bitwise the pass on the fp32 matrix while reading a fifth of the bytes:
lossless, not a quantization.
"""

from __future__ import annotations

import torch

BLOCK = 32
BLOCK_BYTES = 20


def _dequant(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # d * q is exact in fp32 (11 by 4 significant bits): one rounding, that of the sum, as in
    # GGUF's dequantizer and the kernel
    return d.float()[:, None] * q.float() + m.float()[:, None]


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """fp32 [N, K] -> uint8 [N, K / 32 * 20] that `unpack`s to exactly `w`, or None."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] % BLOCK or w.numel() == 0:
        return None
    N, K = w.shape
    b = w.detach().to("cpu").contiguous().reshape(-1, BLOCK)
    if not torch.isfinite(b).all():
        return None
    lo = b.min(-1).values
    m = lo.half()  # q = 0 is the block's minimum
    if not torch.equal(m.float(), lo):
        return None
    span = b.max(-1).values - lo
    nb = b.shape[0]
    d = torch.zeros(nb, dtype=torch.float16)
    q = torch.zeros(nb, BLOCK, dtype=torch.uint8)
    todo = torch.arange(nb)
    # the quantizer puts the maximum at q = 15 and rounds d to fp16 afterwards: try d's nearest fp16
    # values first, then other top levels for blocks whose maximum sits lower
    for top in (15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1):
        guess = (span[todo] / top).half()
        bits = guess.view(torch.int16)
        for step in (0, -1, 1, -2, 2):
            if todo.numel() == 0:
                break
            cand = (bits + step).view(torch.float16) if step else guess
            vals = b[todo]
            lows = lo[todo]
            df = cand.float()
            safe = torch.where(df > 0, df, torch.ones_like(df))
            qf = torch.round((vals - lows[:, None]) / safe[:, None]).clamp_(0, 15)
            qf = torch.where(df[:, None] > 0, qf, torch.zeros_like(qf))
            ok = (_dequant(cand, m[todo], qf) == vals).all(-1) & torch.isfinite(df)
            hit = todo[ok]
            d[hit] = cand[ok]
            q[hit] = qf[ok].to(torch.uint8)
            todo, bits, guess = todo[~ok], bits[~ok], guess[~ok]
        if todo.numel() == 0:
            break
    if todo.numel():
        return None
    out = torch.empty(nb, BLOCK_BYTES, dtype=torch.uint8)
    out[:, 0:2] = d.view(torch.uint8).reshape(nb, 2)
    out[:, 2:4] = m.view(torch.uint8).reshape(nb, 2)
    out[:, 4:] = q[:, :16] | (q[:, 16:] << 4)
    packed = out.reshape(N, K // BLOCK * BLOCK_BYTES)
    if not torch.equal(unpack(packed, K), w.detach().to("cpu")):
        return None
    return packed


def unpack(p: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [N, K / 32 * 20] -> the fp32 [N, K] it encodes."""
    N = p.shape[0]
    blocks = p.reshape(-1, BLOCK_BYTES)
    d = blocks[:, 0:2].contiguous().view(torch.float16).reshape(-1)
    m = blocks[:, 2:4].contiguous().view(torch.float16).reshape(-1)
    qs = blocks[:, 4:]
    q = torch.cat([qs & 15, qs >> 4], dim=1)
    return _dequant(d, m, q).reshape(N, K)
