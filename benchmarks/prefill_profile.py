"""Where a prompt's prefill goes: `off`, one request at a time, one generated token each.

    python benchmarks/prefill_profile.py [--prompts 30] [--profile 10]

Times the prefill of every 8th Spec-Bench first turn (prompt tokens per second, after three
warm-up prompts), then runs `--profile` other prompts (every 8th from the 4th: none of them in
the prefix cache) under the torch profiler and prints its operators by their own CPU time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from server.bench.prompts import SPEC_BENCH_FILE
from server.engine.api import GenerationRequest
from server.engine.config import EngineConfig, SamplingParams, SpecConfig
from server.engine.engine import LLMEngine
from server.engine.model_files import prepare_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--profile", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eng = LLMEngine(EngineConfig(model=str(prepare_model(None, progress=False)), spec=SpecConfig(mode="off")))
    qs = [json.loads(line) for line in open(SPEC_BENCH_FILE)]

    def chat(q) -> tuple[int, ...]:
        return tuple(eng.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}]))

    def prefill(p: tuple[int, ...], rid: str) -> float:
        req = GenerationRequest(request_id=rid, prompt_token_ids=p, sampling=SamplingParams(max_tokens=1, temperature=0.0))
        t = time.perf_counter()
        eng.generate([req])
        return time.perf_counter() - t

    timed = [chat(q) for q in qs[::8][: args.prompts]]
    for i, p in enumerate(timed[:3]):
        prefill(p, f"warm{i}")
    seconds = sum(prefill(p, f"t{i}") for i, p in enumerate(timed))
    tokens = sum(map(len, timed))
    print(f"{len(timed)} prompts, {statistics.mean(map(len, timed)):.0f} tokens on average (longest {max(map(len, timed))}): "
          f"{tokens / seconds:.0f} prompt tokens/s, {1000 * seconds / tokens:.2f} ms a token")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        others = [chat(q) for q in qs[3::8][: args.profile]]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i, p in enumerate(others):
                prefill(p, f"p{i}")
        print(f"profiled: {len(others)} prompts, {sum(map(len, others))} tokens")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
