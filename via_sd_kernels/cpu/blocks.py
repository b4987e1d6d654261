"""Weights that are exactly GGUF blocks, kept as such for the skinny GEMM.

A model converted from a GGUF file (the bundled SmolLM2 is one: Q4_1 layers, a Q8_0 embedding)
holds fp32 matrices whose every block of 32 values along K is one of

* Q4_1: `d * q + m`, d and m fp16, q in 0..15 (20 bytes a block: d, m, then 16 bytes whose low
  nibbles are values 0-15 and high nibbles 16-31);
* Q8_0: `d * q`, d fp16, q in -128..127 (34 bytes a block: d, then the 32 q).

`pack_q4_1` and `pack_q8_0` find d (m) and q for each block and return the blocks in GGUF's
layout, or None when any block is not of that form; `unpack_*` are their inverses. The kernel
(`decode.cpp`, `Q4Block` and `Q8Block`) dequantizes in registers to the same fp32 values and runs
the same fused multiply-adds in the same order, so a pass on packed weights is bitwise the pass on
the fp32 matrix while reading a fifth (Q4_1) or a quarter (Q8_0) of the bytes: lossless, not a
quantization. d * q is exact in fp32 (11 significant bits by 4 or 8), so Q4_1's one rounding is
that of the sum, and Q8_0 has none.
"""

from __future__ import annotations

import torch

BLOCK = 32
Q4_1_BYTES = 20
Q8_0_BYTES = 34


def _solve(b: torch.Tensor, base: torch.Tensor, span: torch.Tensor, tops: tuple[int, ...], qmin: int, qmax: int):
    """Per block of b [nb, 32]: d (fp16) and q with d * q + base == b exactly, trying d near
    span / top for each top; (d, q int16, unsolved block indices)."""
    nb = b.shape[0]
    d = torch.zeros(nb, dtype=torch.float16)
    q = torch.zeros(nb, BLOCK, dtype=torch.int16)
    todo = torch.arange(nb)
    for top in tops:
        guess = (span[todo] / top).half()
        # d's nearest fp16 value, then its neighbours: the quantizer rounds d to fp16 after choosing q
        for step in (0, -1, 1, -2, 2):
            if todo.numel() == 0:
                break
            cand = (guess.view(torch.int16) + step).view(torch.float16) if step else guess
            df = cand.float()
            vals = b[todo]
            offs = vals - base[todo][:, None]
            safe = torch.where(df > 0, df, torch.ones_like(df))
            qf = torch.round(offs / safe[:, None]).clamp_(qmin, qmax)
            qf = torch.where(df[:, None] > 0, qf, torch.zeros_like(qf))
            ok = (df[:, None] * qf + base[todo][:, None] == vals).all(-1) & torch.isfinite(df) & (df >= 0)
            hit = todo[ok]
            d[hit] = cand[ok]
            q[hit] = qf[ok].to(torch.int16)
            todo, guess = todo[~ok], guess[~ok]
        if todo.numel() == 0:
            break
    return d, q, todo


def _blocks(w: torch.Tensor) -> torch.Tensor | None:
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] % BLOCK or w.numel() == 0:
        return None
    b = w.detach().to("cpu").contiguous().reshape(-1, BLOCK)
    return b if torch.isfinite(b).all() else None


def pack_q4_1(w: torch.Tensor) -> torch.Tensor | None:
    """fp32 [N, K] -> uint8 [N, K / 32 * 20] that `unpack_q4_1`s to exactly `w`, or None."""
    b = _blocks(w)
    if b is None:
        return None
    N, K = w.shape
    lo = b.min(-1).values
    m = lo.half()  # q = 0 is the block's minimum
    if not torch.equal(m.float(), lo):
        return None
    # the quantizer puts the maximum at q = 15; other top levels for blocks whose maximum sits lower
    d, q, todo = _solve(b, m.float(), b.max(-1).values - lo, tuple(range(15, 0, -1)), 0, 15)
    if todo.numel():
        return None
    nb = b.shape[0]
    q = q.to(torch.uint8)
    out = torch.empty(nb, Q4_1_BYTES, dtype=torch.uint8)
    out[:, 0:2] = d.view(torch.uint8).reshape(nb, 2)
    out[:, 2:4] = m.view(torch.uint8).reshape(nb, 2)
    out[:, 4:] = q[:, :16] | (q[:, 16:] << 4)
    packed = out.reshape(N, K // BLOCK * Q4_1_BYTES)
    return packed if torch.equal(unpack_q4_1(packed, K), w.detach().to("cpu")) else None


def unpack_q4_1(p: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [N, K / 32 * 20] -> the fp32 [N, K] it encodes."""
    blocks = p.reshape(-1, Q4_1_BYTES)
    d = blocks[:, 0:2].contiguous().view(torch.float16).reshape(-1).float()
    m = blocks[:, 2:4].contiguous().view(torch.float16).reshape(-1).float()
    qs = blocks[:, 4:]
    q = torch.cat([qs & 15, qs >> 4], dim=1).float()
    return (d[:, None] * q + m[:, None]).reshape(p.shape[0], K)


Q4X4_BYTES = 96  # four rows' blocks at one position along K, interleaved (`interleave_q4_1`)


def interleave_q4_1(p: torch.Tensor, K: int) -> torch.Tensor | None:
    """Q4_1 blocks uint8 [N, K / 32 * 20] -> uint8 [N / 4, K / 32 * 96], the layout the skinny GEMM
    reads fastest (`Q4x4` in decode.cpp), or None when N is not a multiple of 4. For rows 4g..4g+3
    at one block: 64 bytes whose byte 4 i + r is row r's quant byte i, then the four rows' d and
    m as fp32 (exactly their fp16 values): the same numbers, so the same sums."""
    N = p.shape[0]
    if N % 4 or p.dtype != torch.uint8 or tuple(p.shape) != (N, K // BLOCK * Q4_1_BYTES):
        return None
    b = p.reshape(N // 4, 4, K // BLOCK, Q4_1_BYTES)
    qs = b[..., 4:].permute(0, 2, 3, 1).reshape(N // 4, K // BLOCK, 64)  # [g, block, byte i, row r]
    d = b[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1).transpose(1, 2)  # [g, block, r]
    m = b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1).transpose(1, 2)
    dm = torch.cat([d, m], dim=-1).reshape(-1).view(torch.uint8).reshape(N // 4, K // BLOCK, 32)
    return torch.cat([qs, dm], dim=-1).reshape(N // 4, K // BLOCK * Q4X4_BYTES).contiguous()


def deinterleave_q4_1(p: torch.Tensor, K: int) -> torch.Tensor:
    """The inverse of `interleave_q4_1`: GGUF's layout again."""
    G, KB = p.shape[0], K // BLOCK
    b = p.reshape(G, KB, Q4X4_BYTES)
    qs = b[..., :64].reshape(G, KB, 16, 4).permute(0, 3, 1, 2)  # [g, r, block, byte i]
    f = b[..., 64:].contiguous().view(torch.float32).reshape(G, KB, 2, 4)
    d = f[:, :, 0].transpose(1, 2).half().reshape(-1).view(torch.uint8).reshape(G, 4, KB, 2)
    m = f[:, :, 1].transpose(1, 2).half().reshape(-1).view(torch.uint8).reshape(G, 4, KB, 2)
    return torch.cat([d, m, qs], dim=-1).reshape(4 * G, KB * Q4_1_BYTES).contiguous()


def pack_q8_0(w: torch.Tensor) -> torch.Tensor | None:
    """fp32 [N, K] -> int8 [N, K / 32 * 34] that `unpack_q8_0`s to exactly `w`, or None."""
    b = _blocks(w)
    if b is None:
        return None
    N, K = w.shape
    amax = b.abs().max(-1).values
    d, q, todo = _solve(b, torch.zeros_like(amax), amax, (127, 128), -128, 127)
    if todo.numel():
        return None
    nb = b.shape[0]
    out = torch.empty(nb, Q8_0_BYTES, dtype=torch.int8)
    out[:, 0:2] = d.view(torch.int8).reshape(nb, 2)
    out[:, 2:] = q.to(torch.int8)
    packed = out.reshape(N, K // BLOCK * Q8_0_BYTES)
    return packed if torch.equal(unpack_q8_0(packed, K), w.detach().to("cpu")) else None


def unpack_q8_0(p: torch.Tensor, K: int) -> torch.Tensor:
    """int8 [N, K / 32 * 34] -> the fp32 [N, K] it encodes."""
    blocks = p.reshape(-1, Q8_0_BYTES)
    d = blocks[:, 0:2].contiguous().view(torch.float16).reshape(-1).float()
    return (d[:, None] * blocks[:, 2:].float()).reshape(p.shape[0], K)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] (K a multiple of 32) -> int8 [N, K / 32 * 34] Q8_0 blocks: exactly `w` where it
    is such blocks (`pack_q8_0`), else GGUF's own rounding (d = max |w| / 127 of the block in fp16,
    q = round(w / d)); this one loses precision (|error| <= d / 2 an element) and is for weights
    whose exact values do not matter, such as a draft head's."""
    exact = pack_q8_0(w)
    if exact is not None:
        return exact
    if w.dim() != 2 or w.shape[1] % BLOCK or w.numel() == 0:
        raise ValueError(f"Q8_0 needs a non-empty [N, K] matrix with K a multiple of {BLOCK}, not {tuple(w.shape)}")
    N, K = w.shape
    b = w.detach().to("cpu").float().contiguous().reshape(-1, BLOCK)
    if not torch.isfinite(b).all():
        raise ValueError("Q8_0 of a matrix with non-finite values")
    d = (b.abs().max(-1).values / 127).half()
    df = d.float()
    q = torch.where(df[:, None] > 0, torch.round(b / torch.where(df > 0, df, torch.ones_like(df))[:, None]),
                    torch.zeros_like(b)).clamp_(-128, 127)
    nb = b.shape[0]
    out = torch.empty(nb, Q8_0_BYTES, dtype=torch.int8)
    out[:, 0:2] = d.view(torch.int8).reshape(nb, 2)
    out[:, 2:] = q.to(torch.int8)
    return out.reshape(N, K // BLOCK * Q8_0_BYTES)


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """The smallest exact block form of w (Q4_1, else Q8_0), or None."""
    p = pack_q4_1(w)
    return p if p is not None else pack_q8_0(w)
