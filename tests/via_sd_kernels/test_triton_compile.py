"""The kernels compile for a real GPU target (sm_90, the H100/H200 class) without a GPU.

Triton ships ptxas, so the whole pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin) runs on the
CPU; this catches what the interpreter cannot (types of loop-carried values, scalar control
flow, masks) before a GPU ever sees the kernels. Sampling must divide with IEEE round-to-nearest
so that it matches torch bit for bit.
"""

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

INTERPRETED = type(triton.language.standard.zeros_like).__name__ == "InterpretedFunction"
pytestmark = pytest.mark.skipif(INTERPRETED, reason="compiles only outside the interpreter")

TARGET = GPUTarget("cuda", 90, 32)
OPTIONS = {"num_warps": 8, "enable_fp_fusion": False}


def _compile(fn, signature, constexprs):
    try:
        return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=TARGET, options=OPTIONS)
    except FileNotFoundError as e:  # no ptxas shipped on this platform
        pytest.skip(f"cannot compile for {TARGET}: {e}")


def test_gate_kernel_compiles():
    from via_sd_kernels.triton.gate import _gate_kernel

    sig = {
        "probs_ptr": "*fp32", "stride": "i64", "V": "i32", "draft_ptr": "*i64", "cu_ptr": "*i64",
        "accept_ptr": "*fp32", "escalate_ptr": "*fp32", "bonus_conf_ptr": "*fp32", "tiers_ptr": "*i8",
        "stop_ptr": "*i64", "stop_tier_ptr": "*i8", "needs_full_ptr": "*i8", "bonus_slim_ptr": "*i8",
        "BLOCK": "constexpr",
    }  # fmt: skip
    assert "cubin" in _compile(_gate_kernel, sig, {"BLOCK": 4096}).asm


@pytest.mark.parametrize("greedy,has_p", [(True, False), (False, True), (False, False)])
def test_verify_kernel_compiles(greedy, has_p):
    from via_sd_kernels.triton.verify import _verify_kernel

    sig = {
        "slim_ptr": "*fp32", "full_ptr": "*fp32", "stride_s": "i64", "stride_f": "i64", "V": "i32",
        "draft_ptr": "*i64", "cu_ptr": "*i64", "p_ptr": "*fp32", "stride_p": "i64", "u_ptr": "*fp32",
        "noise_ptr": "*fp32", "stride_n": "i64", "stop_ptr": "*i64", "kind_ptr": "*i64",
        "bonus_slim_ptr": "*i8", "out_ptr": "*i64", "W": "i32", "num_ptr": "*i64", "tiers_ptr": "*i8",
        "counts_ptr": "*i64", "B": "i32", "GREEDY": "constexpr", "HAS_P": "constexpr",
        "BLOCK": "constexpr", "WBLOCK": "constexpr",
    }  # fmt: skip
    consts = {"GREEDY": greedy, "HAS_P": has_p, "BLOCK": 4096, "WBLOCK": 8}
    ptx = _compile(_verify_kernel, sig, consts).asm["ptx"]
    if not greedy:
        assert "div.rn.f32" in ptx and "div.approx" not in ptx and "div.full" not in ptx
