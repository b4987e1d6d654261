"""Where a decode step's time goes: each `engine.step()` timed, by the drafts it verified.

    python benchmarks/step_phases.py --mode binary --temperature 1.0
    python benchmarks/step_phases.py --mode off --temperature 1.0

One request at a time (every 10th Spec-Bench first turn, `--prompts` of them, `--max-tokens`
each, `ignore_eos`), after a warm-up round. Prints, per number of draft tokens left after
trimming ("plain" for `off`), the steps' count, median and mean time and tokens committed per
step, and decoding's tokens/s (the steps that end a prompt left out). A third round times the
phases (drafting, the speculative step's bookkeeping before and after the pass, the pass, plain
sampling, the drafter's observe) in milliseconds per step, every step counted, and the median
one-sequence pass by the tokens in it (the verification pass's cost per draft token).
"""

from __future__ import annotations

import argparse
import collections
import functools
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
    ap.add_argument("--mode", default="binary")
    ap.add_argument("--drafter", default="hybrid")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mode = args.mode
    eng = LLMEngine(EngineConfig(model=str(prepare_model(None, progress=False)),
                                 spec=SpecConfig(mode=mode, drafter=args.drafter)))
    qs = [json.loads(line) for line in open(SPEC_BENCH_FILE)]
    ps = [eng.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}])
          for q in qs[::10][: args.prompts]]
    last: dict[str, object] = {"n": None}
    if mode != "off":
        trim = eng.spec._trim

        def counting_trim(scheduled, drafts):
            trim(scheduled, drafts)
            last["n"] = sum(len(d) for d in drafts.tokens)

        eng.spec._trim = counting_trim
    times, committed = collections.defaultdict(list), collections.defaultdict(list)

    def run(tag: str, record: bool) -> float:
        seconds, tokens = 0.0, 0
        for i, p in enumerate(ps):
            seq = eng.add_request(GenerationRequest(f"{tag}{i}", tuple(p), SamplingParams(
                max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True), SpecParams(mode=mode)))
            first = True
            while eng.has_unfinished():
                last["n"] = "plain" if mode == "off" else None
                before = seq.num_output
                t = time.perf_counter()
                eng.step()
                dt = time.perf_counter() - t
                if first:  # the step that ends the prompt
                    first = False
                    continue
                if record:
                    times[last["n"]].append(dt)
                    committed[last["n"]].append(seq.num_output - before)
                seconds += dt
            tokens += seq.num_output
        return tokens / seconds

    run("w", False)
    tps = run("r", True)
    print(f"{mode} {args.drafter} T={args.temperature}: decoding {tps:.1f} tokens/s")
    for k in sorted(times, key=str):
        v = times[k]
        print(f"  drafts {k!s:6} steps {len(v):5d}  median {statistics.median(v) * 1e3:6.2f} ms  "
              f"mean {statistics.mean(v) * 1e3:6.2f} ms  tokens/step {statistics.mean(committed[k]):.2f}")
    spent, calls = collections.defaultdict(float), collections.defaultdict(int)

    def timed(obj, name: str, label: str) -> None:
        f = getattr(obj, name)

        @functools.wraps(f)
        def g(*a, **k):
            t = time.perf_counter()
            r = f(*a, **k)
            spent[label] += time.perf_counter() - t
            calls[label] += 1
            return r

        setattr(obj, name, g)

    if mode != "off":
        timed(eng.spec.drafter, "propose", "drafting")
        timed(eng.spec.drafter, "observe", "observe")
        timed(eng.spec, "begin", "begin (drafting included)")
        timed(eng.spec, "finish", "after the pass")
    timed(eng.runner, "forward", "pass")
    by_size = collections.defaultdict(list)  # one-sequence passes: tokens in the pass -> seconds
    fwd = eng.runner.forward

    @functools.wraps(fwd)
    def sized(chunks, *a, **k):
        t = time.perf_counter()
        r = fwd(chunks, *a, **k)
        if len(chunks) == 1:
            by_size[len(chunks[0].token_ids)].append(time.perf_counter() - t)
        return r

    eng.runner.forward = sized
    timed(eng, "_sample", "plain sampling")
    t0 = time.perf_counter()
    run("x", False)
    total = time.perf_counter() - t0
    steps = calls["pass"]
    print("  ms per step:", {k: round(v / steps * 1e3, 3) for k, v in spent.items()}, "step", round(total / steps * 1e3, 2))
    one = statistics.median(by_size[1]) if by_size[1] else None
    for n in sorted(k for k in by_size if k <= 16 and len(by_size[k]) >= 5):
        med = statistics.median(by_size[n])
        rel = f"  {med / one:.2f}x one token" if one else ""
        print(f"  pass over {n:2d} tokens: {len(by_size[n]):5d} passes  median {med * 1e3:6.2f} ms{rel}")


if __name__ == "__main__":
    main()
