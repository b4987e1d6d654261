"""Seeded sampled requests: what the fixed cost line of a seeded `three_tier` request costs it.

    python benchmarks/seeded_cost_line.py --temperature 0.7 --slopes 0.1
    python benchmarks/seeded_cost_line.py --temperature 1.0 --slopes 0.1
    python benchmarks/seeded_cost_line.py --temperature 0.7 --slopes '' --warmup-row --rounds 4

A seeded `three_tier` request steps by its own history alone (`spec_step._fixed_path`): its
drafts are cut by a fixed cost line per device type (`draft_length.prior_slope`), never by the
measured pass costs, so that its text repeats whatever the engine served before. This script runs,
in one process and one engine, rows `off`, `binary`, `three_tier` (the shipped line) and
`three_tier` with each slope of `--slopes` in its place, on every `--every`-th Spec-Bench first
turn (`--prompts` of them, `--max-tokens` each, hybrid drafts, seed 1000 + i), the rows taking
turns prompt by prompt in alternating order for `--rounds` rounds after a warm-up on two prompts.
Prints each row's tokens/s (prefill included, as `via-sd bench` counts it), its ratio to `off`,
and its slim passes over steps. `--warmup-row` adds a `three_tier` row whose requests start their
controller as they did before the fixed prior (`SlimController.fixed_state`): empty, warming the
slim tier up on their first two drafted steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from server.bench.prompts import SPEC_BENCH_FILE
from server.engine import spec_step
from server.engine.controller import ControllerState, SlimController
from server.engine.api import GenerationRequest
from server.engine.config import EngineConfig, SamplingParams, SpecConfig, SpecParams
from server.engine.engine import LLMEngine
from server.engine.model_files import prepare_model


WARMUP = "three_tier, warm-up start"


def run(eng: LLMEngine, prompts: list[list[int]], rows: list[tuple[str, str, float | None]], temperature: float,
        max_tokens: int, rounds: int) -> dict[str, dict]:
    """rows: (name, mode, slope or None for the shipped line); the row named `WARMUP` starts its
    controllers empty. Returns per row tokens, seconds, slim passes, steps, draft tokens verified
    and the outputs' token ids of the last round."""
    shipped, fixed_state = spec_step.prior_slope, SlimController.fixed_state
    slope: dict[str, float | None] = {"v": None}
    warmup = {"v": False}
    spec_step.prior_slope = lambda device_type: shipped(device_type) if slope["v"] is None else slope["v"]
    SlimController.fixed_state = lambda ctl: ControllerState() if warmup["v"] else fixed_state(ctl)
    try:
        def gen(tag: str, i: int, row) -> tuple[list[int], float, object]:
            name, mode, s = row
            slope["v"] = s
            warmup["v"] = name == WARMUP
            req = GenerationRequest(f"{tag}{name}.{i}", tuple(prompts[i]), SamplingParams(
                max_tokens=max_tokens, temperature=temperature, seed=1000 + i), SpecParams(mode=mode))
            t = time.perf_counter()
            out = eng.generate([req])[0]
            return out.token_ids, time.perf_counter() - t, out.via_sd

        for i in range(min(2, len(prompts))):
            for row in rows:
                gen("w", i, row)
        res = {r[0]: {"tokens": 0, "seconds": 0.0, "slim_passes": 0, "steps": 0, "draft_tokens": 0, "outputs": {}}
               for r in rows}
        for rnd in range(rounds):
            for i in range(len(prompts)):
                for row in (rows if (i + rnd) % 2 == 0 else rows[::-1]):
                    toks, dt, u = gen(f"r{rnd}", i, row)
                    r = res[row[0]]
                    r["tokens"] += len(toks)
                    r["seconds"] += dt
                    r["slim_passes"] += u.slim_passes
                    r["steps"] += u.steps
                    r["draft_tokens"] += u.draft_tokens
                    r["outputs"][i] = toks
        return res
    finally:
        spec_step.prior_slope = shipped
        SlimController.fixed_state = fixed_state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--slopes", default="0.1", help="comma-separated slopes to run in place of the shipped line")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--warmup-row", action="store_true",
                    help="add a three_tier row whose controllers start empty (before the fixed prior)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    eng = LLMEngine(EngineConfig(model=str(prepare_model(args.model, progress=False)),
                                 spec=SpecConfig(mode="three_tier", drafter="hybrid")))
    qs = [json.loads(line) for line in open(SPEC_BENCH_FILE)]
    prompts = [eng.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}])
               for q in qs[:: args.every][: args.prompts]]
    rows = [("off", "off", None), ("binary", "binary", None), ("three_tier", "three_tier", None)]
    rows += [(f"three_tier, slope {s}", "three_tier", float(s)) for s in args.slopes.split(",") if s]
    if args.warmup_row:
        rows.append((WARMUP, "three_tier", None))
    print(f"shipped line on {eng.device.type}: slope {spec_step.prior_slope(eng.device.type)}; "
          f"T={args.temperature}, {len(prompts)} prompts x {args.max_tokens} tokens x {args.rounds} rounds")
    res = run(eng, prompts, rows, args.temperature, args.max_tokens, args.rounds)
    base = res["off"]["tokens"] / res["off"]["seconds"]
    for name, r in res.items():
        tps = r["tokens"] / r["seconds"]
        print(f"{name:26s} {tps:6.1f} tokens/s  {tps / base:.3f}x off  slim passes / steps {r['slim_passes']} / {r['steps']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
