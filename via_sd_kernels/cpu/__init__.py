"""CPU kernels, compiled on first use with the host's C++ compiler (torch's extension builder).

`linear(x, w)` is `F.linear` without bias, routed to the skinny GEMM of `decode.cpp` when the
batch of tokens is small and the tensors are fp32 on the CPU. If the compiler or ninja is missing,
or `VIA_SD_CPU_KERNELS=0`, it falls back to `F.linear` and says so once in the log.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("via_sd.kernels")

# Above this many tokens a GEMM (oneDNN's, `dense_linear`) is compute-efficient and faster than
# streaming: measured in the engine, 64-token decode steps of 16 and 24 sequences, 455 against 389
# tokens/s and 431 against 466 (the skinny GEMM in tiles of 8 tokens against oneDNN's).
SKINNY_MAX_TOKENS = 16

# Compiler flags added to the host's own (-march=native): the tests build the kernels a second
# time for another instruction set (`-mno-avx512f`, AVX2's code on an AVX-512 host) and compare sums.
KERNEL_CFLAGS = os.environ.get("VIA_SD_KERNEL_CFLAGS", "").split()

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_tag() -> str:
    import hashlib
    import platform

    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                flags += line
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _build_dir() -> Path:
    root = Path(os.environ.get("VIA_SD_KERNEL_CACHE", Path.home() / ".cache" / "via-sd" / "kernels"))
    # -march=native: one build per CPU model and torch version
    tag = f"torch-{torch.__version__.replace('+', '_')}-{_cpu_tag()}"
    if KERNEL_CFLAGS:
        import hashlib

        tag += "-" + hashlib.sha1(" ".join(KERNEL_CFLAGS).encode()).hexdigest()[:8]
    return root / tag


def _build() -> bool:
    import fcntl

    from torch.utils import cpp_extension

    src = Path(__file__).with_name("decode.cpp")
    build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's builder guards the directory with a `lock` file that a killed build (a stopped pod,
    # Ctrl-C during the first start) leaves behind, and every later build then waits on it
    # forever. Builds here take an flock first, which the kernel releases when its holder dies:
    # whoever holds it is the only builder alive, so a `lock` file it finds is stale.
    with open(build_dir / "via-sd-build.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a kernel build that did not finish", stale)
            stale.unlink(missing_ok=True)
        cpp_extension.load(
            name="via_sd_cpu_kernels",
            sources=[str(src)],
            extra_cflags=["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", *KERNEL_CFLAGS],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    return True


def available() -> bool:
    """Compile (once per host and torch version) and load the kernels; False when that fails."""
    ok = _state.get("ok")
    if ok is not None:
        return bool(ok)
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        if os.environ.get("VIA_SD_CPU_KERNELS", "1") == "0":
            _state["ok"] = False
            return False
        try:
            _state["ok"] = _build()
        except Exception as e:  # noqa: BLE001 - any build failure means the plain path
            log.warning("CPU kernels unavailable, using torch's linear: %s", str(e).splitlines()[0] if str(e) else e)
            _state["ok"] = False
    return bool(_state["ok"])


def takes(x: torch.Tensor) -> bool:
    """Whether these kernels can take `x`: fp32 on the CPU, and the kernels built."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and available()


def use_for(x: torch.Tensor) -> bool:
    """Whether a pass with hidden states `x` [N, H] runs on these kernels."""
    return x.shape[0] <= SKINNY_MAX_TOKENS and takes(x)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T (+ residual) with the streaming kernel (requires `available()`)."""
    return torch.ops.via_sd_cpu.skinny_linear(x, w, residual)


def rows_layout_from() -> int:
    """The fewest tokens from which a pass reads Q4_1 matrices faster in GGUF's layout than four
    rows interleaved (0: never; requires `available()`)."""
    return int(torch.ops.via_sd_cpu.rows_layout_from())


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.via_sd_cpu.rms_norm(x, w, eps)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` of logits [M, N] (the same ids, NaN and ties included): on the calling thread
    where the kernels take x, which for a decode step's rows is several times faster."""
    if x.dim() == 2 and x.shape[1] > 0 and takes(x):
        return torch.ops.via_sd_cpu.argmax_rows(x)
    return x.argmax(-1)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    return torch.ops.via_sd_cpu.silu_mul(gu)


def rotate_store(qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, nh: int, nkv: int) -> torch.Tensor:
    """Rotary on qkv's queries and keys at `positions` (cos, sin: the [P, hd] tables), the keys and
    values into the caches at `slot_mapping`; returns the rotated queries [N, nh * hd]."""
    return torch.ops.via_sd_cpu.rotate_store(qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, nh, nkv)


def greedy_linear(x: torch.Tensor, w16: torch.Tensor, w: torch.Tensor, err: torch.Tensor,
                  max_exact: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ w.T read from the fp16 copy `w16`, exact (fp32, bitwise `skinny_linear`'s) at the rows
    that could be a row's argmax given |error| <= ||x_m|| * err[j]: (logits, ids recomputed)."""
    return torch.ops.via_sd_cpu.greedy_linear(x, w16, w, err, max_exact)


def paged_attention(qkv, cos, sin, positions, token_seq, slot_mapping, ctx_slots, k_cache, v_cache,
                    nh: int, nkv: int, scale: float) -> torch.Tensor:
    return torch.ops.via_sd_cpu.paged_attention(qkv, cos, sin, positions, token_seq, slot_mapping, ctx_slots,
                                                k_cache, v_cache, nh, nkv, scale)


def attn_block(x, norm, eps: float, wqkv, wo, cos, sin, positions, token_seq, slot_mapping, ctx_slots, k_cache,
               v_cache, nh: int, nkv: int, scale: float) -> torch.Tensor:
    """x + paged_attention(rms_norm(x) @ wqkv^T) @ wo^T in one call (the same values as the ops)."""
    return torch.ops.via_sd_cpu.attn_block(x, norm, eps, wqkv, wo, cos, sin, positions, token_seq, slot_mapping,
                                           ctx_slots, k_cache, v_cache, nh, nkv, scale)


def mlp_block(x, norm, eps: float, w_gate_up, w_down) -> torch.Tensor:
    """x + silu_mul(rms_norm(x) @ w_gate_up^T) @ w_down^T in one call (the same values as the ops)."""
    return torch.ops.via_sd_cpu.mlp_block(x, norm, eps, w_gate_up, w_down)


def decoder_layers(x, weights, cos, sin, positions, token_seq, slot_mapping, ctx_slots, k_cache, v_cache,
                   nh: int, nkv: int, scale: float, eps: float, run: list[int],
                   save_at: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """`attn_block` and `mlp_block` over every layer in one call (the same values). weights: the
    per-layer lists (attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down); run [2L]: 1 where the
    sub-layer runs. Returns (x after the last layer, x before sub-layer `save_at`, or empty)."""
    return torch.ops.via_sd_cpu.decoder_layers(x, *weights, cos, sin, positions, token_seq, slot_mapping, ctx_slots,
                                               k_cache, v_cache, nh, nkv, scale, eps, run, save_at)


def head_draft(kv_old, pos_old, valid_old, h, tok, pos, valid, embed, mats, norms, reduced_ids, *, heads: int,
               window: int, steps: int, stop_below: float, min_tokens: int, eps: float,
               theta: float, costs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A draft head's chained greedy drafting in one call (server/engine/drafters/head.py `draft`
    states the contract). kv_old [B, To, 2, H]: keys and values of earlier pairs (To may be 0);
    h, tok, pos, valid: the new pairs; mats = (fc, qkv, o, gate_up, down, out_embed), all fp32 or
    all fp16; norms [3, H]; stop_below < 0 drafts all `steps`; costs: float64 r(1) .. r(steps + 1),
    or None.
    Returns (ids [B, S], probs [B, S], kv_new [B, Tn, 2, H])."""
    return torch.ops.via_sd_cpu.head_draft(kv_old, pos_old, valid_old, h, tok, pos, valid, embed, *mats, norms,
                                           reduced_ids, heads, window, steps, stop_below, min_tokens, eps, theta,
                                           costs)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and w.dtype == torch.float32 and use_for(x):
        return torch.ops.via_sd_cpu.skinny_linear(x, w, None)
    return F.linear(x, w)


# Passes wider than the skinny GEMM's limit (prompts, batches of many sequences) are GEMMs. torch's
# fp32 `F.linear` on the CPU is MKL's sgemm, which on AMD CPUs runs its AVX2 code: 110-185 GFLOP/s
# on this project's 2-core AMD EPYC box (AVX-512), where oneDNN's fp32 GEMM over a weight reordered
# once into its blocked layout reaches 350-400 (2.2-4.7x, the LM head gaining most). Same fp32
# products, summed in another order (|difference| ~1e-4 on logits, as between any two GEMMs), and
# like MKL's each row's result does not depend on the other rows of the pass. VIA_SD_ONEDNN=0
# keeps torch's F.linear.
_ONEDNN = os.environ.get("VIA_SD_ONEDNN", "1") != "0"


def dense_available() -> bool:
    """Whether `pack_dense` / `dense_linear` can be used (torch built with oneDNN, and not turned off)."""
    ok = _state.get("dense")
    if ok is None:
        ok = False
        if _ONEDNN and torch.backends.mkldnn.is_available():
            try:
                w = torch.ones(8, 16)
                y = dense_linear(torch.ones(2, 16), pack_dense(w))
                ok = bool(torch.equal(y, torch.full((2, 8), 16.0)))
            except (RuntimeError, AttributeError) as e:
                log.warning("oneDNN's linear unavailable, wide passes use torch's: %s", str(e).splitlines()[0] if str(e) else e)
        _state["dense"] = ok
    return bool(ok)


def pack_dense(w: torch.Tensor) -> torch.Tensor:
    """fp32 w [N, K] reordered into oneDNN's blocked layout for `dense_linear` (a copy, same size)."""
    return torch.ops.mkldnn._reorder_linear_weight(w, 64)


def dense_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w^T (+ bias) with `packed` = pack_dense(w): oneDNN's fp32 GEMM."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class disabled:
    """`with cpu.disabled():` runs every pass on torch's ops, F.linear included (for comparisons)."""

    def __enter__(self):
        available()
        dense_available()
        self._was = _state["ok"], _state["dense"]
        _state["ok"] = _state["dense"] = False

    def __exit__(self, *exc):
        _state["ok"], _state["dense"] = self._was
