"""How often the draft head's first draft is accepted in a sampled request, by how it drafts.

    python benchmarks/sampled_head_acceptance.py --temperature 1.0 --out benchmarks/results/sampled_head_acceptance_t10.json

Collects sampled answers (two per prompt, seeded) to `--per-category` Spec-Bench prompts of each
task with the engine (mode off, hidden states recorded as `via-sd train-head` records them), then,
teacher-forced on those answers (the head reads the true pairs, level 0; and chained one draft
deep, level 1), compares at the request's temperature T, with p the target's distribution and q the
head's over its reduced vocabulary:

- `greedy_draft`: the head drafts its most likely token d, verified against the target's own
  sample (what the engine does): accepted with probability p(d);
- `gumbel_coupled`: the head drafts argmax(log q + G) and the target samples argmax(log p + G)
  with the same Gumbel noise G per (position, token): accepted when the two agree (Monte Carlo);
- `speculative_sampling`: the head samples from q and the rule min(1, p/q) keeps it, with a
  residual sample on rejection: accepted with probability sum_x min(p(x), q(x)), the best any
  single draft from q can do, but the text is no longer the target's own sample for a seed;
- `inverse_cdf_coupled`: both sample by inverse CDF from one shared uniform, tokens in vocabulary
  order (the engine's sampler): accepted when the two land on the same token.

And, for the greedy draft, the calibration table: by the head's probability of its draft at
temperature 1 (what the engine reads as a draft's chance), the mean of p_T(d).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from server.bench.prompts import SPEC_BENCH_FILE
from server.engine.drafters.head import DraftHead, shipped_head_path
from server.engine.drafters.train_head import collect, pad_answers, unrolled_outputs
from server.engine.model_files import prepare_model

CATEGORIES = ("translation", "summarization", "qa", "math_reasoning", "rag")  # Spec-Bench's own names


def spec_bench_prompts(per_category: int) -> list[dict]:
    qs = [json.loads(line) for line in open(SPEC_BENCH_FILE)]
    out = []
    for c in CATEGORIES:
        for q in [q for q in qs if q["category"] == c][:per_category]:
            out.append({"id": len(out), "prompt": q["turns"][0], "category": c})
    return out


def rates(head: DraftHead, E: torch.Tensor, d: dict, T: float, draws: int) -> dict:
    red = head.reduced_ids
    sums: dict[str, list[float]] = {}
    bins: list[list[float]] = [[0.0, 0.0] for _ in range(10)]

    def add(name, v):
        s = sums.setdefault(name, [0.0, 0])
        s[0] += float(v.sum())
        s[1] += len(v)

    outs = unrolled_outputs(head, d["h"].float(), d["x"], d["valid"], 2)
    for level, out in enumerate(outs):
        m = d["valid"][:, 1:] & d["valid"][:, :-1]
        if level:
            m = m.clone()
            m[:, :level] = False
        o, h_next = out[:, :-1][m], d["h"][:, 1:].float()[m]  # pair j's prediction, the target's state at j + 1
        for a in range(0, len(o), 2048):
            oo, hh = o[a:a + 2048], h_next[a:a + 2048]
            lp = torch.log_softmax(hh @ E.T / T, -1)
            head_logits = head.logits(oo)
            lq_r = torch.log_softmax(head_logits / T, -1)
            lq = torch.full_like(lp, -float("inf"))
            lq[:, red] = lq_r
            p, q = lp.exp(), lq.exp()
            conf, arg = torch.softmax(head_logits, -1).max(-1)
            pd = p.gather(1, red[arg][:, None]).squeeze(1)
            add(f"greedy_draft/{level}", pd)
            add(f"speculative_sampling/{level}", torch.minimum(p, q).sum(-1))
            agree = torch.zeros(len(oo))
            for _ in range(draws):
                g = -torch.log(-torch.log(torch.rand_like(lp).clamp_min(1e-20)))
                agree += ((lp + g).argmax(-1) == (lq + g).argmax(-1)).float()
            add(f"gumbel_coupled/{level}", agree / draws)
            if level == 0:
                pc, qc = p.cumsum(-1), q.cumsum(-1)
                agree = torch.zeros(len(oo))
                for _ in range(draws):
                    u = torch.rand(len(oo), 1)
                    xp = torch.searchsorted(pc, u * pc[:, -1:]).clamp(max=p.shape[1] - 1)
                    xq = torch.searchsorted(qc, u * qc[:, -1:]).clamp(max=p.shape[1] - 1)
                    agree += (xp == xq).float().squeeze(1)
                add("inverse_cdf_coupled/0", agree / draws)
                for b in range(10):
                    sel = (conf >= b / 10) & (conf < (b + 1) / 10 if b < 9 else conf <= 1.0)
                    bins[b][0] += float(pd[sel].sum())
                    bins[b][1] += int(sel.sum())
    res = {k: round(s / max(n, 1), 4) for k, (s, n) in sums.items()}
    res["positions"] = sums["greedy_draft/0"][1]
    res["calibration"] = [{"head_probability": f"{b / 10:.1f}-{(b + 1) / 10:.1f}", "drafts": int(n),
                           "accepted": round(s / n, 3) if n else None} for b, (s, n) in enumerate(bins)]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--per-category", type=int, default=5)
    ap.add_argument("--draws", type=int, default=16, help="Monte Carlo draws of the couplings' noise")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = prepare_model(None, progress=False)
    answers = collect(str(folder), spec_bench_prompts(args.per_category), max_tokens=128, sampled=2,
                      temperature=args.temperature, seed=1, batch=64, threads=args.threads)
    answers = [a for a in answers if a["kind"] != "greedy"]
    w = load_file(str(folder / "model.safetensors"))
    E = w.get("lm_head.weight", w["model.embed_tokens.weight"]).float()
    head, _ = DraftHead.load(shipped_head_path(folder))
    head.attach(E, E)
    with torch.no_grad():
        res = rates(head, E, pad_answers(answers), args.temperature, args.draws)
    report = {"date": time.strftime("%Y-%m-%d"), "model": folder.name, "temperature": args.temperature,
              "answers": len(answers), **res}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
