"""Runs one vLLM scenario in a fresh process and prints one JSON line (`RESULT {...}`).

vLLM starts an engine-core process and worker processes; keeping each engine in its own short
process keeps pytest's process free of them. Usage:

    .venv-vllm/bin/python -m tests.vllm_plugin.driver SCENARIO MODEL_FOLDER [MAX_TOKENS] [--bench]

Scenarios (all greedy, fp32, batch of PROMPTS sent concurrently):
    off          plain vLLM, no plugin, no speculation: the reference output
    prune        plugin worker, schedule "prune"; first half of the prompts as `binary` requests
                 (slim tier off), second half as `three_tier`
    skip_exact   schedule "skip" with a route that skips nothing and thresholds that accept only
                 the argmax: exercises the skip path (emission, rollback, backfill) exactly
    skip         schedule "skip", default route, escalate_threshold 0: the lossy schedule with
                 full passes skipped
    skip_default schedule "skip" with the engine defaults (for measurements)
    lenient      schedule "prune", full_accept_threshold 0 without the repetition guard: the
                 full model keeps every draft of the `three_tier` requests (second half); the
                 first half are `binary` requests in the same batches
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "List the days of the week: Monday, Tuesday,",
]


def scenario_config(name: str, folder: str):
    from server.engine.config import EngineConfig

    base = EngineConfig(model=folder, max_model_len=1024, max_num_seqs=8, kv_cache_memory_gb=1.0)
    if name == "off":
        return base.with_spec(mode="off"), "skip"
    if name == "prune":
        return base.with_spec(mode="three_tier"), "prune"
    if name == "skip_exact":
        return base.with_spec(mode="three_tier", accept_threshold=1.0, escalate_threshold=1.0, bonus_confidence=0.0, slim_route={"skip": []}), "skip"
    if name == "skip":
        # never tier C: every step whose drafts all reach the gate runs without the full model
        # until the backlog bound forces one (lossy by design; default thresholds escalate on
        # nearly every n-gram draft, see DESIGN.md section 6)
        return base.with_spec(mode="three_tier", escalate_threshold=0.0, bonus_confidence=0.5), "skip"
    if name == "skip_default":
        return base.with_spec(mode="three_tier"), "skip"
    if name == "lenient":
        return base.with_spec(mode="three_tier", full_accept_threshold=0.0, lenient_no_repeat=0), "prune"
    raise SystemExit(f"unknown scenario {name!r}")


async def run(name: str, folder: str, max_tokens: int, bench: bool = False) -> dict:
    from server.engine.api import GenerationRequest
    from server.engine.config import SamplingParams, SpecParams
    from server.vllm_plugin.backend import VLLMAsyncEngine

    config, schedule = scenario_config(name, folder)
    eng = VLLMAsyncEngine(config, schedule=schedule)
    t0 = time.time()
    await eng.start()
    load_s = time.time() - t0
    tok = eng.tokenizer
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: str):
        mode = "binary" if (name in ("prune", "lenient") and i < len(PROMPTS) // 2) else None
        req = GenerationRequest(f"r{i}-{uuid.uuid4().hex[:6]}", tuple(tok.encode(prompt)), sp, SpecParams(mode=mode))
        ids, text, last = [], "", None
        async for d in eng.generate(req):
            ids += d.token_ids
            text += d.text
            last = d
        return {"prompt": prompt, "mode": mode or config.spec.mode, "token_ids": ids, "text": text,
                "finish_reason": last.finish_reason, "completion_tokens": last.completion_tokens,
                "via_sd": last.via_sd.to_dict()}

    single_tps = None
    if bench:  # warm-up, then one timed batch-1 request
        await one(99, "Hello")
        t = time.time()
        single = await one(0, PROMPTS[1])
        single_tps = len(single["token_ids"]) / (time.time() - t)
    t = time.time()
    outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
    batch_s = time.time() - t
    stats = await eng.refresh_stats()
    totals = dict(eng._worker_totals)
    await eng.shutdown(grace_s=1.0)
    return {"scenario": name, "load_s": load_s, "single_tokens_per_s": single_tps, "batch_s": batch_s,
            "outputs": outs, "stats": stats.__dict__, "worker_totals": totals}


def main() -> None:
    name, folder = sys.argv[1], sys.argv[2]
    max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 48
    res = asyncio.run(run(name, folder, max_tokens, bench="--bench" in sys.argv))
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
