"""Engine throughput: batch-1 decode speed and total throughput with N concurrent requests.

    python benchmarks/engine_throughput.py --concurrency 1,16 --max-tokens 128 --mode off [--kv-cache-dtype fp16]
    python benchmarks/engine_throughput.py --prefill 60

--prefill N instead times prompts alone: N Spec-Bench first turns spread over the file (every 8th,
any length), one after another, one token each, prefix cache off: prompt tokens/s and mean time
to first token.

Greedy (or `--temperature T`, request i seeded i), fp32, the bundled model, Spec-Bench first turns (chat template), `ignore_eos` so every
request decodes exactly --max-tokens tokens; a warm-up request is excluded. With --profile, a
torch profiler table of one batch-1 request shows where the time goes. --out's JSON keeps every
request's token ids (`outputs`), so two runs (say, the two K/V cache types) can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from server.bench.prompts import SPEC_BENCH_FILE
from server.engine.api import GenerationRequest
from server.engine.config import KV_CACHE_DTYPES, EngineConfig, SamplingParams, SpecConfig, SpecParams
from server.engine.engine import LLMEngine
from server.engine.model_files import prepare_model



def prompts(tok, n: int) -> list[list[int]]:
    out = []
    with open(SPEC_BENCH_FILE) as f:
        for line in f:
            q = json.loads(line)
            ids = tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}])
            if len(ids) <= 256:
                out.append(ids)
            if len(out) == n:
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (request i seeded i) instead of greedy decoding")
    ap.add_argument("--mode", default="off")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    ap.add_argument("--out", default=None)
    ap.add_argument("--prefill", type=int, default=0)
    args = ap.parse_args()
    if args.prefill:
        return prefill(args)
    torch.set_num_threads(args.threads)
    folder = prepare_model(None, progress=False)
    eng = LLMEngine(EngineConfig(model=str(folder), spec=SpecConfig(mode=args.mode), max_num_seqs=256,
                                 kv_cache_dtype=args.kv_cache_dtype))
    levels = [int(c) for c in args.concurrency.split(",")]
    ps = prompts(eng.tokenizer, max(levels))

    def run(batch: list[list[int]], tag: str):
        reqs = [GenerationRequest(f"{tag}{i}", tuple(p), SamplingParams(max_tokens=args.max_tokens,
                                                                         temperature=args.temperature, seed=i,
                                                                         ignore_eos=True), SpecParams(mode=args.mode))
                for i, p in enumerate(batch)]
        t = time.perf_counter()
        res = eng.generate(reqs)
        dt = time.perf_counter() - t
        outputs[tag] = [list(r.token_ids) for r in res]
        return sum(len(r.token_ids) for r in res), dt

    outputs: dict[str, list[list[int]]] = {}  # per run tag: each request's token ids
    run(ps[:1], "warm")
    rows = []
    for c in levels:
        if c == 1:  # batch 1: requests one after another
            toks, dt = 0, 0.0
            for i in range(min(4, len(ps))):
                a, b = run([ps[i]], f"b1-{i}-")
                toks, dt = toks + a, dt + b
        else:
            toks, dt = run(ps[:c], f"c{c}-")
        rows.append({"concurrency": c, "tokens": toks, "seconds": round(dt, 2), "tokens_per_s": round(toks / dt, 1)})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_batch1"] = round(r["tokens_per_s"] / base, 2)
    report = {**header(args, folder), "mode": args.mode, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "kv_cache_dtype": args.kv_cache_dtype, "rows": rows}
    print(json.dumps(report, indent=1))
    report["outputs"] = outputs  # after the print: token ids, to compare runs (e.g. the cache types)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            run(ps[:1], "prof")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def header(args, folder: Path) -> dict:
    """What every report of this script starts with: the machine, the model, the date, the load."""
    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
            "model": folder.name, "date": time.strftime("%Y-%m-%d"), "load_average_at_start": os.getloadavg()[0],
            "onednn": os.environ.get("VIA_SD_ONEDNN", "1") != "0"}


def prefill(args) -> None:
    torch.set_num_threads(args.threads)
    folder = prepare_model(None, progress=False)
    eng = LLMEngine(EngineConfig(model=str(folder), spec=SpecConfig(mode="off"), enable_prefix_caching=False))
    with open(SPEC_BENCH_FILE) as f:
        qs = [json.loads(line) for line in f][::8][: args.prefill]
    ps = [eng.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}]) for q in qs]

    def run(tag: str) -> dict:
        t = time.perf_counter()
        for i, p in enumerate(ps):
            eng.generate([GenerationRequest(f"{tag}{i}", tuple(p), SamplingParams(max_tokens=1, temperature=0),
                                            SpecParams(mode="off"))])
        dt = time.perf_counter() - t
        n = sum(map(len, ps))
        return {"prompts": len(ps), "prompt_tokens": n, "seconds": round(dt, 2), "prompt_tokens_per_s": round(n / dt, 1),
                "mean_ttft_ms": round(dt / len(ps) * 1e3, 1)}

    run("warm")
    report = {**header(args, folder), "prefill": run("run")}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
