"""The engine with and without one of its changes, two engines in one process taking turns.

    python benchmarks/paired_engines.py --change rows --mode binary --prompts 12 --max-tokens 128
    python benchmarks/paired_engines.py --change head-pricing --mode binary --drafter head
    python benchmarks/paired_engines.py --change layers --mode off

Two engines over the bundled model: A as loaded, B without the change:

* `rows`: B leaves GGUF's copy of the Q4_1 layers unused, so every pass reads the interleaved
  layout (A: on AVX2 hosts, passes of `via_sd_kernels.cpu.rows_layout_from()` tokens and more read
  GGUF's layout);
* `head-pricing`: B's draft head drafts until a token falls below its threshold, as before it
  knew the line its drafts are trimmed by (A stops where no longer draft would be kept);
* `layers`: B's decode passes loop over the layers in Python, two kernel calls a layer (A: one
  call, `decoder_layers`, for every layer).

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


CHANGES = ("rows", "head-pricing", "layers")


def pair(model_dir, change: str, mode: str, drafter: str, **engine_kw) -> tuple[LLMEngine, LLMEngine]:
    """Engines A (as loaded) and B (without `change`) over `model_dir`."""
    if change not in CHANGES:
        raise ValueError(f"change: one of {CHANGES}")

    def engine(changed: bool) -> LLMEngine:
        eng = LLMEngine(EngineConfig(model=str(model_dir), spec=SpecConfig(mode=mode, drafter=drafter), **engine_kw))
        if not changed and change == "rows":
            for lw in eng.model.layers:
                lw.rows_from = 0
            eng.model.weights_changed()
        if not changed and change == "head-pricing":
            eng.spec._trim_line = lambda scheduled: None
        if not changed and change == "layers":
            eng.model.small_weights = lambda tokens: None  # the layer loop in Python
        return eng

    return engine(True), engine(False)


def run_once(eng: LLMEngine, tag: str, prompt, max_tokens: int, mode: str) -> tuple[float, int, list[int]]:
    """One greedy request alone: (seconds, steps, output ids)."""
    t = time.perf_counter()
    seq = eng.add_request(GenerationRequest(tag, tuple(prompt), SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True), SpecParams(mode=mode)))
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    return time.perf_counter() - t, steps, list(seq.output_ids)


def paired(a: LLMEngine, b: LLMEngine, prompts, max_tokens: int, mode: str, rounds: int = 2, warm: int = 2) -> dict:
    """Each prompt on both engines, which goes first alternating, after `warm` prompts on each;
    stops if they write different tokens. Returns both engines' seconds and steps, and B's time
    over A's per prompt and round."""
    for i, p in enumerate(prompts[:warm]):
        run_once(a, f"wa{i}", p, max_tokens, mode), run_once(b, f"wb{i}", p, max_tokens, mode)
    secs, steps, ratios = [0.0, 0.0], [0, 0], []
    for r in range(rounds):
        for i, p in enumerate(prompts):
            first = (i + r) % 2
            out = {}
            for which in (first, 1 - first):
                out[which] = run_once((a, b)[which], f"r{r}.{which}.{i}", p, max_tokens, mode)
            if out[0][2] != out[1][2]:
                raise SystemExit(f"prompt {i}: the two engines wrote different tokens")
            for w in (0, 1):
                secs[w] += out[w][0]
                steps[w] += out[w][1]
            ratios.append(out[1][0] / out[0][0])
    return {"seconds": secs, "steps": steps, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--change", choices=CHANGES, default="rows")
    ap.add_argument("--mode", default="binary")
    ap.add_argument("--drafter", default="hybrid")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    a, b = pair(prepare_model(None, progress=False), args.change, args.mode, args.drafter)
    if args.change == "rows":
        print(f"GGUF's layout from {a.model.layers[0].rows_from or 'no'} tokens in A", flush=True)
    qs = [json.loads(line) for line in open(SPEC_BENCH_FILE)]
    ps = [a.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}])
          for q in qs[::10][: args.prompts]]
    got = paired(a, b, ps, args.max_tokens, args.mode)
    secs, steps, ratios = got["seconds"], got["steps"], got["ratios"]
    print(f"{args.change}, {args.mode} {args.drafter}: A {secs[0]:.2f} s {steps[0]} steps, B (without) {secs[1]:.2f} s "
          f"{steps[1]} steps, B / A {secs[1] / secs[0]:.3f}, median prompt {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
