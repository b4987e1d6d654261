"""Benchmark rows in a process of their own: `python -m server.bench.worker JOB.json RESULT.json`.

The job (written by `server.bench.runner`) names one row (`row`: kind engine, hf or llamacpp) or several
engine rows to interleave (`rows`), the model folder, the prompts as token ids and the sampling
settings. The worker loads the model, runs one warm-up generation per row that is not timed, then
generates the prompts one at a time at batch 1 (interleaved rows take turns prompt by prompt) and
writes, per row and prompt, the output token ids, the wall time and the counts the report needs:

- `steps`: forward passes that committed tokens (a plain decode, a speculative step; the
  prompt's own pass counts when it emits the first token);
- `full_passes`: those of them that ran the full model;
- `draft_tokens`, `accepted`, `tier_accept`, `tier_slim`, `tier_full`, `slim_on`, `slim_off`.

A row that cannot run (a drafter without its weights, a missing package) writes
`{"ok": false, "error": ...}` and exits 0, so that the other rows still run.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from tqdm import tqdm


def _progress(job: dict, n: int):
    return tqdm(total=n, desc=f"{job['row']['name']:>14}", unit="prompt", file=sys.stderr,
                disable=not job.get("progress", True), leave=True, dynamic_ncols=True)


# ------------------------------------------------------------------ the embedded engine
def _engine(job: dict, row: dict, model=None, tokenizer=None):
    from server.engine.config import EngineConfig, SpecConfig
    from server.engine.engine import LLMEngine

    spec_kw = {"mode": row["mode"]}
    if row.get("drafter"):
        spec_kw["drafter"] = row["drafter"]
    if job.get("head_path"):
        spec_kw["head_path"] = job["head_path"]
    spec_kw.update(row.get("params") or {})  # a row's own head (`--draft-head A,B`) wins
    # no prefix cache, as for the vLLM rows: the warm-up ran the first prompt, every chat prompt
    # shares its template, and a repeated prompt would be read from the cache, not computed.
    # The KV cache holds one request (batch 1: the longest prompt, max_tokens and up to 64 draft
    # slots, and the null block), so that many engines fit in one process.
    bs = EngineConfig().block_size
    blocks = -(-(int(job["max_model_len"]) + 64) // bs) + 1 if job.get("max_model_len") else None
    prefill = (row.get("engine") or {}).get("prefill_dtype", job.get("prefill_dtype", "auto"))
    return LLMEngine(EngineConfig(model=job["model"], dtype=job.get("dtype", "float32"), num_threads=job["threads"],
                                  spec=SpecConfig(**spec_kw), enable_prefix_caching=False, num_blocks=blocks,
                                  kv_cache_dtype=job.get("kv_cache_dtype", "auto"),
                                  prefill_dtype=prefill),
                     model=model, tokenizer=tokenizer)


def _request(job: dict, i: int, ids: list[int], max_tokens: int):
    from server.engine.api import GenerationRequest
    from server.engine.config import SamplingParams, SpecParams

    temp = job["temperature"]
    seed = None if temp == 0 or job.get("unseeded") else job["seed"] + i
    return GenerationRequest(f"bench-{i}", tuple(ids), SamplingParams(max_tokens=max_tokens, temperature=temp, seed=seed),
                             SpecParams())


def _generate_one(engine, job: dict, row: dict, i: int, p: dict) -> dict:
    """Prompt `i` through `engine`, timed, with the counts the report needs."""
    before = engine.stats()
    t = time.perf_counter()
    res = engine.generate([_request(job, i, p["prompt_token_ids"], job["max_tokens"])])[0]
    seconds = time.perf_counter() - t
    after = engine.stats()
    u = res.via_sd
    n = len(res.token_ids)
    spec = row["mode"] != "off" and u.steps > 0
    d = {k: getattr(after, k) - getattr(before, k)
         for k in ("tier_accept", "tier_slim", "tier_full", "controller_slim_on", "controller_slim_off")}
    return {
        "question_id": p["question_id"], "token_ids": res.token_ids, "seconds": seconds,
        "ttft": res.first_token_time, "finish_reason": res.finish_reason,
        "steps": u.steps if spec else n, "full_passes": u.full_passes if spec else n,
        "slim_passes": u.slim_passes, "draft_tokens": u.draft_tokens, "accepted": u.accepted,
        "tier_accept": d["tier_accept"], "tier_slim": d["tier_slim"], "tier_full": d["tier_full"],
        "slim_on": d["controller_slim_on"], "slim_off": d["controller_slim_off"],
        "lenient": u.lenient_accepted,
    }


def run_engine(job: dict) -> dict:
    """One engine row: `run_engines` with the row alone."""
    return run_engines({**job, "rows": [job["row"]]})["rows"][job["row"]["name"]]


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of `n` rows in which each row takes each place equally often and follows each other
    row equally often (a Williams design: 0, 1, n-1, 2, n-2, ... shifted by one per order; for odd
    `n` the reversed orders too, 2n orders in all). A row's time can depend on the row before it
    (what that one left in the caches and the allocator); rotating one fixed order keeps the same
    neighbours, so such an effect fell on some rows and not others: in 5- and 9-row runs
    `three_tier` (always after a `binary` row with the head drafter) read 0.986x `binary` (always
    after `off`), in a 3-row run 1.003x."""
    if n <= 1:
        return [list(range(n))]
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    orders = [[(x + k) % n for x in first] for k in range(n)]
    return orders + [o[::-1] for o in orders] if n % 2 else orders


def run_engines(job: dict) -> dict:
    """Several engine rows in one process, taking turns prompt by prompt: prompt i runs through
    every row before prompt i+1 runs through any, in an order that changes each prompt
    (`balanced_orders`). A drift in the machine's speed (another tenant, the clock) then falls on
    every row alike, where rows run one after another meet different parts of it, and so does
    whatever a row's time owes to the row before it. The rows share one copy of the weights
    (the model holds no per-request state); each has its own engine and KV cache.

    Returns `{"rows": {name: result}}`, each result `{"ok": true, "outputs": [...], ...}` or
    `{"ok": false, "error": ...}` for a row that could not be built or failed on a prompt."""
    import torch

    rows = job["rows"]
    engines, results = {}, {}
    model = tokenizer = None
    for row in rows:
        name = row["name"]
        try:
            t0 = time.perf_counter()
            if model is None:
                engine = _engine(job, row)
                model, tokenizer = engine.model, engine.tokenizer
            else:
                engine = _engine(job, row, model=model, tokenizer=tokenizer)
            results[name] = {"ok": True, "name": name, "load_seconds": time.perf_counter() - t0, "outputs": [],
                             "torch_threads": torch.get_num_threads(), "interleaved": len(rows)}
            engines[name] = engine
            first = job["prompts"][0]["prompt_token_ids"]
            engine.generate([_request(job, -1, first, job["warmup_tokens"])])
        except Exception as e:  # this row is reported as failed; the others run
            results[name] = {"ok": False, "name": name, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()}
            engines.pop(name, None)
    live = [r for r in rows if r["name"] in engines]
    prompts = job["prompts"]
    label = rows[0]["name"] if len(rows) == 1 else f"{len(live)} rows"
    orders = balanced_orders(len(live))
    with _progress({**job, "row": {"name": label}}, len(prompts)) as bar:
        for i, p in enumerate(prompts):
            for row in (live[j] for j in orders[i % len(orders)]):
                name = row["name"]
                if not results[name]["ok"]:
                    continue
                try:
                    results[name]["outputs"].append(_generate_one(engines[name], job, row, i, p))
                except Exception as e:
                    results[name] = {"ok": False, "name": name, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()}
                    engines.pop(name, None)
            bar.update(1)
    return {"rows": results}


# ------------------------------------------------------------------ Hugging Face transformers
class _FirstTokenTimer:
    """A `generate` streamer that only notes when the first new token arrives."""

    def __init__(self):
        self.calls = 0
        self.t0 = 0.0
        self.first: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the first call carries the prompt
            self.first = time.perf_counter() - self.t0

    def end(self):
        pass


def _counted_output(p: dict, toks: list[int], seconds: float, ttft: float | None, eos, passes: int,
                    lookup: bool) -> dict:
    """A peer's result for prompt `p` whose target passes were counted (`passes`, the prompt's
    included): with prompt lookup, each pass emits its accepted drafts plus one token."""
    return {
        "question_id": p["question_id"], "token_ids": toks, "seconds": seconds, "ttft": ttft,
        "finish_reason": "stop" if toks and toks[-1] in eos else "length",
        "steps": passes, "full_passes": passes, "slim_passes": 0,
        "draft_tokens": None, "accepted": max(0, len(toks) - passes) if lookup else 0,
        "tier_accept": 0, "tier_slim": 0, "tier_full": None, "slim_on": 0, "slim_off": 0,
    }


def run_hf(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    row = job["row"]
    torch.set_num_threads(job["threads"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, local_files_only=True)
    model.eval()
    load_s = time.perf_counter() - t0
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    eos = list(job["eos_token_ids"])
    temp = job["temperature"]
    kw = {"do_sample": temp > 0, "eos_token_id": eos, "pad_token_id": eos[0]}
    if temp > 0:
        kw.update(temperature=temp, top_k=0, top_p=1.0)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    if row.get("prompt_lookup_num_tokens"):
        kw["prompt_lookup_num_tokens"] = int(row["prompt_lookup_num_tokens"])
        if row.get("max_matching_ngram_size"):
            kw["max_matching_ngram_size"] = int(row["max_matching_ngram_size"])

    def gen(ids: list[int], max_tokens: int, seed: int, timer=None) -> list[int]:
        x = torch.tensor([ids])
        if temp > 0:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, streamer=timer, **kw)
        return out[0, len(ids):].tolist()

    prompts = job["prompts"]
    gen(prompts[0]["prompt_token_ids"], job["warmup_tokens"], job["seed"])
    outputs = []
    with _progress(job, len(prompts)) as bar:
        for i, p in enumerate(prompts):
            timer = _FirstTokenTimer()
            c0 = calls[0]
            timer.t0 = t = time.perf_counter()
            toks = gen(p["prompt_token_ids"], job["max_tokens"], job["seed"] + i, timer)
            seconds = time.perf_counter() - t
            # `generate` pads nothing at batch 1, but cut at the first eos to be safe
            for j, tk in enumerate(toks):
                if tk in eos:
                    toks = toks[: j + 1]
                    break
            outputs.append(_counted_output(p, toks, seconds, timer.first, eos, calls[0] - c0,
                                           bool(row.get("prompt_lookup_num_tokens"))))
            bar.update(1)
    return {"load_seconds": load_s, "outputs": outputs, "torch_threads": torch.get_num_threads()}


def run_llamacpp(job: dict) -> dict:
    """llama.cpp through llama-cpp-python on the model's GGUF file (`job["gguf"]`), with its own
    arithmetic (the GGUF's quantized blocks against 8-bit activations, not fp32): plain, or with
    its prompt-lookup drafter (`row["prompt_lookup"]`). The prompt's token ids go in as they are;
    the context is reset before each prompt (llama-cpp-python would otherwise reuse the K/V of a
    prefix the previous prompt shared). Each `eval` call is a pass: the prompt's, then one a step
    (the sampled token and its drafts)."""
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeError("llama-cpp-python is not installed (make llamacpp-install)") from None
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    row = job["row"]
    if not job.get("gguf"):
        raise RuntimeError("no GGUF file for this model (llama.cpp reads only GGUF; put one *.gguf in the model folder)")
    threads = job["threads"]
    lookup = row.get("prompt_lookup")
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["max_model_len"], n_batch=512, n_threads=threads,
                          n_threads_batch=threads, seed=job["seed"], verbose=False,
                          # drafts are checked against the logits of every position of a pass
                          logits_all=bool(lookup),
                          draft_model=LlamaPromptLookupDecoding(**lookup) if lookup else None)
    load_s = time.perf_counter() - t0
    calls = [0]
    inner_eval = llm.eval

    def counted_eval(tokens):
        calls[0] += 1
        return inner_eval(tokens)

    llm.eval = counted_eval
    eos = set(job["eos_token_ids"])
    temp = job["temperature"]
    # greedy is llama.cpp's temp 0; sampled: the full distribution at the temperature, as the others
    kw = {"temp": temp, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0} if temp > 0 else {"temp": 0.0}

    def gen(ids: list[int], max_tokens: int, seed: int) -> tuple[list[int], float | None]:
        llm.reset()
        if temp > 0:
            llm.set_seed(seed)
        toks: list[int] = []
        first = None
        t = time.perf_counter()
        for tk in llm.generate(ids, reset=True, **kw):
            if first is None:
                first = time.perf_counter() - t
            toks.append(int(tk))
            if tk in eos or len(toks) >= max_tokens:
                break
        return toks, first

    prompts = job["prompts"]
    gen(prompts[0]["prompt_token_ids"], job["warmup_tokens"], job["seed"])
    outputs = []
    with _progress(job, len(prompts)) as bar:
        for i, p in enumerate(prompts):
            c0 = calls[0]
            t = time.perf_counter()
            toks, first = gen(p["prompt_token_ids"], job["max_tokens"], job["seed"] + i)
            seconds = time.perf_counter() - t
            outputs.append(_counted_output(p, toks, seconds, first, eos, calls[0] - c0, bool(lookup)))
            bar.update(1)
    return {"load_seconds": load_s, "outputs": outputs, "llama_cpp_version": llama_cpp.__version__,
            "threads": threads}


RUNNERS = {"engine": run_engine, "hf": run_hf, "llamacpp": run_llamacpp}


def run_job(job: dict) -> dict:
    """`job["rows"]`: engine rows interleaved (`run_engines`); `job["row"]`: one row."""
    if "rows" in job:
        return {**run_engines(job), "ok": True}
    return RUNNERS[job["row"]["kind"]](job)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m server.bench.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    name = job["row"]["name"] if "row" in job else ",".join(r["name"] for r in job["rows"])
    try:
        res = run_job(job)  # an engine row that could not run comes back with ok false
        res.setdefault("ok", True)
        res["name"] = name
    except Exception as e:  # a row that cannot run is reported, not fatal
        res = {"ok": False, "name": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    Path(argv[1]).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
