"""One vLLM row, run by the vLLM environment's python as a plain script:

    .venv-vllm/bin/python server/bench/vllm_worker.py JOB.json RESULT.json

It imports nothing from via-sd (that environment need not have it installed) and writes the
same result shape as `server.bench.worker`. Rows: `vllm` (plain), `vllm_ngram`
(`speculative_config={"method": "ngram", ...}`) and `vllm_three_tier` (the same drafts, with the
via-sd plugin's worker from `vllm_kwargs`), fp32, eager, one prompt at a time.
Counts come from `LLM.get_metrics()`: every target pass emits its accepted drafts plus one token,
so passes = tokens - accepted.
"""

import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def _counters(llm) -> dict:
    out = {}
    try:
        from vllm.v1.metrics.reader import Counter
    except ImportError:
        return out
    try:
        for m in llm.get_metrics():
            if isinstance(m, Counter) and m.name.startswith("vllm:spec_decode"):
                out[m.name] = out.get(m.name, 0) + int(m.value)
    except Exception:  # metrics are optional; the row still has its speed
        pass
    return out


def llm_kwargs(job: dict) -> dict:
    """`vllm.LLM`'s arguments for a row: fp32 and eager like our engine, and no prefix cache,
    which our engine does not have (the warm-up runs the first prompt, and every chat prompt
    starts with the same template)."""
    row = job["row"]
    kw = dict(model=job["model"], dtype="float32", enforce_eager=True, disable_log_stats=False, seed=job["seed"],
              max_model_len=job["max_model_len"], kv_cache_memory_bytes=int(job.get("kv_cache_gb", 1.0) * 2**30),
              enable_prefix_caching=False)
    if row.get("speculative_config"):
        kw["speculative_config"] = row["speculative_config"]
    kw.update(row.get("vllm_kwargs") or {})
    return kw


def run(job: dict) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    row = job["row"]
    torch.set_num_threads(job["threads"])
    kw = llm_kwargs(job)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    load_s = time.perf_counter() - t0
    temp = job["temperature"]
    eos = list(job["eos_token_ids"])

    def params(max_tokens: int, seed: int):
        return SamplingParams(temperature=temp, max_tokens=max_tokens, seed=None if temp == 0 else seed,
                              stop_token_ids=eos)

    prompts = job["prompts"]
    llm.generate([{"prompt_token_ids": prompts[0]["prompt_token_ids"]}], params(job["warmup_tokens"], job["seed"]),
                 use_tqdm=False)
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=f"{row['name']:>14}", unit="prompt", file=sys.stderr,
                   disable=not job.get("progress", True))
    except ImportError:
        bar = None
    outputs = []
    for i, p in enumerate(prompts):
        c0 = _counters(llm)
        t = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": p["prompt_token_ids"]}], params(job["max_tokens"], job["seed"] + i),
                           use_tqdm=False)[0]
        seconds = time.perf_counter() - t
        c1 = _counters(llm)
        o = res.outputs[0]
        toks = list(o.token_ids)
        acc = c1.get("vllm:spec_decode_num_accepted_tokens", 0) - c0.get("vllm:spec_decode_num_accepted_tokens", 0)
        drafted = c1.get("vllm:spec_decode_num_draft_tokens", 0) - c0.get("vllm:spec_decode_num_draft_tokens", 0)
        ttft = None
        m = getattr(res, "metrics", None)
        if m is not None and getattr(m, "first_token_latency", None):
            ttft = float(m.first_token_latency)
        outputs.append({
            "question_id": p["question_id"], "token_ids": toks, "seconds": seconds, "ttft": ttft,
            "finish_reason": o.finish_reason, "steps": max(1, len(toks) - acc), "full_passes": max(1, len(toks) - acc),
            "slim_passes": 0, "draft_tokens": drafted, "accepted": acc,
            "tier_accept": 0, "tier_slim": 0, "tier_full": drafted if row.get("speculative_config") else 0,
            "slim_on": 0, "slim_off": 0,
        })
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    import vllm

    return {"load_seconds": load_s, "outputs": outputs, "torch_threads": torch.get_num_threads(),
            "vllm_version": getattr(vllm, "__version__", "?")}


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: vllm_worker.py JOB.json RESULT.json", file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        job = json.load(f)
    try:
        res = run(job)
        res.update(ok=True, name=job["row"]["name"])
    except Exception as e:
        res = {"ok": False, "name": job["row"]["name"], "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()}
        print(res["traceback"], file=sys.stderr)
    with open(sys.argv[2], "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
