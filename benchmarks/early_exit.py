"""Could a slim verifier that exits early, read out over a reduced vocabulary, be cheap enough to pay?

    python benchmarks/early_exit.py --out benchmarks/results/early_exit.json

A slim route that runs the model's first k layers and stops (an early exit) wastes nothing when a
draft escalates: the full pass goes on from layer k with the slim pass's hidden states. What is
left of the slim pass's cost is the LM head, a fifth of a pass on the bundled model; read out over
the draft head's 4,096 most emitted tokens instead, it nearly vanishes. This script measures
whether such an exit is right often enough: teacher-forced on `off`'s greedy answers of a
`via-sd bench` run (the outputs file it wrote), the hidden state after each layer k goes through
the final norm and the LM head, over the whole vocabulary and over the reduced one, and is compared
with the full model's argmax. Printed per exit: the route's cost (the share of the weights it
reads: `Route.cost`, and with the reduced readout), agreement with the full model, the share of
positions where the slim verifier is confident (max q' >= 0.7, the engine's `slim_confidence`) and
how often it is right there. An exit is exact in the engine's terms (it reads the full model's
keys and values of layers 1..k, which are the same as its own), so these are the numbers the gate
would see. Uses Hugging Face transformers on the prepared model folder (fp32), 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from server.bench.prompts import SPEC_BENCH_FILE
from server.engine.drafters.head import DraftHead, shipped_head_path
from server.engine.model import ModelConfig
from server.engine.model_files import prepare_model
from server.engine.tokenizer import Tokenizer
from via_sd_kernels.routes import Route

RESULTS = Path(__file__).resolve().parent / "results"


def measure(model, tokenizer, answers: list[dict], questions: dict, reduced: torch.Tensor, exits: list[int],
            confidence: float) -> tuple[dict[int, dict[str, int]], int]:
    """Teacher-forced counts per exit layer over the answers (dicts with `question_id` and
    `token_ids`), and how many positions' full-model argmax lies in `reduced`."""
    L = model.config.num_hidden_layers
    in_red = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    in_red[reduced] = True
    keys = ("n", "agree", "agree_red", "conf", "conf_ok", "conf_red", "conf_red_ok")
    stats = {k: dict.fromkeys(keys, 0) for k in exits}
    n_in_red = 0
    W, norm = model.lm_head.weight, model.model.norm
    with torch.inference_mode():
        for r in answers:
            p = tokenizer.apply_chat_template([{"role": "user", "content": questions[r["question_id"]]["turns"][0]}])
            ids = torch.tensor([list(p) + list(r["token_ids"])])
            out = model(ids, output_hidden_states=True)
            a0 = len(p) - 1  # the positions that predict the answer's tokens
            final = out.logits[0, a0:-1].argmax(-1)
            n_in_red += int(in_red[final].sum())
            for k in exits:
                h = out.hidden_states[k][0, a0:-1]
                if k < L:  # the last entry already went through the final norm
                    h = norm(h)
                logits = h @ W.T
                full_arg, lr = logits.argmax(-1), logits[:, reduced]
                red_arg = reduced[lr.argmax(-1)]
                s = stats[k]
                s["n"] += len(final)
                s["agree"] += int((full_arg == final).sum())
                s["agree_red"] += int((red_arg == final).sum())
                sure = logits.softmax(-1).max(-1).values >= confidence
                s["conf"] += int(sure.sum())
                s["conf_ok"] += int((sure & (full_arg == final)).sum())
                sure = lr.softmax(-1).max(-1).values >= confidence
                s["conf_red"] += int(sure.sum())
                s["conf_red_ok"] += int((sure & (red_arg == final)).sum())
    return stats, n_in_red


def table(stats: dict[int, dict[str, int]], mcfg: ModelConfig, reduced_tokens: int) -> list[dict]:
    """One row per exit: its cost (with the whole and the reduced readout) and the shares."""
    attn, mlp, fixed = mcfg.sublayer_params()
    costs = mcfg.sublayer_costs()
    L = mcfg.num_layers
    head_share = fixed / (fixed + L * (attn + mlp))  # `fixed` is the LM head (the embedding lookup is free)
    rows = []
    for k, s in stats.items():
        cost = Route.from_skips(L, skip_attn=range(k, L), skip_mlp=range(k, L)).cost(costs)
        rows.append(dict(
            exit_layer=k, cost=round(cost, 3),
            cost_reduced_readout=round(cost - head_share * (1 - reduced_tokens / mcfg.vocab_size), 3),
            agree=round(s["agree"] / s["n"], 3), agree_reduced=round(s["agree_red"] / s["n"], 3),
            confident=round(s["conf"] / s["n"], 3), right_when_confident=round(s["conf_ok"] / max(1, s["conf"]), 3),
            confident_reduced=round(s["conf_red"] / s["n"], 3),
            right_when_confident_reduced=round(s["conf_red_ok"] / max(1, s["conf_red"]), 3)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outputs", default=str(RESULTS / "make_bench_e9cc24d.outputs.jsonl"),
                    help="a via-sd bench outputs file; its `off` rows are the answers")
    ap.add_argument("--prompts", default=str(SPEC_BENCH_FILE))
    ap.add_argument("--first-exit", type=int, default=18)
    ap.add_argument("--confidence", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    folder = prepare_model(None, progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    mcfg = ModelConfig.from_folder(Path(folder))
    head, _ = DraftHead.load(shipped_head_path(folder))
    red = head.reduced_ids.long()
    questions = {q["question_id"]: q for q in map(json.loads, open(args.prompts))}
    answers = [r for r in map(json.loads, open(args.outputs)) if r["run"] == "off"]
    t0 = time.time()
    stats, n_in_red = measure(model, Tokenizer.from_folder(folder), answers, questions, red,
                              list(range(args.first_exit, mcfg.num_layers + 1)), args.confidence)
    rows = table(stats, mcfg, len(red))
    n = stats[args.first_exit]["n"]
    head_share = round(rows[-1]["cost"] - rows[-1]["cost_reduced_readout"], 3)
    print(f"{len(answers)} answers, {n} positions, {time.time() - t0:.0f} s; the full model's argmax is in the "
          f"reduced readout ({len(red)} tokens) at {n_in_red / n:.3f} of them")
    print("exit | cost | cost, reduced readout | agree | agree, reduced | confident | right there | "
          "confident, reduced | right there")
    for row in rows:
        print(" | ".join(str(v) for v in row.values()))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            command=f"python benchmarks/early_exit.py --out {args.out}", outputs=os.path.relpath(args.outputs), positions=n,
            in_reduced=round(n_in_red / n, 3), reduced_tokens=len(red), readout_saving=head_share,
            confidence=args.confidence, exits=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
