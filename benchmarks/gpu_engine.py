"""The embedded engine on CUDA: a randomly initialised ~1B Llama, plain decode speed and the cost of
verifying γ draft tokens, against the GPU's memory-bandwidth limit.

    python benchmarks/gpu_engine.py [--preset 1b] [--dtype bfloat16] [--batches 1,32] [--gammas 0,1,...,8]
                                    [--context 512] [--out benchmarks/results/gpu_engine.json]

No weights can be carried to a GPU machine here, so the model is built in GPU memory from a seeded
random init with the shape of Llama-3.2-1B (hidden 2048, 16 layers, 32 query / 8 KV heads,
MLP 8192, vocabulary 128256, tied embeddings: 1.24B parameters). Speed does not depend on the
values; acceptance does, so no acceptance figure here means anything.

What it measures (medians; warm-up excluded):

1. `copy GB/s`: a device-to-device copy of 4 GiB (bytes read + written over time): the ceiling.
2. Per (batch B, γ): one forward of the engine's runner without CUDA graphs (`ModelRunner.forward`:
   host metadata, the paged-KV forward, logits) with every sequence feeding γ + 1 tokens after
   `--context` tokens of context, timed on the wall clock after a synchronize: `eager ms`. The
   engine's runner with its CUDA graphs (padded to buckets, server/engine/cuda_graphs.py):
   `runner_graphs ms`. The ragged forward captured as is and replayed: `graph ms`, the kernels alone.
   `bound ms` = (weight bytes + the KV bytes the step reads) / copy bandwidth.
   `verify cost` = ms(γ) / ms(γ = 0): what verifying γ drafts costs in plain decode steps.
   The same for the slim route (17% of the sub-layers' weights skipped, like the bundled model's).
3. End to end through `LLMEngine` (scheduler, sampler, the spec step) on CUDA: greedy decoding of
   `--max-tokens` tokens after a random 64-token prompt, for 1 and 32 concurrent requests, modes
   `off`, `binary` and `three_tier` with the n-gram drafter, speculating at every batch size
   (`--spec-max-batch`); tokens/s of the whole run, the median of `--repeats` timed runs after an
   untimed run of the same requests (which captures the CUDA graphs): a shape the warm-up did not
   meet (a three-tier step exploring the slim tier, say) compiles Triton kernels and captures a
   graph once, inside one timed run, which the median leaves out (each run's figure is kept too).
   Per row also: passes and the slim-tier controller's choices per run, graphs captured while
   timed. `--compare-eager` repeats them without CUDA graphs.

`--device cpu --preset tiny` runs the same script on a small shape as a smoke test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.engine.api import GenerationRequest  # noqa: E402
from server.engine.config import EngineConfig, SamplingParams, SpecConfig, SpecParams  # noqa: E402
from server.engine.engine import DTYPES, LLMEngine  # noqa: E402
from server.engine.kv_cache import Chunk, KVCache, build_batch  # noqa: E402
from server.engine.model import LayerWeights, LlamaModel, ModelConfig  # noqa: E402
from server.engine.runner import ModelRunner  # noqa: E402
from via_sd_kernels.routes import Route  # noqa: E402

PRESETS = {
    # Llama-3.2-1B's shape
    "1b": dict(hidden=2048, layers=16, heads=32, kv=8, inter=8192, vocab=128256, max_pos=4096),
    "tiny": dict(hidden=128, layers=4, heads=4, kv=2, inter=256, vocab=512, max_pos=1024),
}


def random_model(preset: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> LlamaModel:
    p = PRESETS[preset]
    H, hd = p["hidden"], p["hidden"] // p["heads"]
    cfg = ModelConfig(vocab_size=p["vocab"], hidden_size=H, intermediate_size=p["inter"], num_layers=p["layers"],
                      num_heads=p["heads"], num_kv_heads=p["kv"], head_dim=hd, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=p["max_pos"], tie_word_embeddings=True,
                      bos_token_id=None, eos_token_ids=())
    g = torch.Generator(device=device).manual_seed(seed)

    def w(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype).contiguous()

    ones = lambda: torch.ones(H, device=device, dtype=dtype)  # noqa: E731
    layers = [LayerWeights(attn_norm=ones(), wqkv=w((p["heads"] + 2 * p["kv"]) * hd, H), wo=w(H, p["heads"] * hd),
                           mlp_norm=ones(), w_gate_up=w(2 * p["inter"], H), w_down=w(H, p["inter"]))
              for _ in range(p["layers"])]
    embed = w(p["vocab"], H, std=1.0)
    return LlamaModel(cfg, layers, embed, ones(), embed, dtype)


def weight_bytes(m: LlamaModel) -> int:
    """Bytes one forward reads from the weights: every layer, the final norm and the (tied) LM head."""
    n = sum(t.numel() * t.element_size() for lw in m.layers
            for t in (lw.attn_norm, lw.wqkv, lw.wo, lw.mlp_norm, lw.w_gate_up, lw.w_down))
    return n + m.lm_head.numel() * m.lm_head.element_size() + m.norm.numel() * m.norm.element_size()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float) -> float:
    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    samples = []
    for i in range(8):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            samples.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n * 2 / statistics.median(samples) / 1e9


def median_ms(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def graph_ms(model, batch, cache, route, device, iters: int) -> float | str:
    """The forward captured in a CUDA graph, replayed: kernels only."""
    if device.type != "cuda":
        return "cpu"
    try:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(2):
                model.forward(batch, cache.k, cache.v, route)
        torch.cuda.current_stream(device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            model.forward(batch, cache.k, cache.v, route)
        ms = median_ms(graph.replay, device, 3, iters)
        del graph
        return ms
    except Exception as e:  # noqa: BLE001 - a capture failure is a result to report, not a crash
        return f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def forward_costs(model, device, batches, gammas, context, iters, slim_route, bandwidth: float) -> list[dict]:
    """Rows of the forward table; `bandwidth` in GB/s gives the bound."""
    cfg = model.cfg
    max_q = max(gammas) + 1
    bs = 16
    blocks_per_seq = (context + max_q + bs - 1) // bs + 1
    cache = KVCache(cfg, max(batches) * blocks_per_seq + 2, bs, model.dtype, device)
    runner = ModelRunner(model, cache, cuda_graphs=False)
    graphed = ModelRunner(model, cache) if device.type == "cuda" else None
    tables = []
    for _ in range(max(batches)):
        t = cache.new_table()
        t.ensure(cache.pool, context + max_q)
        tables.append(t)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(model.dtype).bits // 8
    wbytes = weight_bytes(model)
    rows = []
    for B in batches:
        for route_name, route in (("full", None), ("slim", slim_route)):
            base = None
            for gamma in gammas:
                Q = gamma + 1
                chunks = [Chunk(tables[b], context, [(7 * b + j) % cfg.vocab_size for j in range(Q)], Q)
                          for b in range(B)]
                eager = median_ms(lambda: runner.forward(chunks, route), device, 3, iters)
                g = graph_ms(model, build_batch(chunks, device), cache, route, device, iters)
                run_g = median_ms(lambda: graphed.forward(chunks, route), device, 3, iters) if graphed else None
                kv = B * (context + Q) * kv_per_token
                bound = (wbytes + kv) / (bandwidth * 1e9) * 1e3
                if gamma == 0:
                    base = (eager, g)
                row = {
                    "batch": B, "route": route_name, "gamma": gamma, "tokens": B * Q,
                    "eager_ms": round(eager, 3),
                    "graph_ms": round(g, 3) if isinstance(g, float) else g,
                    "runner_graphs_ms": round(run_g, 3) if run_g is not None else None,
                    "bound_ms": round(bound, 3) if route is None else None,
                    "verify_cost_eager": round(eager / base[0], 3),
                    "verify_cost_graph": round(g / base[1], 3) if isinstance(g, float) and isinstance(base[1], float) else None,
                    "decode_tok_s_eager": round(B / eager * 1e3, 1) if gamma == 0 else None,
                    "decode_tok_s_graph": round(B / g * 1e3, 1) if gamma == 0 and isinstance(g, float) else None,
                }
                rows.append(row)
                print(f"B={B:>3} {route_name:<4} γ={gamma} eager {eager:8.3f} ms  runner+graphs {run_g!s:>6}  graph "
                      f"{row['graph_ms'] if isinstance(g, float) else g!s:>9}  bound "
                      f"{row['bound_ms']!s:>7}  cost x{row['verify_cost_eager']}/{row['verify_cost_graph']}",
                      flush=True)
    for t in tables:
        t.release(cache.pool)
    return rows


def attention_new_shapes(device, dtype, n_shapes: int = 24) -> dict:
    """SDPA as a decode step calls it (B = 1, 8 KV heads, 4 grouped queries, a mask), once per
    context length never seen before, per backend: ms per call. A per-shape plan cost shows here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, backends in (("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                           ("flash", [SDPBackend.FLASH_ATTENTION]), ("math", [SDPBackend.MATH])):
        base = {"cudnn": 1000, "efficient": 2000, "flash": 3000, "math": 4000}[name]
        times = []
        try:
            for i in range(n_shapes):
                L = base + 7 * i
                q = torch.randn(1, 8, 4, 64, device=device, dtype=dtype)
                k = torch.randn(1, 8, L, 64, device=device, dtype=dtype)
                v = torch.randn(1, 8, L, 64, device=device, dtype=dtype)
                mask = torch.ones(1, 1, 4, L, device=device, dtype=torch.bool)
                sync(device)
                t0 = time.perf_counter()
                with sdpa_kernel(backends):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            out[name] = {"first_ms": round(times[0], 3), "median_ms": round(statistics.median(times[1:]), 3)}
        except Exception as e:  # noqa: BLE001 - a backend that refuses the shape is a result
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        print(f"attention, new context length every call, {name}: {out[name]}", flush=True)
    return out


def profile_steps(eng, device, steps: int, path: Path) -> None:
    """torch profiler over `steps` batch-1 decode steps of `eng`: the table goes to `path`."""
    from torch.profiler import ProfilerActivity, profile

    V = eng.model.cfg.vocab_size
    eng.add_request(GenerationRequest("prof", tuple((13 * j) % V for j in range(64)),
                                      SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True), SpecParams()))
    for _ in range(4):
        eng.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            eng.step()
        sync(device)
    while eng.has_unfinished():
        eng.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))


def end_to_end(model, tokenizer_dir, device, dtype_name, batches, max_tokens, modes, spec_max_batch,
               profile_dir: Path | None = None, label: str = "", cuda_graphs: bool = True,
               repeats: int = 3) -> list[dict]:
    from server.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tokenizer_dir)
    rows = []
    for mode in modes:
        eng = LLMEngine(EngineConfig(model=str(tokenizer_dir), dtype=dtype_name, device=str(device), max_num_seqs=64,
                                     kv_cache_memory_gb=4.0 if device.type == "cuda" else 0.25,
                                     cuda_graphs=cuda_graphs,
                                     spec=SpecConfig(mode=mode, drafter="ngram", spec_max_batch=spec_max_batch)),
                        model=model, tokenizer=tok)
        V = model.cfg.vocab_size
        for B in batches:
            def reqs(tag, n=B, mt=max_tokens):
                return [GenerationRequest(f"{tag}{i}", tuple((31 * i + 17 * j) % V for j in range(64)),
                                          SamplingParams(max_tokens=mt, temperature=0.0, ignore_eos=True),
                                          SpecParams(mode=mode)) for i in range(n)]
            eng.generate(reqs("w"))  # warm-up: the same shapes, so CUDA graphs are captured before timing
            st, graphs = eng.stats_, eng.runner.graphs
            keys = ("num_steps", "full_passes", "slim_passes", "controller_slim_on", "controller_slim_off")
            before = {k: getattr(st, k) for k in keys}
            def captured() -> tuple[int, float]:  # graphs captured so far, and the seconds it took
                return (graphs.num_captures, graphs.capture_seconds) if graphs is not None else (0, 0.0)

            cap0 = captured()
            walls, n = [], 0
            # several timed runs: a step shape the warm-up did not meet (a three-tier request's rare
            # slim-tier exploration, say) captures its graph and compiles its Triton kernels once,
            # inside one run; the median is the engine once it has met every shape
            for r in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                res = eng.generate(reqs(f"r{r}."))
                sync(device)
                walls.append(time.perf_counter() - t0)
                n = sum(len(x.token_ids) for x in res)
                assert eng.cache.pool.num_free == eng.cache.pool.num_usable, "blocks leaked"
            per_run = {k: round((getattr(st, k) - before[k]) / repeats, 1) for k in keys}
            cap1 = captured()
            wall = statistics.median(walls)
            row = {"mode": mode + label, "concurrency": B, "tokens": n, "seconds": round(wall, 3),
                   "tok_s": round(n / wall, 1), "tok_s_runs": [round(n / w, 1) for w in walls],
                   "steps": per_run["num_steps"], "tokens_per_seq_step": round(n / B / max(1, per_run["num_steps"]), 2),
                   # per run; three-tier steps that ran the slim tier / that the controller bypassed it in
                   **{k: per_run[k] for k in keys[1:]},
                   # graphs captured inside the timed runs (0: the warm-up captured every shape)
                   "captures_timed": cap1[0] - cap0[0] if graphs is not None else None,
                   "capture_seconds": round(cap1[1] - cap0[1], 3)}
            rows.append(row)
            print(f"engine {mode + label:<16} c={B:>3}: {row['tok_s']:>8} tok/s  ({n} tokens, {wall:.2f} s, "
                  f"{row['steps']} steps a run, {row['full_passes']} full / {row['slim_passes']} slim passes, slim tier "
                  f"on/off {row['controller_slim_on']}/{row['controller_slim_off']}, "
                  f"{row['captures_timed']} captures timed ({row['capture_seconds']} s); runs {row['tok_s_runs']})",
                  flush=True)
        if profile_dir is not None and mode in (modes[0], "three_tier"):
            profile_steps(eng, device, 16, profile_dir / f"gpu_engine_profile_{mode}.txt")
        del eng
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--gammas", default="0,1,2,3,4,5,6,7,8")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--modes", default="off,binary,three_tier")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode and batch (the median is reported)")
    ap.add_argument("--copy-gib", type=float, default=4.0)
    ap.add_argument("--profile", action="store_true", help="write a torch profiler table of 16 decode steps")
    ap.add_argument("--compare-eager", action="store_true", help="run the modes again without CUDA graphs")
    ap.add_argument("--compare-cudnn", action="store_true", help="run `off` again with cuDNN attention allowed")
    ap.add_argument("--spec-max-batch", type=int, default=64,
                    help="engine runs: speculate up to this many decoding sequences (the CPU default is 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_engine.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_engine: no CUDA device here; nothing to measure.")
        return 0
    dtype = DTYPES[args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    gammas = [int(g) for g in args.gammas.split(",")]
    t_start = time.perf_counter()
    bw = copy_bandwidth(device, args.copy_gib)
    print(f"copy bandwidth: {bw:.0f} GB/s", flush=True)
    model = random_model(args.preset, dtype, device)
    n_params = sum(t.numel() for lw in model.layers for t in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)) + model.embed.numel()
    wb = weight_bytes(model)
    L = model.cfg.num_layers
    slim = Route.from_skips(L, skip_attn=(L * 11 // 16,), skip_mlp=tuple(range(L // 2, L // 2 + max(1, 3 * L // 16))),
                            name="slim(17%)")
    print(f"model: {args.preset} {n_params / 1e9:.3f}B parameters, {wb / 1e9:.2f} GB of weights per forward "
          f"({args.dtype}); bound at batch 1: {wb / (bw * 1e9) * 1e3:.3f} ms = {bw * 1e9 / wb:.0f} tok/s", flush=True)
    fwd = forward_costs(model, device, batches, gammas, args.context, args.iters, slim, bw)
    e2e = []
    with tempfile.TemporaryDirectory() as td:
        from server.engine.testing import write_tiny_model

        # a folder for the engine's tokenizer and config reads; the weights are the random model above
        folder = write_tiny_model(Path(td) / "tok", num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1,
                                  intermediate_size=16)
        e2e = end_to_end(model, folder, device, args.dtype, batches, args.max_tokens,
                         [m for m in args.modes.split(",") if m], args.spec_max_batch,
                         Path(args.out).parent if args.profile else None, repeats=args.repeats)
        if args.compare_eager and device.type == "cuda":
            e2e += end_to_end(model, folder, device, args.dtype, batches, args.max_tokens,
                              [m for m in args.modes.split(",") if m], args.spec_max_batch, label="+eager",
                              cuda_graphs=False, repeats=args.repeats)
        if args.compare_cudnn and device.type == "cuda":
            import server.engine.model as model_module

            model_module.CUDNN_SDPA = True
            e2e += end_to_end(model, folder, device, args.dtype, batches, args.max_tokens, ["off"], args.spec_max_batch,
                              label="+eager+cudnn_sdpa", cuda_graphs=False, repeats=args.repeats)
            model_module.CUDNN_SDPA = False
    attn = attention_new_shapes(device, dtype) if device.type == "cuda" else {}
    result = {
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/gpu_engine.py"] + (argv if argv is not None else sys.argv[1:])),
        "model": {"preset": args.preset, **PRESETS[args.preset], "params": n_params, "dtype": args.dtype,
                  "weight_bytes_per_forward": wb, "init": "random, seed 0"},
        "slim_route": {"skip_attn": [i for i, a in enumerate(slim.attn) if not a],
                       "skip_mlp": [i for i, m in enumerate(slim.mlp) if not m]},
        "copy_bandwidth_gb_s": round(bw, 1),
        "context": args.context,
        "forward": fwd,
        "engine": e2e,
        "attention_new_shapes": attn,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
