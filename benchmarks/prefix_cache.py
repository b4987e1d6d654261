"""What the prefix cache buys a chat: the second turn of MT-Bench conversations, with and without it.

    python benchmarks/prefix_cache.py --questions 20 --max-tokens 128 --mode off --out benchmarks/results/prefix_cache.json

For each of the first --questions MT-Bench questions of Spec-Bench (two user turns each), one
engine answers turn 1, then turn 2 with the conversation so far (turn 1, its answer, turn 2),
as a chat client sends it. Two engines in the same process, one with the prefix cache and one
without, take turns question by question. Reported: time to first token of turn 2 (mean and
median), the prompt tokens it had and the share found in the cache, tokens/s over both turns,
and whether both engines wrote the same text (greedy). The first question of each engine is a
warm-up and not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from server.bench.cli import machine_info
from server.bench.prompts import SPEC_BENCH_FILE
from server.engine.api import GenerationRequest
from server.engine.config import EngineConfig, SamplingParams, SpecConfig, SpecParams
from server.engine.engine import LLMEngine
from server.engine.model_files import prepare_model



def conversations(path: Path, n: int) -> list[list[str]]:
    out = []
    for line in path.read_text().splitlines():
        q = json.loads(line)
        if len(q.get("turns", [])) >= 2:
            out.append([str(t) for t in q["turns"][:2]])
        if len(out) == n:
            break
    return out


def chat(engine: LLMEngine, turns: list[str], max_tokens: int, mode: str, rid: str) -> dict:
    tok, msgs, rec = engine.tokenizer, [], {"ttft": [], "prompt": [], "cached": [], "text": [], "tokens": 0}
    t0 = time.perf_counter()
    for k, turn in enumerate(turns):
        msgs.append({"role": "user", "content": turn})
        ids = tuple(tok.apply_chat_template(msgs))
        (r,) = engine.generate([GenerationRequest(f"{rid}-{k}", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                                                  SpecParams(mode=mode))])
        rec["ttft"].append(r.first_token_time)
        rec["prompt"].append(len(ids))
        rec["cached"].append(r.cached_tokens)
        rec["text"].append(r.text)
        rec["tokens"] += len(r.token_ids)
        msgs.append({"role": "assistant", "content": r.text})
    rec["seconds"] = time.perf_counter() - t0
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--mode", default="off")
    ap.add_argument("--drafter", default="hybrid")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default=str(SPEC_BENCH_FILE))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    folder = prepare_model()
    convs = conversations(Path(args.prompts), args.questions + 1)
    engines = {}
    for name, on in (("cache", True), ("no_cache", False)):
        engines[name] = LLMEngine(EngineConfig(model=str(folder), num_threads=args.threads, enable_prefix_caching=on,
                                               spec=SpecConfig(mode=args.mode, drafter=args.drafter)))
    runs: dict[str, list[dict]] = {n: [] for n in engines}
    for i, turns in enumerate(convs):
        order = list(engines) if i % 2 == 0 else list(reversed(engines))
        for name in order:
            rec = chat(engines[name], turns, args.max_tokens, args.mode, f"{name}{i}")
            if i:  # the first conversation warms each engine up
                runs[name].append(rec)
        print(f"[{i}/{len(convs) - 1}] turn 2: {runs['cache'][-1]['prompt'][1] if i else '-'} prompt tokens", flush=True)
    report = {"machine": machine_info(args.threads),
              "model": folder.name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": "python benchmarks/prefix_cache.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "prompts"),
              "conversations": len(convs) - 1}
    for name, recs in runs.items():
        t2 = [r["ttft"][1] for r in recs]
        report[name] = {
            "turn2_ttft_mean_s": round(statistics.mean(t2), 4), "turn2_ttft_median_s": round(statistics.median(t2), 4),
            "turn1_ttft_mean_s": round(statistics.mean(r["ttft"][0] for r in recs), 4),
            "turn2_prompt_tokens_mean": round(statistics.mean(r["prompt"][1] for r in recs), 1),
            "turn2_cached_share": round(sum(r["cached"][1] for r in recs) / sum(r["prompt"][1] for r in recs), 4),
            "tokens_per_s": round(sum(r["tokens"] for r in recs) / sum(r["seconds"] for r in recs), 2),
        }
    report["same_text"] = sum(a["text"] == b["text"] for a, b in zip(runs["cache"], runs["no_cache"])) / len(runs["cache"])
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
