"""What a verification pass's matrix products could cost on AMX's int8 tiles (a probe, not the engine).

    python benchmarks/amx_probe.py                      # 1..4 tokens, every layer matrix of SmolLM2-135M
    python benchmarks/amx_probe.py --tokens 1,4 --reps 15

A pass over a few tokens costs ~11-15% more per token on the engine's skinny fp32 GEMM
(`via_sd_cpu::skinny_linear` on Q4_1 blocks), because each token adds the model's multiply-adds at
the cores' fp32 peak. `amx_probe.cpp` takes the same products on a CPU with AMX (Intel Xeon 4th
generation and later): each block's sum of x * q exactly in integers on the tile unit, the token
written as four base-128 digits of a 27-bit fixed point against the block's largest value. This
script builds it, checks its results against an fp64 reference next to the fp32 kernel's (and
that a token's result is the same whatever the pass's size), then times the 210 layer matrices of
a forward (random Q4_1 weights of SmolLM2-135M's shapes; the LM head, Q8_0, is left out) on
both, taking turns. Median milliseconds per forward's worth of matrices.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
LAYERS = 30


def build():
    from torch.utils import cpp_extension

    src = Path(__file__).with_name("amx_probe.cpp")
    cpp_extension.load(name="via_sd_amx_probe", sources=[str(src)], is_python_module=False, verbose=False,
                       extra_cflags=["-O3", "-march=native", "-mamx-tile", "-mamx-int8"])
    return torch.ops.via_sd_amx_probe


def q4_1(N: int, K: int, g: torch.Generator):
    """Random Q4_1 weights: q [N, K] in 0..15, d and m [N, K/32] (fp16 values), and their block bytes."""
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    d = (torch.rand(N, K // 32, generator=g) * 0.01 + 0.001).half()
    m = (-8 * d.float() + torch.randn(N, K // 32, generator=g) * 0.002).half()
    qb = q.view(N, K // 32, 32)
    qs = (qb[:, :, :16] | (qb[:, :, 16:] << 4)).contiguous()
    dm16 = torch.stack([d, m], -1).view(torch.uint8).view(N, K // 32, 4)
    blocks = torch.cat([dm16, qs], -1).reshape(N, K // 32 * 20).contiguous()
    return q, d.float(), m.float(), blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,2,3,4")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from via_sd_kernels import cpu as k

    if not k.available():
        raise SystemExit("the engine's CPU kernels are not built on this host")
    amx = build()
    g = torch.Generator().manual_seed(0)
    mats = []
    for _ in range(LAYERS):
        for N, K in SHAPES:
            q, d, m, blocks = q4_1(N, K, g)
            dm = torch.stack([d.view(N // 16, 16, K // 32).transpose(1, 2), m.view(N // 16, 16, K // 32).transpose(1, 2)], 2)
            mats.append((q, d, m, blocks, amx.pack(q), dm.contiguous()))

    # accuracy on the first layer's matrices, 4 tokens of a hidden state's scale
    x = torch.randn(4, 1536, generator=g)
    worst = {"fp32 kernel": 0.0, "amx": 0.0}
    invariant = True
    for q, d, m, blocks, tiles, dm in mats[: len(SHAPES)]:
        N, K = q.shape
        xs = x[:, :K].contiguous()
        w = (d.double().repeat_interleave(32, 1) * q.double() + m.double().repeat_interleave(32, 1))
        ref = xs.double() @ w.T
        scale = (xs.double().abs() @ w.abs().T)  # the size of the terms summed
        for name, y in (("fp32 kernel", k.skinny_linear(xs, blocks)), ("amx", amx.linear(xs, tiles, dm))):
            worst[name] = max(worst[name], float(((y.double() - ref).abs() / scale).max()))
        one = torch.cat([amx.linear(xs[i:i + 1].contiguous(), tiles, dm) for i in range(4)])
        invariant &= bool(torch.equal(one, amx.linear(xs, tiles, dm)))
    print(f"largest error / sum of |terms|: fp32 kernel {worst['fp32 kernel']:.2e}, amx {worst['amx']:.2e}; "
          f"amx rows independent of the pass's size: {invariant}")

    kernels = {"fp32": lambda x, mat: k.skinny_linear(x, mat[3]), "amx": lambda x, mat: amx.linear(x, mat[4], mat[5])}

    def forward(name, xs):  # a forward's layer matrices, one kernel
        for mat in mats:
            kernels[name](xs[mat[0].shape[1]], mat)

    print(f"{'tokens':>6} {'fp32 kernel ms':>15} {'amx ms':>8} {'amx / fp32':>10}")
    for M in [int(t) for t in args.tokens.split(",")]:
        xs = [{K: torch.randn(M, K, generator=g) for K in (576, 1536)} for _ in range(2)]
        times = {"fp32": [], "amx": []}
        for r in range(args.reps + 1):
            for name in ("fp32", "amx") if r % 2 == 0 else ("amx", "fp32"):
                t0 = time.perf_counter()
                forward(name, xs[r % 2])
                if r:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        a, b = statistics.median(times["fp32"]), statistics.median(times["amx"])
        print(f"{M:>6} {a:>15.2f} {b:>8.2f} {b / a:>10.2f}")


if __name__ == "__main__":
    main()
