"""Microbenchmarks of the CPU kernels at the sizes a Spec-Bench step meets.

    python benchmarks/cpu_kernels.py                # all
    python benchmarks/cpu_kernels.py --only attention --contexts 200,800,1600
    python benchmarks/cpu_kernels.py --only packed --tokens 1,2,4,6,8
    python benchmarks/cpu_kernels.py --only layouts --tokens 1,2,3,4,5,6 --rounds 30
    python benchmarks/cpu_kernels.py --only gemm --gemm-tokens 8,16,32,64,512

- `attention`: `via_sd_cpu::paged_attention` for one layer (SmolLM2-135M's 9 query heads, 3 KV
  heads, head size 64) at several context lengths, for a decode token (N=1) and a 6-token
  verification pass (N=6); the context's slots lie in shuffled 16-slot blocks, as in the paged
  cache. Median microseconds per call over repeated calls (the cache stays warm).
- `draft`: the shipped draft head's 5-token chained draft for one sequence with a full 32-pair
  window, with the target's weights' worth of memory streamed in between (as in a step), on the
  one-call kernel and on torch ops (`VIA_SD_HEAD_KERNEL=0` in the engine); then the drafter's
  steady state (30 pairs' keys and values kept, 2 new pairs, 5 or 3 drafts, 1 or 4 sequences)
  with its matrices in each form (`VIA_SD_HEAD_WEIGHTS`: fp32, fp16, Q8_0 blocks), the forms
  taking turns over `--rounds` rounds. Median milliseconds.
- `packed`: every layer matrix of the bundled model through `skinny_linear` once (a forward's
  matmuls, 210 calls), fp32 against the packed Q4_1 blocks (GGUF's layout, and four rows
  interleaved, the engine's), and the LM head fp32, fp16-read
  (`greedy_linear`) and Q8_0, for several tokens per pass. Median milliseconds (the weights do not
  fit in the caches, so each call reads them from memory).
- `layouts`: the same layer matrices, GGUF's Q4_1 layout against four rows interleaved, the two
  taking turns (which goes first alternates) for `--rounds` rounds at each width: median
  milliseconds of each and the median of the rounds' ratios with its quartiles. The engine reads
  the interleaved layout below `rows_layout_from()` tokens and GGUF's from there (AVX2 hosts).
- `gemm`: the same layer matrices and the LM head, fp32, for the wider passes (a batch of
  sequences, a prompt's chunk): torch's `F.linear` (MKL's sgemm in torch's CPU wheels), oneDNN's
  GEMM over the matrices reordered once (`dense_linear`, what the engine runs above
  `SKINNY_MAX_TOKENS`), and the skinny GEMM on the Q4_1 blocks up to 32 tokens. Median
  milliseconds for the whole set, and the rate in G multiply-adds per second.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch


def attention(contexts: list[int], reps: int) -> None:
    from via_sd_kernels import cpu as k

    if not k.available():
        raise SystemExit("the CPU kernels are not built on this host")
    nh, nkv, hd = 9, 3, 64
    P = max(contexts) + 64
    inv = 10000 ** (-torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(P).float()[:, None] * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()], 1), torch.cat([ang.sin(), ang.sin()], 1)
    g = torch.Generator().manual_seed(0)
    for L in contexts:
        blocks = (L + 64) // 16 + 8
        kc, vc = torch.randn(blocks * 16, nkv, hd, generator=g), torch.randn(blocks * 16, nkv, hd, generator=g)
        ctx = (torch.randperm(blocks, generator=g)[:, None] * 16 + torch.arange(16)).flatten()[None, : L + 16].contiguous()
        for N in (1, 6):
            qkv = torch.randn(N, (nh + 2 * nkv) * hd, generator=g)
            pos, seq, slot = torch.arange(L - N, L), torch.zeros(N, dtype=torch.int64), ctx[0, L - N:L].clone()

            def call():
                k.paged_attention(qkv, cos, sin, pos, seq, slot, ctx, kc, vc, nh, nkv, 1 / math.sqrt(hd))

            for _ in range(20):
                call()
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                for _ in range(20):
                    call()
                ts.append((time.perf_counter() - t) / 20)
            print(f"attention  context {L:5d}  N={N}: {statistics.median(ts) * 1e6:7.1f} us per layer call", flush=True)


def draft(reps: int, rounds: int = 4) -> None:
    import server.engine.drafters.head as hd
    from server.engine.config import EngineConfig, SpecConfig
    from server.engine.engine import LLMEngine
    from server.engine.model_files import prepare_model

    folder = prepare_model(None, progress=False)
    eng = LLMEngine(EngineConfig(model=str(folder), spec=SpecConfig(mode="binary", drafter="head"), max_num_seqs=8))
    drafter = hd.HeadDrafter(eng)
    g = torch.Generator().manual_seed(0)
    H, T = drafter.head.hidden, drafter.head.window
    args = hd.pack_windows([(torch.randn(T, H, generator=g), torch.randint(0, 49152, (T,), generator=g), 200)], T)
    stream = torch.randn(128_000_000)  # 512 MB: evicts the head, as the target's weights do in a step
    for kernel in (True, False):
        hd.HEAD_KERNEL = kernel
        for _ in range(3):
            hd.draft(drafter.head, *args, 5)
        ts = []
        for _ in range(reps):
            stream.mul_(1.0)
            t = time.perf_counter()
            hd.draft(drafter.head, *args, 5)
            ts.append(time.perf_counter() - t)
        name = "one-call kernel" if kernel else "torch ops"
        print(f"draft      5 tokens, window {T}, {name:15s}: {statistics.median(ts) * 1e3:6.2f} ms", flush=True)
    hd.HEAD_KERNEL = True
    was = hd.HEAD_WEIGHTS
    heads = {}
    for form in ("fp32", "fp16", "q8_0"):
        hd.HEAD_WEIGHTS = form
        heads[form] = hd.HeadDrafter(eng).head
    hd.HEAD_WEIGHTS = was
    cases = []
    for B, steps in ((1, 5), (1, 3), (4, 5)):
        To, Tn = 30, 2
        old = (torch.randn(B, To, 2, H, generator=g), torch.arange(To).repeat(B, 1), torch.ones(B, To, dtype=torch.bool))
        new = (torch.randn(B, Tn, H, generator=g), torch.randint(0, 49152, (B, Tn), generator=g),
               torch.arange(To, To + Tn).repeat(B, 1), torch.ones(B, Tn, dtype=torch.bool))
        cases.append((B, steps, old, new))
    times = {(f, i): [] for f in heads for i in range(len(cases))}
    with torch.inference_mode():
        for _ in range(rounds):
            for form, head in heads.items():
                for i, (B, steps, old, new) in enumerate(cases):
                    for _ in range(2):
                        hd.kernel_draft(head, old, new, steps)
                    for _ in range(reps):
                        stream.mul_(1.0)
                        t = time.perf_counter()
                        hd.kernel_draft(head, old, new, steps)
                        times[form, i].append(time.perf_counter() - t)
    for i, (B, steps, _, _) in enumerate(cases):
        cells = "  ".join(f"{f} {statistics.median(times[f, i]) * 1e3:5.2f}" for f in heads)
        print(f"draft      {B} seq x {steps} tokens, 30 pairs kept + 2 new: {cells} ms", flush=True)
    for f, head in heads.items():
        print(f"draft      {f}: {sum(m.numel() * m.element_size() for m in head.kernel_mats()) / 1e6:.1f} MB of matrices")


def _timed_set(calls, M: int, reps: int, warm: bool = False) -> float:
    """Median milliseconds of one pass through every (f, K) in `calls` on an [M, K] input."""
    xs = {K: torch.randn(M, K) for K in {576, 1536}}
    for _ in range(int(warm)):
        for f, K in calls:
            f(xs[K])
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for f, K in calls:
            f(xs[K])
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _bundled_layers():
    """The bundled model's tensors, its layer matrices (fp32), and those as Q4_1 blocks in GGUF's
    layout and four rows interleaved (the engine's layout for one- and two-token passes)."""
    from safetensors.torch import load_file

    from server.engine.model_files import prepare_model
    from via_sd_kernels import cpu as k
    from via_sd_kernels.cpu import blocks

    if not k.available():
        raise SystemExit("the CPU kernels are not built on this host")
    t = load_file(str(prepare_model(None, progress=False) / "model.safetensors"))
    mats = [v for name, v in t.items() if ".layers." in name and v.dim() == 2]
    packs = [blocks.pack_q4_1(w) for w in mats]
    if any(p is None for p in packs):
        raise SystemExit("the bundled model's layer matrices are not all Q4_1 blocks")
    inter = [blocks.interleave_q4_1(p, w.shape[1]) for w, p in zip(mats, packs)]
    return t, mats, packs, inter


def packed(tokens: list[int], reps: int) -> None:
    from server.engine.model import GreedyHead
    from via_sd_kernels import cpu as k
    from via_sd_kernels.cpu import blocks

    t, mats, packs, inter = _bundled_layers()
    head = t["model.embed_tokens.weight"]
    head8, greedy = blocks.pack_q8_0(head), GreedyHead.build(head)

    def timed(calls, M: int) -> float:
        return _timed_set(calls, M, reps)

    for M in tokens:
        fp32 = timed([(lambda x, w=w: k.skinny_linear(x, w), w.shape[1]) for w in mats], M)
        q4 = timed([(lambda x, p=p: k.skinny_linear(x, p), w.shape[1]) for w, p in zip(mats, packs)], M)
        q4x4 = timed([(lambda x, p=p: k.skinny_linear(x, p), w.shape[1]) for w, p in zip(mats, inter)], M)
        print(f"layers     {M} tokens: fp32 {fp32:6.2f} ms   Q4_1 {q4:6.2f} ms   Q4_1 interleaved {q4x4:6.2f} ms",
              flush=True)
        h32 = timed([(lambda x: k.skinny_linear(x, head), 576)], M)
        h16 = timed([(lambda x: greedy.logits(x), 576)], M)
        h8 = timed([(lambda x: k.skinny_linear(x, head8), 576)], M)
        print(f"LM head    {M} tokens: fp32 {h32:6.2f} ms   fp16 read {h16:6.2f} ms   Q8_0 {h8:6.2f} ms", flush=True)


def layouts(tokens: list[int], rounds: int) -> None:
    from via_sd_kernels import cpu as k

    _, mats, gguf, inter = _bundled_layers()
    xs = {(M, K): torch.randn(M, K) for M in tokens for K in {w.shape[1] for w in mats}}

    def once(ps, M: int) -> float:
        t0 = time.perf_counter()
        for w, p in zip(mats, ps):
            k.skinny_linear(xs[M, w.shape[1]], p)
        return time.perf_counter() - t0

    times = {M: ([], []) for M in tokens}
    for r in range(rounds):
        for M in tokens:
            a, b = (once(gguf, M), once(inter, M)) if r % 2 else (once(inter, M), once(gguf, M))[::-1]
            times[M][0].append(a)
            times[M][1].append(b)
    print(f"kernels read GGUF's layout from {k.rows_layout_from() or 'no'} tokens on this host")
    for M in tokens:
        a, b = times[M]
        q = sorted(x / y for x, y in zip(b, a))
        print(f"layers {M:2d} tokens: GGUF {statistics.median(a) * 1e3:6.2f} ms   interleaved "
              f"{statistics.median(b) * 1e3:6.2f} ms   interleaved / GGUF {statistics.median(q):.3f} "
              f"[{q[len(q) // 4]:.3f}, {q[3 * len(q) // 4]:.3f}]", flush=True)


def gemm(tokens: list[int], reps: int) -> None:
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from server.engine.model_files import prepare_model
    from via_sd_kernels import cpu as k
    from via_sd_kernels.cpu import blocks

    if not k.dense_available():
        raise SystemExit("oneDNN's linear is not available in this torch")
    t = load_file(str(prepare_model(None, progress=False) / "model.safetensors"))
    mats = [v.contiguous() for name, v in t.items() if ".layers." in name and v.dim() == 2]
    mats.append(t["model.embed_tokens.weight"].contiguous())
    dense = [k.pack_dense(w) for w in mats]
    packs = [blocks.pack_q4_1(w) for w in mats[:-1]] if k.available() else None
    macs = sum(w.numel() for w in mats)

    def timed(calls, M: int) -> float:
        return _timed_set(calls, M, reps, warm=True)

    for M in tokens:
        mkl = timed([(lambda x, w=w: F.linear(x, w), w.shape[1]) for w in mats], M)
        dnn = timed([(lambda x, p=p: k.dense_linear(x, p), w.shape[1]) for w, p in zip(mats, dense)], M)
        line = f"gemm  {M:4d} tokens: F.linear {mkl:7.2f} ms ({M * macs / mkl / 1e6:4.0f})   oneDNN {dnn:7.2f} ms ({M * macs / dnn / 1e6:4.0f})"
        if packs is not None and M <= 32:
            sk = timed([(lambda x, p=p: k.skinny_linear(x, p), w.shape[1]) for w, p in zip(mats, packs)]
                       + [(lambda x: k.skinny_linear(x, mats[-1]), 576)], M)
            line += f"   skinny (Q4_1 layers) {sk:7.2f} ms ({M * macs / sk / 1e6:4.0f})"
        print(line + "  [G multiply-adds/s]", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["attention", "draft", "packed", "layouts", "gemm"])
    ap.add_argument("--tokens", default="1,2,4,6,8")
    ap.add_argument("--gemm-tokens", default="8,16,32,64,512")
    ap.add_argument("--contexts", default="200,800,1600")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=4, help="`draft`, `layouts`: rounds of the forms or layouts taking turns")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "attention"):
        attention([int(c) for c in args.contexts.split(",")], args.reps)
    if args.only in (None, "draft"):
        draft(args.reps, args.rounds)
    if args.only in (None, "packed"):
        packed([int(m) for m in args.tokens.split(",")], args.reps)
    if args.only in (None, "layouts"):
        layouts([int(m) for m in args.tokens.split(",")], args.rounds)
    if args.only in (None, "gemm"):
        gemm([int(m) for m in args.gemm_tokens.split(",")], args.reps)


if __name__ == "__main__":
    main()
