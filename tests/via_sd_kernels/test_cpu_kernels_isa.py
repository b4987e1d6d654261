"""The CPU kernels give bitwise the same sums whichever vector instructions they were built for.

The kernels compute in 16-lane vectors; on an AVX-512 host one register holds one, on an AVX2
host (`avx2::` in decode.cpp) the accumulators are kept as 8-lane halves, and without AVX2 the
compiler's generic code runs. Each path must do the same fused multiply-adds in the same order and
add the lanes by the same tree, so that a model gives the same tokens on every x86 host. This
builds the kernels a second time with the host's widest path turned off (`-mno-avx512f` on an
AVX-512 host, `-mno-avx2` on an AVX2 one) and compares both builds' outputs on the same inputs,
each build in its own process."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for the CPU kernels")]

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import sys, torch
from via_sd_kernels import cpu
assert cpu.available(), "the CPU kernels did not build"
torch.set_num_threads(2)  # paged_attention's phased path needs two threads
inp = torch.load(sys.argv[1])
res = {}
for name, (x, w, r) in inp["linear"].items():
    res[name] = cpu.skinny_linear(x, w, r)
for name, a in inp["attention"].items():
    kc, vc = a["kc"].clone(), a["vc"].clone()
    res[name] = cpu.paged_attention(a["qkv"], a["cos"], a["sin"], a["pos"], a["seq"], a["slot"], a["ctx"], kc, vc,
                                    a["nh"], a["nkv"], a["scale"])
    res[name + " k"], res[name + " v"] = kc, vc
res["silu_mul"] = cpu.silu_mul(inp["gu"])
res["rms_norm"] = cpu.rms_norm(inp["h"], inp["norm"], 1e-5)
torch.save(res, sys.argv[2])
"""


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _inputs() -> dict:
    from tests.via_sd_kernels.test_cpu_kernels import q4_1_matrix
    from via_sd_kernels.cpu import blocks

    g = torch.Generator().manual_seed(2026)
    linear = {}
    for K, N in ((576, 132), (1536, 76), (80, 20)):  # 80: a K with a tail past the 16-lane steps
        w = q4_1_matrix(N, K, g) if K % 32 == 0 else torch.randn(N, K, generator=g)
        forms = {"fp32": w, "fp16": w.half()}
        if K % 32 == 0:
            p = blocks.pack_q4_1(w)
            forms.update(q4_1=p, q4_1_interleaved=blocks.interleave_q4_1(p, K),
                         q8_0=blocks.quantize_q8_0(torch.randn(N, K, generator=g)))
        for M in (1, 2, 3, 5, 6, 8, 13):
            x, r = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
            for form, wf in forms.items():
                linear[f"{form} K={K} M={M}"] = (x, wf, r if M % 2 else None)
    attention = {}
    # past 1,024 positions a pass of few tokens takes paged_attention's phased path
    for nh, nkv, hd, L, n in ((9, 3, 64, 150, 1), (9, 3, 64, 150, 6), (9, 3, 64, 700, 2), (4, 2, 24, 40, 3),
                              (9, 3, 64, 1100, 1), (9, 3, 64, 1100, 5), (4, 2, 24, 1050, 3)):
        P = L + 8
        inv = 10000 ** (-torch.arange(0, hd, 2).float() / hd)
        ang = torch.arange(P).float()[:, None] * inv
        blocks_n = (L + 15) // 16 + 4
        ctx = (torch.randperm(blocks_n, generator=g)[:, None] * 16 + torch.arange(16)).flatten()[None, :L].contiguous()
        attention[f"attention nh={nh} hd={hd} L={L} N={n}"] = dict(
            qkv=torch.randn(n, (nh + 2 * nkv) * hd, generator=g),
            cos=torch.cat([ang.cos(), ang.cos()], 1), sin=torch.cat([ang.sin(), ang.sin()], 1),
            pos=torch.arange(L - n, L), seq=torch.zeros(n, dtype=torch.int64), slot=ctx[0, L - n:L].clone(), ctx=ctx,
            kc=torch.randn(blocks_n * 16, nkv, hd, generator=g), vc=torch.randn(blocks_n * 16, nkv, hd, generator=g),
            nh=nh, nkv=nkv, scale=1 / math.sqrt(hd))
    return dict(linear=linear, attention=attention, gu=torch.randn(5, 2 * 1536, generator=g) * 4,
                h=torch.randn(3, 576, generator=g), norm=torch.rand(576, generator=g) + 0.5)


def _run(inputs: Path, out: Path, cflags: str) -> dict:
    env = {**os.environ, "VIA_SD_KERNEL_CFLAGS": cflags, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(inputs), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def test_kernels_built_without_the_widest_vector_path_give_bitwise_the_same_sums(tmp_path):
    flags = _cpu_flags()
    if "avx512f" in flags:
        other = "-mno-avx512f"  # the AVX2 path
    elif {"avx2", "fma"} <= flags:
        other = "-mno-avx2"  # the generic 16-lane code (with FMA)
    else:
        pytest.skip("neither AVX-512 nor AVX2 with FMA on this host")
    torch.save(_inputs(), tmp_path / "inputs.pt")
    native = _run(tmp_path / "inputs.pt", tmp_path / "native.pt", "")
    narrow = _run(tmp_path / "inputs.pt", tmp_path / "narrow.pt", other)
    assert native.keys() == narrow.keys() and len(native) > 90
    differ = [k for k in native if not torch.equal(native[k], narrow[k])]
    assert not differ, f"built with {other}, {len(differ)} outputs differ, e.g. {differ[:5]}"
