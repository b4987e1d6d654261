"""What two extensions of prompt lookup would buy, replayed on recorded greedy answers.

Prompt lookup (`ngram`, `server/engine/drafters/ngram.py`) drafts the continuation of the latest
earlier occurrence of the context's last 1-4 tokens. Two known extensions, measured here before
building either into the engine, walking each `off` answer as the engine steps (γ drafts, every
draft verified, a step commits the accepted drafts plus one token):

- **history** (as SuffixDecoding or REST do): where the request's own context has no match of
  2 or more tokens, look the context's last 2-6 tokens up in the answers of *other* requests
  (`loo`: every other answer of the file; `prior`: only those before it, as a server sees them);
- **branches** (a draft tree of lookups): the continuations of up to B earlier occurrences with
  different first tokens, all verified in one pass; the step keeps the longest accepted one.

    python benchmarks/lookup_replay.py --outputs benchmarks/results/make_bench_7fff005.outputs.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.bench.prompts import SPEC_BENCH_FILE  # noqa: E402


def local_matches(ids: list[int], n_min: int, n_max: int, k: int, branches: int) -> tuple[list[list[int]], int]:
    """Continuations (up to k tokens) of the latest earlier occurrences of the longest suffix
    n-gram that occurs, n in [n_min, n_max], at most `branches` with distinct first tokens, and
    that n (0 without a match). With one branch it is `ngram_match`'s draft, without the span."""
    L = len(ids)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix, out = ids[L - n:], []
        for s in range(L - n - 1, -1, -1):
            if ids[s:s + n] == suffix:
                c = ids[s + n:s + n + k]
                if c and all(c[0] != o[0] for o in out):
                    out.append(c)
                if len(out) >= branches:
                    break
        if out:
            return out, n
    return [], 0


def history_index(answers: list[list[int]], n_min: int = 2, n_max: int = 6) -> dict:
    index = {}
    for a in answers:
        for n in range(n_min, n_max + 1):
            for s in range(len(a) - n):
                index[tuple(a[s:s + n])] = (a, s + n)  # the latest occurrence wins
    return index


def history_match(index: dict, ids: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    for n in range(n_max, n_min - 1, -1):
        hit = index.get(tuple(ids[-n:]))
        if hit:
            a, e = hit
            return a[e:e + k]
    return []


def walk(prompt: list[int], answer: list[int], gamma: int, branches: int, index: dict | None) -> tuple[int, int, int]:
    """(tokens, steps, draft tokens verified) for one answer."""
    ctx, i, steps, verified = list(prompt), 0, 0, 0
    while i < len(answer):
        cands, n_local = local_matches(ctx, 1, 4, gamma, branches)
        if index is not None and n_local < 2:
            extra = history_match(index, ctx, 2, 6, gamma)
            cands = [extra] if extra else cands
        best = 0
        for d in cands:
            n = 0
            while n < len(d) and i + n < len(answer) and d[n] == answer[i + n]:
                n += 1
            best = max(best, n)
        verified += sum(len(d) for d in cands)
        take = min(best + 1, len(answer) - i)
        ctx += answer[i:i + take]
        i += take
        steps += 1
    return len(answer), steps, verified


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outputs", default="benchmarks/results/make_bench_7fff005.outputs.jsonl")
    p.add_argument("--run", default="off", help="whose answers to replay (a row of the outputs file)")
    p.add_argument("--prompts", default=str(SPEC_BENCH_FILE))
    p.add_argument("--gamma", type=int, default=5)
    p.add_argument("--out", default=None, help="also write the figures as JSON")
    args = p.parse_args()

    from server.bench.prompts import read_questions
    from server.engine.model_files import prepare_model
    from server.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(prepare_model(progress=False))
    questions = {q["question_id"]: q for q in read_questions(args.prompts)}
    rows = [json.loads(line) for line in Path(args.outputs).read_text().splitlines() if line.strip()]
    data = [(r["category"], tok.apply_chat_template([{"role": "user", "content": questions[r["question_id"]]["turns"][0]}]),
             tok.encode(r["text"])) for r in rows if r["run"] == args.run]
    result = {"outputs": args.outputs, "answers": len(data), "gamma": args.gamma, "runs": []}
    configs = [("lookup", 1, None), ("lookup + history (loo)", 1, "loo"), ("lookup + history (prior)", 1, "prior"),
               ("lookup, 2 branches", 2, None), ("lookup, 3 branches", 3, None)]
    for name, branches, hist in configs:
        tokens = steps = verified = 0
        per = defaultdict(lambda: [0, 0])
        for j, (cat, prompt, answer) in enumerate(data):
            index = None
            if hist:
                index = history_index([a for k, (_, _, a) in enumerate(data) if (k != j if hist == "loo" else k < j)])
            t, s, v = walk(prompt, answer, args.gamma, branches, index)
            tokens, steps, verified = tokens + t, steps + s, verified + v
            per[cat][0] += t
            per[cat][1] += s
        r = {"name": name, "tokens_per_step": round(tokens / steps, 3), "verified_per_step": round(verified / steps, 2),
             "per_category": {c: round(v[0] / v[1], 3) for c, v in per.items()}}
        result["runs"].append(r)
        print(f"{name:28s} {r['tokens_per_step']:.3f} tokens per step, {r['verified_per_step']:.2f} drafts verified "
              f"per step  {r['per_category']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
