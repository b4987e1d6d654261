"""Where a prompt's prefill goes: `off`, one request at a time, one generated token each.

    python benchmarks/prefill_profile.py [--prompts 30] [--profile 10]
    python benchmarks/prefill_profile.py --prompts 0 --profile 0 --lengths 512,1024,2048,4096 [--llamacpp]

Times the prefill of every 8th Spec-Bench first turn (prompt tokens per second, after three
warm-up prompts), then runs `--profile` other prompts (every 8th from the 4th: none of them in
the prefix cache) under the torch profiler and prints its operators by their own CPU time.

`--lengths`: long prompts, cut to each length from the text of every 3rd Spec-Bench first turn
run together (each one shifted by a few tokens, so that none starts with a cached prefix), and the
seconds to their first token. `--llamacpp` times llama.cpp (llama-cpp-python, `make
llamacpp-install`) on the same token ids with the bundled GGUF, without and with its flash
attention.
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
    ap.add_argument("--lengths", default="", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--llamacpp", action="store_true", help="with --lengths: llama.cpp on the same tokens")
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
    if timed:
        seconds = sum(prefill(p, f"t{i}") for i, p in enumerate(timed))
        tokens = sum(map(len, timed))
        print(f"{len(timed)} prompts, {statistics.mean(map(len, timed)):.0f} tokens on average (longest {max(map(len, timed))}): "
              f"{tokens / seconds:.0f} prompt tokens/s, {1000 * seconds / tokens:.2f} ms a token")
    if args.lengths:
        long_prompts(eng, prefill, [q["turns"][0] for q in qs[::3]],
                     [int(n) for n in args.lengths.split(",")], args.llamacpp, args.threads)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        others = [chat(q) for q in qs[3::8][: args.profile]]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i, p in enumerate(others):
                prefill(p, f"p{i}")
        print(f"profiled: {len(others)} prompts, {sum(map(len, others))} tokens")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def long_prompts(eng, prefill, turns: list[str], lengths: list[int], llamacpp: bool, threads: int) -> None:
    ids = [t for turn in turns for t in eng.tokenizer.encode(turn + "\n\n")]
    if len(ids) < max(lengths) + 8 * len(lengths):
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --lengths asks for")
    prompts = [tuple(ids[7 * (i + 1):7 * (i + 1) + n]) for i, n in enumerate(lengths)]
    prefill(tuple(ids[-300:]), "warm-long")
    for n, p in zip(lengths, prompts):
        dt = prefill(p, f"long{n}")
        print(f"via-sd off    {n:5d} tokens: {dt:6.2f} s to the first token, {n / dt:4.0f} prompt tokens/s", flush=True)
    if not llamacpp:
        return
    from llama_cpp import Llama

    from server.engine.model_files import bundled_gguf_path

    for fa in (False, True):
        llm = Llama(model_path=str(bundled_gguf_path()), n_ctx=max(lengths) + 16, n_batch=512, n_threads=threads,
                    n_threads_batch=threads, flash_attn=fa, verbose=False)
        llm.eval(list(ids[-300:]))  # warm-up
        for n, p in zip(lengths, prompts):
            llm.reset()
            t = time.perf_counter()
            llm.eval(list(p))
            dt = time.perf_counter() - t
            print(f"llama.cpp{' fa' if fa else '   '} {n:5d} tokens: {dt:6.2f} s to the first token, {n / dt:4.0f} prompt tokens/s",
                  flush=True)
        del llm


if __name__ == "__main__":
    main()
