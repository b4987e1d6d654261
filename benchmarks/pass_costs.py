"""What a decode-sized pass costs by its width and its context, and how steady the draft-length
rule's cost table is over a run.

    python benchmarks/pass_costs.py --out benchmarks/results/pass_costs.json

One request at a time (every `--stride`th Spec-Bench first turn, `--max-tokens` each, greedy),
after a warm-up request. Every pass the engine times for `draft_length.PassCosts` (one sequence,
decode-sized) is recorded as (tokens, context, seconds). Prints the median milliseconds per width
in context bins, then replays the recorded passes, in order, into two cost tables and samples
r(2) .. r(7) every 50 passes:

* `by_context`: `PassCosts`, each wide pass against a one-token pass at its own context;
* `raw_medians`: the median seconds of the latest 15 passes of each width over the median of the
  latest 15 one-token passes, whatever their contexts (the table before).

and prints each one's range of r(n) over the last two thirds of the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import deque

import torch

from server.bench.cli import machine_info
from server.bench.prompts import SPEC_BENCH_FILE, read_questions
from server.bench.report import describe_cpu
from server.engine.api import GenerationRequest
from server.engine.config import EngineConfig, SamplingParams, SpecConfig
from server.engine.draft_length import PassCosts
from server.engine.engine import LLMEngine
from server.engine.model_files import prepare_model

BINS = ((0, 200), (200, 400), (400, 800), (800, 1600), (1600, 10**9))
WIDTHS = range(2, 8)


class RawMedians:
    """The cost table before: per width, the median of its latest 15 passes' seconds."""

    def __init__(self, keep: int = 15):
        self.samples = [deque(maxlen=keep) for _ in range(65)]

    def observe(self, tokens: int, seconds: float, context: int = 0) -> None:
        if 1 <= tokens < len(self.samples):
            self.samples[tokens].append(seconds)

    def relative(self, tokens: int) -> float | None:
        one, this = self.samples[1], self.samples[tokens]
        if len(one) < 3 or len(this) < 3:
            return None
        return statistics.median(this) / statistics.median(one)


def record(eng: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[tuple[int, int, float]]:
    """Each prompt's greedy answer in turn, after the first as a warm-up: (tokens, context,
    seconds) of every pass the engine's cost table was given."""
    passes: list[tuple[int, int, float]] = []
    observe = eng.pass_costs.observe

    def recording(tokens: int, seconds: float, context: int = 0) -> None:
        passes.append((tokens, context, seconds))
        observe(tokens, seconds, context)

    def run(i: int, ids: list[int]) -> None:
        eng.add_request(GenerationRequest(f"p{i}", tuple(ids), SamplingParams(max_tokens=max_tokens, temperature=0.0)))
        while eng.has_unfinished():
            eng.step()

    run(-1, prompts[0])
    eng.pass_costs.observe = recording
    try:
        for i, ids in enumerate(prompts):
            run(i, ids)
    finally:
        eng.pass_costs.observe = observe
    return passes


def by_bin(passes) -> dict[str, dict[int, dict[str, float]]]:
    out = {}
    for lo, hi in BINS:
        row = {}
        for n in range(1, 8):
            ms = [s * 1e3 for k, c, s in passes if k == n and lo <= c < hi]
            if len(ms) >= 3:
                row[n] = {"median_ms": round(statistics.median(ms), 3), "passes": len(ms)}
        if row:
            out[f"{lo}-{hi}"] = row
    return out


def replay(passes) -> dict[str, dict]:
    tables = {"by_context": PassCosts(), "raw_medians": RawMedians()}
    trace: dict[str, list[list[float | None]]] = {k: [] for k in tables}
    for i, (tokens, context, seconds) in enumerate(passes, 1):
        for t in tables.values():
            t.observe(tokens, seconds, context)
        if i % 50 == 0:
            for k, t in tables.items():
                trace[k].append([t.relative(n) for n in WIDTHS])
    out = {}
    for k, rows in trace.items():
        late = rows[len(rows) // 3:]
        ranges = {}
        for j, n in enumerate(WIDTHS):
            vals = [r[j] for r in late if r[j] is not None]
            if vals:
                ranges[n] = [round(min(vals), 3), round(max(vals), 3), round(statistics.median(vals), 3)]
        out[k] = {"r_min_max_median": ranges, "samples": len(late)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="binary")
    ap.add_argument("--drafter", default="hybrid")
    ap.add_argument("--stride", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eng = LLMEngine(EngineConfig(model=str(prepare_model(None, progress=False)),
                                 spec=SpecConfig(mode=args.mode, drafter=args.drafter)))
    prompts = [eng.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}])
               for q in read_questions(SPEC_BENCH_FILE)[:: args.stride]]
    t0 = time.perf_counter()
    passes = record(eng, prompts, args.max_tokens)
    print(f"{len(prompts)} prompts, {len(passes)} timed passes, {time.perf_counter() - t0:.1f} s")
    bins = by_bin(passes)
    print("median ms by width (passes), by context:")
    for name, row in bins.items():
        print(f"  {name:>10}: " + "  ".join(f"{n}: {v['median_ms']:.2f} ({v['passes']})" for n, v in row.items()))
    tables = replay(passes)
    for name, t in tables.items():
        print(f"{name}: r(n) min-max (median) over the last two thirds of the run, sampled every 50 passes")
        print("  " + "  ".join(f"{n}: {a:.2f}-{b:.2f} ({m:.2f})" for n, (a, b, m) in t["r_min_max_median"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/pass_costs.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
                "machine": describe_cpu(machine_info(args.threads)), "threads": args.threads,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bins": bins, "tables": tables}, f, indent=1)


if __name__ == "__main__":
    main()
