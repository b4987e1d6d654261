"""What lossless speculation can buy on this machine at all: `binary` with drafts of a chosen quality.

Every drafter we have is measured by the benchmark; this measures the ceiling they work under.
An oracle drafter knows `off`'s greedy answer to each prompt (recorded first) and proposes γ
tokens per step, each right with probability `a` (independent per position, as in Leviathan et
al.'s analysis), so a draft's accepted run is geometric; a wrong token ends it. Drafting costs
nothing, so every row is an upper bound for a real drafter of that per-token acceptance: what is
left is the engine's own cost of verifying γ tokens (the wider pass, the bookkeeping) and the
prompt's prefill, which speculation does not touch.

    python benchmarks/oracle_drafts.py --per-category 2 --out benchmarks/results/oracle_drafts.json

Rows take turns prompt by prompt (prompt i goes through every row before prompt i+1), in two
rounds, the second in reverse order, each keeping its faster run of a prompt, as `via-sd bench`
does. Tokens/s include the prefill ("overall", as the benchmark's table) and leave it out
("decode": the steps after the prompt's last one). Outputs are checked identical to `off`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from server.bench.cli import git_state, machine_info
from server.bench.prompts import SPEC_BENCH_FILE, SPEC_BENCH_TASKS, read_questions, select_prompts
from server.engine.api import GenerationRequest
from server.engine.config import EngineConfig, SamplingParams, SpecConfig, SpecParams
from server.engine.drafters.base import Drafter, DraftBatch
from server.engine.engine import LLMEngine
from server.engine.model_files import prepare_model



class OracleDrafter(Drafter):
    """Proposes `gamma` tokens of the recorded answer, each right with probability `accept`.
    `answers` maps a request id's part before "#" to the answer its prompt gets from `off`."""

    name = "oracle"

    def __init__(self, answers: dict[str, list[int]], accept: float, gamma: int, vocab_size: int, seed: int = 0):
        self.answers, self.accept, self.gamma, self.vocab_size = answers, accept, gamma, vocab_size
        self.rng = random.Random(seed)
        self.proposed = self.right = self.steps = 0

    def propose(self, seqs, max_tokens: list[int], pass_cost=None) -> DraftBatch:
        out = []
        self.steps += len(seqs)
        for s, k in zip(seqs, max_tokens):
            answer = self.answers[s.request_id.split("#")[0]]
            truth = answer[s.num_output: s.num_output + min(k, self.gamma)]
            draft, ok = [], True
            for t in truth:
                ok = ok and self.rng.random() < self.accept
                # a wrong token: any other id; the verifier rejects it and the rest after it
                draft.append(t if ok else (t + 1) % self.vocab_size)
                self.right += ok
            self.proposed += len(draft)
            out.append(draft)
        return DraftBatch(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--accept", default="0.42,0.6,0.72,0.8,0.9,1.0", help="per-token acceptance values")
    ap.add_argument("--gammas", default="1,2,3,4,6")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    accepts = [float(a) for a in args.accept.split(",")]
    gammas = [int(g) for g in args.gammas.split(",")]

    eng = LLMEngine(EngineConfig(model=str(prepare_model(None, progress=False)),
                                 spec=SpecConfig(mode="binary", drafter="ngram", adaptive_draft=False),
                                 # every run of a prompt reads it again, as the benchmark's rows do
                                 enable_prefix_caching=False))
    # the benchmark's prompts: the first `--per-category` of each Spec-Bench task, first turn, chat template
    prompts = [(f"q{p.question_id}", p.category, tuple(eng.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p.text}])))
               for p in select_prompts(read_questions(SPEC_BENCH_FILE), list(SPEC_BENCH_TASKS), args.per_category)]

    def generate(rid: str, ids: tuple[int, ...], mode: str) -> tuple[list[int], float, float, int, int]:
        """One request alone: its output, its seconds in all and after the prompt's last step,
        its tokens in all and from that step."""
        seq = eng.add_request(GenerationRequest(rid, ids, SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
                                                SpecParams(mode=mode)))
        t0 = time.perf_counter()
        while seq.num_output == 0:  # the prompt in chunks of `prefill_chunk` tokens; the last one
            eng.step()  # commits the first token and, where the drafter proposed on it, its accepted drafts
        t1, first = time.perf_counter(), seq.num_output
        while eng.has_unfinished():
            eng.step()
        t2 = time.perf_counter()
        return list(seq.output_ids), t2 - t0, t2 - t1, seq.num_output, first

    for pid, _, ids in prompts[:2]:  # warm-up
        generate(f"{pid}#w", ids, "off")
    answers = {pid: generate(f"{pid}#r", ids, "off")[0] for pid, _, ids in prompts}

    rows = [("off", None, None)] + [(f"a={a:g} g={g}", a, g) for a in accepts for g in gammas]
    drafters = {name: OracleDrafter(answers, a, g, eng.model.cfg.vocab_size, seed=7) for name, a, g in rows if a is not None}
    best: dict[tuple[str, str], tuple[float, float, int, int]] = {}
    identical = {name: 0 for name, _, _ in rows}
    committed = {name: 0 for name, _, _ in rows}  # tokens, both rounds (per drafted step: every step drafts)
    started = time.time()
    for r in range(args.rounds):
        order = prompts if r % 2 == 0 else prompts[::-1]
        for n, (pid, _, ids) in enumerate(order):
            for name, a, g in (rows if r % 2 == 0 else rows[::-1]):
                mode = "off" if a is None else "binary"
                if a is not None:
                    eng.spec.drafter = drafters[name]
                out, total, decode, m, first = generate(f"{pid}#{r}{name}", ids, mode)
                committed[name] += m
                if r == 0:
                    identical[name] += out == answers[pid]
                key = (name, pid)
                if key not in best or total < best[key][0]:
                    best[key] = (total, decode, m, first)
            print(f"\rround {r + 1}/{args.rounds} prompt {n + 1}/{len(prompts)} ({time.time() - started:.0f} s)",
                  end="", flush=True)
    print()

    def rate(name: str, decode: bool) -> float:
        cells = [best[name, pid] for pid, _, _ in prompts]
        secs = sum(c[1] if decode else c[0] for c in cells)
        toks = sum(c[2] - c[3] if decode else c[2] for c in cells)
        return toks / secs

    off_all, off_dec = rate("off", False), rate("off", True)
    table = []
    for name, a, g in rows:
        d = drafters.get(name)
        table.append({
            "row": name, "accept": a, "gamma": g,
            "tokens_per_s": round(rate(name, False), 2), "speedup": round(rate(name, False) / off_all, 3),
            "decode_tokens_per_s": round(rate(name, True), 2), "decode_speedup": round(rate(name, True) / off_dec, 3),
            "tokens_per_step": None if d is None else round(committed[name] / max(1, d.steps), 3),
            "drafts_right": None if d is None else round(d.right / max(1, d.proposed), 3),
            "identical_to_off": f"{identical[name]}/{len(prompts)}",
        })
    print(f"{'row':14s} {'tok/s':>7s} {'x off':>6s} {'decode':>7s} {'x off':>6s} {'tok/st':>6s} {'right':>6s} {'=off':>6s}")
    for t in table:
        print(f"{t['row']:14s} {t['tokens_per_s']:7.1f} {t['speedup']:6.2f} {t['decode_tokens_per_s']:7.1f} "
              f"{t['decode_speedup']:6.2f} {t['tokens_per_step'] or 1.0:6.2f} {t['drafts_right'] if t['drafts_right'] is not None else '-':>6} "
              f"{t['identical_to_off']:>6s}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(args.threads), "git": git_state(),
            "command": "python benchmarks/oracle_drafts.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
            "prompts": len(prompts), "max_tokens": args.max_tokens, "rows": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
