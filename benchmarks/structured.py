"""Structured outputs with and without speculation: the same constrained requests through the
embedded engine in `off`, `binary` and `three_tier`, one request at a time, modes taking turns
prompt by prompt (a drift of the machine falls on all of them alike).

Two tasks on Spec-Bench's own text (no data beyond the repository's): `extract` asks for a
summarization article's title, people and places as JSON under a schema (lookup drafts can copy
names from the article); `answer` asks a QA question for its answer as JSON. Reports per mode:
tokens/s (wall time of the request, prompt included), mean accepted tokens per step, outputs
identical to `off`, outputs that parse and follow the schema, mean output tokens.

    python benchmarks/structured.py --limit 10 --max-tokens 128 --out benchmarks/results/structured.json

`--no-schema` sends the same prompts unconstrained (what speculation buys on them anyway), and
`--frequency-penalty` / `--presence-penalty` add OpenAI's penalties (which verification applies
per draft position).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.api import GenerationRequest  # noqa: E402
from server.engine.config import EngineConfig, SamplingParams, SpecConfig, SpecParams, StructuredOutputs  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from server.engine.model_files import prepare_model  # noqa: E402

EXTRACT = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 120},
    "people": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 5},
    "places": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 5}},
    "required": ["title", "people", "places"], "additionalProperties": False}
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 200},
                                           "confident": {"type": "boolean"}},
          "required": ["answer", "confident"], "additionalProperties": False}


def follows(schema: dict, text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == set(schema["required"])


def tasks(path: Path, limit: int):
    rows = [json.loads(line) for line in path.open()]
    out = []
    for r in [r for r in rows if r["category"] == "summarization"][:limit]:
        article = r["turns"][0].removeprefix("Summarize:").strip()
        out.append(("extract", EXTRACT, f"Read the article and give its title, the people and the places it names, "
                                        f"as JSON.\n\n{article}"))
    for r in [r for r in rows if r["category"] == "qa"][:limit]:
        out.append(("answer", ANSWER, f"{r['turns'][0]}\nAnswer as JSON with the answer and whether you are sure."))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default="../shared/data/spec_bench/question.jsonl")
    ap.add_argument("--limit", type=int, default=10, help="prompts per task")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--modes", default="off,binary,three_tier")
    ap.add_argument("--no-schema", action="store_true", help="the same prompts without a constraint")
    ap.add_argument("--frequency-penalty", type=float, default=0.0)
    ap.add_argument("--presence-penalty", type=float, default=0.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    folder = prepare_model(None, progress=False)
    modes = args.modes.split(",")
    # without the prefix cache: each mode reads the prompt itself
    engine = LLMEngine(EngineConfig(model=str(folder), spec=SpecConfig(mode="three_tier"), enable_prefix_caching=False))
    tok = engine.tokenizer
    items = tasks(Path(args.prompts), args.limit)
    # warm-up, not counted
    engine.generate([GenerationRequest("warm", tuple(tok.apply_chat_template([{"role": "user", "content": "Hi"}])),
                                       SamplingParams(max_tokens=8, temperature=0.0), SpecParams(mode=m))
                     for m in modes[:1]])
    rows = {m: [] for m in modes}
    for i, (task, schema, text) in enumerate(items):
        ids = tuple(tok.apply_chat_template([{"role": "user", "content": text}]))
        so = None if args.no_schema else StructuredOutputs(json=json.dumps(schema))
        order = modes[i % len(modes):] + modes[: i % len(modes)]
        for m in order:
            t0 = time.perf_counter()
            (r,) = engine.generate([GenerationRequest(f"{m}{i}", ids, SamplingParams(
                max_tokens=args.max_tokens, temperature=0.0, structured_outputs=so,
                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty), SpecParams(mode=m))])
            dt = time.perf_counter() - t0
            rows[m].append({"task": task, "tokens": len(r.token_ids), "seconds": dt, "text": r.text,
                            "steps": r.via_sd.steps or len(r.token_ids), "accepted": r.via_sd.accepted,
                            "drafts": r.via_sd.draft_tokens, "finish": r.finish_reason,
                            "valid": follows(schema, r.text)})
        print(f"{i + 1}/{len(items)} {task}: " + "  ".join(
            f"{m} {rows[m][-1]['tokens'] / rows[m][-1]['seconds']:.1f} tok/s" for m in modes), flush=True)
    summary = {}
    for m in modes:
        rs = rows[m]
        toks, secs = sum(r["tokens"] for r in rs), sum(r["seconds"] for r in rs)
        summary[m] = {
            "tokens_per_s": toks / secs,
            "tokens_per_step": toks / max(1, sum(r["steps"] for r in rs)),
            "identical_to_off": sum(r["text"] == o["text"] for r, o in zip(rs, rows[modes[0]])),
            "valid": sum(r["valid"] for r in rs),
            "finished_stop": sum(r["finish"] == "stop" for r in rs),
            "mean_tokens": statistics.mean(r["tokens"] for r in rs),
            "by_task": {t: sum(r["tokens"] for r in rs if r["task"] == t) / sum(r["seconds"] for r in rs if r["task"] == t)
                        for t in ("extract", "answer")},
        }
    base = summary[modes[0]]["tokens_per_s"]
    print(f"\n{'mode':<11}{'tok/s':>8}{'vs ' + modes[0]:>9}{'tok/step':>10}{'identical':>11}{'valid':>7}"
          f"{'extract':>9}{'answer':>8}")
    for m, s in summary.items():
        print(f"{m:<11}{s['tokens_per_s']:>8.1f}{s['tokens_per_s'] / base:>8.2f}x{s['tokens_per_step']:>10.2f}"
              f"{s['identical_to_off']:>7}/{len(rows[m])}{s['valid']:>4}/{len(rows[m])}"
              f"{s['by_task']['extract']:>9.1f}{s['by_task']['answer']:>8.1f}")
    if args.out:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.processor())
        Path(args.out).write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": cpu,
            "model": Path(folder).name, "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
