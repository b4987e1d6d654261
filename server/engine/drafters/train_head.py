"""`via-sd train-head`: train the EAGLE-family draft head on the target model's own outputs.

Three stages, one command (a fixed seed makes it reproducible):

1. **Collect.** The engine generates answers (mode `off`, batched) to the instructions in
   `assets/train_prompts.jsonl` (written for this purpose; none is a Spec-Bench question), once
   greedy and `--sampled` more times at `--temperature`. While it decodes, a recording runner keeps
   the target's final-norm hidden state and greedy next token at every generated position, so the
   features cost no second forward: `h_p` [H] is what `lm_head` sees at position p, `y_p` =
   argmax of the target's logits there. Saved to `--data` (reused when it exists).
2. **Reduced vocabulary.** The `--vocab` most frequent tokens among the target's greedy next
   tokens (EOS always included); `reduced_ids [R]` maps reduced index -> full token id.
3. **Train** `DraftHead` on (h_p, x_{p+1}) -> (h_{p+1}, y_{p+1}) with smooth-L1 feature regression
   plus cross-entropy over the reduced vocabulary, unrolled `--unroll` steps on its own predicted
   features (so chained drafts stay on track), AdamW, held-out split by prompt.

It prints the held-out top-1 acceptance (head argmax == target greedy token given true features)
and the chained acceptance (expected accepted tokens per step with γ = 5 on its own features),
and writes `<out>.safetensors` plus `<out>.json` (command, seed, data size, held-out numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_PROMPTS = ASSETS / "train_prompts.jsonl"


# ---------------------------------------------------------------------------- collect
class _RecordingRunner:
    """Wraps the engine's runner: every forward also returns hidden states, and for each decode
    chunk (num_logits == 1) it records (position, hidden, greedy token) under the chunk's table."""

    def __init__(self, runner):
        self.inner = runner
        self.records: dict[int, list[tuple[int, torch.Tensor, int]]] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, chunks, route=None, **kw):
        kw["want_hidden"] = True
        out = self.inner.forward(chunks, route, **kw)
        row = 0
        greedy = out.logits.argmax(-1).tolist()
        for c in chunks:
            for j in range(c.num_logits):
                pos = c.start + len(c.token_ids) - c.num_logits + j
                self.records.setdefault(id(c.table), []).append((pos, out.hidden[row].to(torch.float16).clone(), greedy[row]))
                row += 1
        return out


def collect(model_dir: str, prompts: list[dict], *, max_tokens: int, sampled: int, temperature: float, seed: int,
            batch: int, threads: int | None) -> list[dict]:
    """Generate answers with the engine (mode off) and record per-position features."""
    from tqdm import tqdm

    from server.engine.api import GenerationRequest
    from server.engine.config import EngineConfig, SamplingParams, SpecConfig
    from server.engine.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=model_dir, spec=SpecConfig(mode="off"), max_num_seqs=batch,
                                 max_num_batched_tokens=8192, num_threads=threads))
    rec = _RecordingRunner(eng.runner)
    eng.runner = rec
    jobs = []
    for r in prompts:
        ids = tuple(eng.tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}]))
        jobs.append((r, "greedy", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)))
        for k in range(sampled):
            jobs.append((r, f"sampled{k}", ids, SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                              seed=seed * 100003 + r["id"] * 31 + k)))
    out = []
    bar = tqdm(total=len(jobs), desc="collect", unit="answer")
    for b0 in range(0, len(jobs), batch):
        part = jobs[b0:b0 + batch]
        reqs = [GenerationRequest(f"{r['id']}-{kind}", ids, sp) for r, kind, ids, sp in part]
        rec.records.clear()
        seqs = {}
        for q in reqs:
            seqs[q.request_id] = eng.add_request(q)
        tables = {rid: id(s.table) for rid, s in seqs.items()}
        while eng.has_unfinished():
            eng.step()
        for (r, kind, ids, _), q in zip(part, reqs):
            s = seqs[q.request_id]
            recs = sorted(rec.records.get(tables[q.request_id], []), key=lambda t: t[0])
            n_prompt = len(ids)
            # positions n_prompt-1 .. n_total-2 predicted the generated tokens
            keep = {p: (h, y) for p, h, y in recs if n_prompt - 1 <= p < s.num_tokens - 1}
            poss = sorted(keep)
            if len(poss) < 3 or poss != list(range(n_prompt - 1, n_prompt - 1 + len(poss))):
                continue
            out.append({
                "prompt_id": r["id"], "category": r["category"], "kind": kind,
                "tokens": torch.tensor(s.token_ids[n_prompt - 1:n_prompt - 1 + len(poss) + 1]),  # x_p .. x_{p+T}
                "hidden": torch.stack([keep[p][0] for p in poss]),  # [T, H] fp16, h_p
                "greedy": torch.tensor([keep[p][1] for p in poss]),  # [T], argmax at p
            })
        bar.update(len(part))
    bar.close()
    return out


def load_prompts(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="via-sd train-head", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--limit-prompts", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--sampled", type=int, default=1, help="sampled answers per prompt, besides the greedy one")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", default=None, help="feature cache (.pt); reused when it exists")
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--vocab", type=int, default=4096, help="reduced vocabulary size")
    p.add_argument("--ffn", type=int, default=1024, help="the head's MLP width")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--unroll", type=int, default=3, help="training steps chained on the head's own features")
    p.add_argument("--feature-weight", type=float, default=1.0)
    p.add_argument("--heldout", type=float, default=0.1, help="share of prompts held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output stem (default: assets/<model>.head)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from server.engine.model_files import prepare_model

    model_dir = Path(args.model) if args.model else prepare_model()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_path = Path(args.data) if args.data else Path.home() / ".cache" / "via-sd" / f"{model_dir.name}.head-data.pt"
    prompts_path = Path(args.prompts)
    if data_path.exists():
        data = torch.load(data_path)
        print(f"loaded {len(data['seqs'])} answers from {data_path}")
    else:
        t0 = time.monotonic()
        prompts = load_prompts(prompts_path, args.limit_prompts)
        seqs = collect(str(model_dir), prompts, max_tokens=args.max_tokens, sampled=args.sampled,
                       temperature=args.temperature, seed=args.seed, batch=args.batch, threads=args.threads)
        data = {"seqs": seqs, "collect_seconds": time.monotonic() - t0, "num_prompts": len(prompts)}
        data_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, data_path)
        print(f"collected {len(seqs)} answers, {sum(len(s['hidden']) for s in seqs)} positions "
              f"in {data['collect_seconds']:.0f}s -> {data_path}")
    if args.collect_only:
        return 0
    return train_and_save(args, model_dir, data, argv)


if __name__ == "__main__":
    sys.exit(main())
