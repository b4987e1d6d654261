"""The draft-head recipe (`via-sd train-head`) on a GPU: how long collecting answers and training
take at the bundled model's shape and at ~1B, and what one draft costs against a decode step.

    python benchmarks/gpu_head.py [--presets smol,1b] [--prompts 128] [--sampled 3] [--batches 64,256]
                                  [--train-steps 300] [--out benchmarks/results/gpu_head.json]

No weights can be carried to a GPU machine here, so each model is a seeded random init (shapes:
`smol` = SmolLM2-135M's, 30 layers of 576; `1b` = Llama-3.2-1B's, see gpu_engine.py). Speed does
not depend on the values; acceptance does, so no acceptance figure here means anything, and an
answer never stops early (random weights emit no EOS): every answer is `--max-tokens` long.

What it measures, with the command's own code:

1. **Collect** (`train_head.collect` on `--device cuda`, the engine's CUDA graphs, features copied
   to the host): `--prompts` prompts × (1 greedy + `--sampled` sampled) answers at each batch of
   `--batches`, after an untimed round that captures the graphs: answers/s and positions/s.
2. **Train** (`unrolled_loss` + `optimizer_step`, the shipped recipe's settings: batch 8 answers,
   3 chained levels, window 32, bf16 autocast, the head's layout scaled with the model): ms per
   step and positions/s, after 10 untimed steps.
3. **Draft**: `draft` of γ = 5 tokens for one sequence on a 32-pair window, on the GPU and on the
   host CPU (where the engine's drafter runs it now), against one decode step of the target
   (`off`, one request, graphs).

Each figure is then scaled to the shipped head's recipe (its record: answers, positions, epochs)
and to the `builtin+third` set (16,680 answers), next to what they took on the CPU.

`--device cpu --presets tiny` runs the same script on a small shape as a smoke test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_engine import PRESETS, median_ms, random_model, sync  # noqa: E402

from server.engine.api import GenerationRequest  # noqa: E402
from server.engine.config import EngineConfig, SamplingParams, SpecConfig  # noqa: E402
from server.engine.drafters import train_head as th  # noqa: E402
from server.engine.drafters.head import draft  # noqa: E402
from server.engine.engine import DTYPES, LLMEngine  # noqa: E402

SHAPES = {
    **PRESETS,
    # SmolLM2-135M-Instruct's shape (the bundled model)
    "smol": dict(hidden=576, layers=30, heads=9, kv=3, inter=1536, vocab=49152, max_pos=8192),
}
# the head's layout per model: the shipped one at 576, scaled (heads of 64, MLP 2.75x) above
HEAD_LAYOUT = {"smol": dict(ffn=1536, heads=9), "1b": dict(ffn=5632, heads=32), "tiny": dict(ffn=256, heads=4)}
DTYPE = {"smol": "float32", "1b": "bfloat16", "tiny": "float32"}
BUILTIN_THIRD_ANSWERS = 16_680  # --prompts builtin+third --sampled 3


def prompts(n: int, seed: int) -> list[dict]:
    """n instructions of 10 random words (about 60 characters, a byte per token with the test
    tokenizer: about the built-in instructions' length in SmolLM2's tokens)."""
    rng = random.Random(seed)
    words = ["explain", "write", "list", "the", "a", "short", "poem", "about", "rivers", "how", "why", "summarize",
             "code", "sort", "numbers", "history", "of", "tea", "compare", "two", "cities", "plan", "trip"]
    return [{"id": i, "category": "bench", "prompt": " ".join(rng.choice(words) for _ in range(10))} for i in range(n)]


def engine_for(model, folder: Path, device, dtype_name: str, batch: int) -> LLMEngine:
    from server.engine.tokenizer import Tokenizer

    gb = 8.0 if device.type == "cuda" else 0.25
    return LLMEngine(EngineConfig(model=str(folder), dtype=dtype_name, device=str(device), max_num_seqs=batch,
                                  max_num_batched_tokens=8192, kv_cache_memory_gb=gb, spec=SpecConfig(mode="off")),
                     model=model, tokenizer=Tokenizer.from_folder(folder))


def measure_collect(model, folder, device, dtype_name, batch, n_prompts, sampled, max_tokens, seed=0):
    eng = engine_for(model, folder, device, dtype_name, batch)
    warm = th.collect("", prompts(max(1, batch // (1 + sampled)), seed + 1), max_tokens=max_tokens, sampled=sampled,
                      temperature=0.7, seed=seed, batch=batch, threads=None, engine=eng)
    del warm
    sync(device)
    t0 = time.perf_counter()
    seqs = th.collect("", prompts(n_prompts, seed), max_tokens=max_tokens, sampled=sampled, temperature=0.7,
                      seed=seed, batch=batch, threads=None, engine=eng)
    sync(device)
    wall = time.perf_counter() - t0
    assert eng.cache.pool.num_free == eng.cache.pool.num_usable, "blocks leaked"
    assert all(s["hidden"].device.type == "cpu" for s in seqs), "features must land on the host"
    positions = sum(len(s["hidden"]) for s in seqs)
    row = {"batch": batch, "answers": len(seqs), "positions": positions, "seconds": round(wall, 2),
           "answers_per_s": round(len(seqs) / wall, 1), "positions_per_s": round(positions / wall, 0)}
    print(f"  collect batch {batch:>3}: {row['answers']} answers, {positions} positions in {wall:.1f} s = "
          f"{row['answers_per_s']} answers/s, {row['positions_per_s']:.0f} positions/s", flush=True)
    return row, seqs, eng


def measure_train(model, seqs, device, preset, steps: int, batch_size: int = 8, unroll: int = 3):
    torch.manual_seed(0)
    reduced = th.reduced_vocabulary(seqs, 4096, tuple(model.cfg.eos_token_ids), model.cfg.vocab_size)
    lay = HEAD_LAYOUT[preset]
    head = th.new_head(model, reduced, ffn=lay["ffn"], heads=lay["heads"], window=32, dropout=0.1).to_device(device)
    d = {k: v.to(device) for k, v in th.pad_answers(seqs).items()}
    d["scale"] = model.norm.float().abs().mean().to(device)
    N = len(d["h"])
    opt, sched = th.training_schedule(head, 1.5e-3, 0.05, steps + 10)
    g = torch.Generator().manual_seed(0)
    head.train()
    batches = [torch.randint(0, N, (batch_size,), generator=g).to(device) for _ in range(steps + 10)]
    pos_per_step = [int(d["valid"][b].sum()) for b in batches]
    losses = []

    def step(i):
        loss, _ = th.unrolled_loss(head, d, batches[i], unroll, 1.0, bf16=True)
        th.optimizer_step(head, opt, sched, loss)
        losses.append(loss.detach())

    for i in range(10):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(10, steps + 10):
        step(i)
    sync(device)
    wall = time.perf_counter() - t0
    assert all(torch.isfinite(x) for x in losses), "loss not finite"
    positions = sum(pos_per_step[10:])
    row = {"steps": steps, "batch_answers": batch_size, "unroll": unroll, "bf16": True,
           "head_params": head.num_params(), "ms_per_step": round(wall / steps * 1e3, 2),
           "positions_per_s": round(positions / wall, 0)}
    print(f"  train: {row['ms_per_step']} ms per step of {batch_size} answers = {row['positions_per_s']:.0f} "
          f"positions/s (head {head.num_params() / 1e6:.1f}M parameters)", flush=True)
    head.eval()
    return row, head


def measure_draft(head, eng, device, gamma: int = 5, window: int = 32) -> dict:
    H = head.hidden
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, window, H, generator=g)
    tok = torch.randint(0, int(head.reduced_ids.max()) + 1, (1, window), generator=g)
    pos = torch.arange(100, 100 + window)[None]
    valid = torch.ones(1, window, dtype=torch.bool)
    row = {"gamma": gamma, "window": window}
    with torch.no_grad():
        if device.type == "cuda":
            args = [t.to(device) for t in (h, tok, pos, valid)]
            row["gpu_ms"] = round(median_ms(lambda: draft(head, *args, gamma), device, 5, 30), 3)
        head.to_device("cpu")
        cpu = torch.device("cpu")
        row["host_ms"] = round(median_ms(lambda: draft(head, h, tok, pos, valid, gamma), cpu, 3, 20), 3)
    # one decode step of the target, one request, the engine's graphs: ms per token of `off`
    V = eng.model.cfg.vocab_size
    req = lambda tag: [GenerationRequest(tag, tuple((7 * j) % V for j in range(64)),  # noqa: E731
                                         SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))]
    eng.generate(req("w"))
    sync(device)
    t0 = time.perf_counter()
    n = sum(len(r.token_ids) for r in eng.generate(req("r")))
    sync(device)
    row["decode_ms"] = round((time.perf_counter() - t0) / n * 1e3, 3)
    print(f"  draft γ={gamma}: " + (f"GPU {row['gpu_ms']} ms, " if "gpu_ms" in row else "")
          + f"host {row['host_ms']} ms; a decode step of the target {row['decode_ms']} ms", flush=True)
    return row


def recipe_steps(rec: dict) -> list[dict]:
    """A head record's training steps, first first: a head continued from another (`--init`)
    keeps that head's record under `init.record`."""
    steps = []
    while rec:
        steps.append(rec)
        rec = (rec.get("init") or {}).get("record")
    return steps[::-1]


def shipped_recipe() -> dict:
    """What the shipped head cost on the CPU, over every step of its making (answers collected,
    positions times epochs trained, seconds of each)."""
    rec = json.loads((ROOT / "server/engine/assets/SmolLM2-135M-Instruct.head.json").read_text())
    steps = recipe_steps(rec)
    return {"steps": len(steps), "answers": sum(r["data"]["answers"] for r in steps),
            "position_epochs": sum(r["data"]["train_positions"] * r["training"]["epochs"] for r in steps),
            "cpu_collect_seconds": round(sum(r["data"]["collect_seconds"] for r in steps), 1),
            "cpu_train_seconds": round(sum(r["training"]["seconds"] for r in steps), 1),
            "cpu_train_bf16": [bool(r["training"].get("bf16", False)) for r in steps]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--presets", default="smol,1b")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--sampled", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_head.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_head: no CUDA device here; nothing to measure.")
        return 0
    t_start = time.perf_counter()
    ship = shipped_recipe()
    result = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/gpu_head.py"] + (argv if argv is not None else sys.argv[1:])),
              "init": "random, seed 0", "shipped_recipe_on_cpu": ship, "models": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        from server.engine.testing import write_tiny_model

        # a folder for the engine's tokenizer and config reads; the weights are the random models
        folder = write_tiny_model(Path(td) / "tok", num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1,
                                  intermediate_size=16)
        for preset in [p for p in args.presets.split(",") if p]:
            PRESETS[preset] = SHAPES[preset]
            dtype_name = DTYPE[preset]
            model = random_model(preset, DTYPES[dtype_name], device)
            n_params = sum(t.numel() for lw in model.layers for t in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)) \
                + model.embed.numel()
            print(f"{preset}: {n_params / 1e9:.3f}B parameters, {dtype_name}", flush=True)
            rows, seqs, eng = [], None, None
            for b in [int(x) for x in args.batches.split(",")]:
                row, seqs_b, eng_b = measure_collect(model, folder, device, dtype_name, b, args.prompts,
                                                     args.sampled, args.max_tokens)
                rows.append(row)
                if seqs is None:
                    seqs, eng = seqs_b, eng_b
                else:
                    del eng_b
            train, head = measure_train(model, seqs, device, preset, args.train_steps)
            dr = measure_draft(head, eng, device)
            best = max(rows, key=lambda r: r["answers_per_s"])
            pos_per_answer = best["positions"] / best["answers"]
            scaled = {
                "shipped_collect_minutes": round(ship["answers"] / best["answers_per_s"] / 60, 1),
                "builtin_third_collect_minutes": round(BUILTIN_THIRD_ANSWERS / best["answers_per_s"] / 60, 1),
                "shipped_train_minutes": round(ship["position_epochs"] / train["positions_per_s"] / 60, 1),
                "feature_gb_builtin_third": round(BUILTIN_THIRD_ANSWERS * pos_per_answer * model.cfg.hidden_size * 2
                                                  / 1e9, 2),
            }
            print(f"  scaled: the shipped recipe's collection {scaled['shipped_collect_minutes']} min "
                  f"(builtin+third {scaled['builtin_third_collect_minutes']} min, features "
                  f"{scaled['feature_gb_builtin_third']} GB fp16), its training {scaled['shipped_train_minutes']} min",
                  flush=True)
            result["models"][preset] = {"shape": SHAPES[preset], "params": n_params, "dtype": dtype_name,
                                        "collect": rows, "train": train, "draft": dr, "scaled": scaled}
            out.write_text(json.dumps(result, indent=2) + "\n")  # what is done so far, should a later step fail
            del model, eng, seqs, head
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
