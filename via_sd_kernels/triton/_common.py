"""Row reductions shared by the gate and verification kernels."""

from __future__ import annotations

import triton
import triton.language as tl

MAX_BLOCK = 4096  # vocabulary elements per loop iteration; tests lower it to exercise the loop


def block_size(vocab: int) -> int:
    return min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK)


@triton.jit
def row_max(ptr, row, stride, V, BLOCK: tl.constexpr):
    """max over one row of a [rows, V] float tensor (in fp32)."""
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        x = tl.load(ptr + row * stride + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        best = tl.maximum(best, x)
    return tl.max(best, axis=0)


@triton.jit
def select_row_argmax(a_ptr, b_ptr, row, stride_a, stride_b, V, use_a, use_b, BLOCK: tl.constexpr):
    """argmax (first maximum, as torch.argmax) over row `row` of a if use_a else b (use_b = not
    use_a; the row that is not used is never read)."""
    offs = tl.arange(0, BLOCK)
    best = float("-inf")
    best_idx = 0
    # masks as comparisons against 0 or V: (block & scalar) is not portable to the interpreter
    v_a = tl.where(use_a, V, 0)
    v_b = tl.where(use_b, V, 0)
    for start in range(0, V, BLOCK):
        idx = start + offs
        xa = tl.load(a_ptr + row * stride_a + idx, mask=idx < v_a, other=float("-inf")).to(tl.float32)
        xb = tl.load(b_ptr + row * stride_b + idx, mask=idx < v_b, other=float("-inf")).to(tl.float32)
        x = tl.where(use_a, xa, xb)
        m, a = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        better = m > best  # strict: an earlier block keeps a tie, as torch.argmax does
        best_idx = tl.where(better, start + a, best_idx)
        best = tl.where(better, m, best)
    return best_idx
