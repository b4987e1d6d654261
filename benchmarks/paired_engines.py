"""The engine with and without one of its changes, two engines in one process taking turns.

    python benchmarks/paired_engines.py --change rows --mode binary --prompts 12 --max-tokens 128
    python benchmarks/paired_engines.py --change head-pricing --mode binary --drafter head

Two engines over the bundled model: A as loaded, B without the change:

* `rows`: B leaves GGUF's copy of the Q4_1 layers unused, so every pass reads the interleaved
  layout (A: on AVX2 hosts, passes of `via_sd_kernels.cpu.rows_layout_from()` tokens and more read
  GGUF's layout);
* `head-pricing`: B's draft head drafts until a token falls below its threshold, as before it
  knew the line its drafts are trimmed by (A stops where no longer draft would be kept).

Each Spec-Bench prompt (every 10th first turn) runs on both, which goes first alternating, greedy,
`ignore_eos`, for two rounds after a warm-up of two prompts; the outputs must be identical. Prints
both engines' seconds (prompts included) and steps, B's time over A's, and the median of that
ratio per prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from server.bench.prompts import SPEC_BENCH_FILE
from server.engine.api import GenerationRequest
from server.engine.config import EngineConfig, SamplingParams, SpecConfig, SpecParams
from server.engine.engine import LLMEngine
from server.engine.model_files import prepare_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--change", choices=["rows", "head-pricing"], default="rows")
    ap.add_argument("--mode", default="binary")
    ap.add_argument("--drafter", default="hybrid")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def engine(changed: bool) -> LLMEngine:
        eng = LLMEngine(EngineConfig(model=str(prepare_model(None, progress=False)),
                                     spec=SpecConfig(mode=args.mode, drafter=args.drafter)))
        if not changed and args.change == "rows":
            for lw in eng.model.layers:
                lw.rows_from = 0
        if not changed and args.change == "head-pricing":
            eng.spec._trim_line = lambda scheduled: None
        return eng

    a, b = engine(True), engine(False)
    if args.change == "rows":
        print(f"GGUF's layout from {a.model.layers[0].rows_from or 'no'} tokens in A", flush=True)
    qs = [json.loads(line) for line in open(SPEC_BENCH_FILE)]
    ps = [a.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}])
          for q in qs[::10][: args.prompts]]

    def run(eng: LLMEngine, tag: str, p) -> tuple[float, int, list[int]]:
        t = time.perf_counter()
        seq = eng.add_request(GenerationRequest(tag, tuple(p), SamplingParams(
            max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True), SpecParams(mode=args.mode)))
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
        return time.perf_counter() - t, steps, list(seq.output_ids)

    for i, p in enumerate(ps[:2]):
        run(a, f"wa{i}", p), run(b, f"wb{i}", p)
    secs, steps, ratios = [0.0, 0.0], [0, 0], []
    for r in range(2):
        for i, p in enumerate(ps):
            first = (i + r) % 2
            out = {}
            for which in (first, 1 - first):
                out[which] = run((a, b)[which], f"r{r}.{which}.{i}", p)
            if out[0][2] != out[1][2]:
                raise SystemExit(f"prompt {i}: the two engines wrote different tokens")
            for w in (0, 1):
                secs[w] += out[w][0]
                steps[w] += out[w][1]
            ratios.append(out[1][0] / out[0][0])
    print(f"{args.change}, {args.mode} {args.drafter}: A {secs[0]:.2f} s {steps[0]} steps, B (without) {secs[1]:.2f} s "
          f"{steps[1]} steps, B / A {secs[1] / secs[0]:.3f}, median prompt {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
