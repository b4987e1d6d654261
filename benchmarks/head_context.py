"""Does the draft head need the whole context? A windowed head against a full-context one.

The shipped head (`via-sd train-head`) attends over the last 32 (hidden state, next token) pairs of
the answer. On Spec-Bench its drafts are weakest where the answer copies the prompt (translation,
summarization, RAG), which that window cannot see. This experiment trains two heads on the same
answers, with the same recipe and budget, and compares them:

- `window`: the shipped recipe, answer pairs only, attention over the last `--window` pairs;
- `context`: the same layer attending over every pair of the sequence, the prompt's included
  (the target's hidden states at the prompt positions are recorded at prefill); the loss is
  taken at answer positions only, as for `window`.

Both are evaluated teacher-forced (the target's greedy answers, chained `--gamma` deep exactly as
drafting chains them) on held-out training instructions and on the Spec-Bench prompts' greedy
answers (a diagnostic: Spec-Bench is never trained on). Tokens per step walk each answer as the
engine steps, every draft verified.

    python benchmarks/head_context.py --prompts 1000 --epochs 5 --out benchmarks/results/head_context.json

`--layers N` trains the `window` head with N decoder layers instead of one (an experiment on the
head's capacity; the engine drafts with one-layer heads only).

`--head FILE.safetensors` trains nothing: it evaluates a saved head (`via-sd train-head`'s output)
on the Spec-Bench answers the same way, so that heads trained on other data compare with these.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.bench.prompts import SPEC_BENCH_FILE  # noqa: E402
from server.engine.drafters import head as hd  # noqa: E402
from server.engine.drafters import train_head as th  # noqa: E402
from server.engine.drafters.head import DraftHead  # noqa: E402
from server.engine.model import ForwardOutput  # noqa: E402

CATEGORIES = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]


class PrefillRecorder:
    """The engine's runner, recording the final-norm hidden state and greedy token at every
    position of every chunk, prompt positions included (their logits are computed for that and
    dropped before the engine sees the output)."""

    def __init__(self, runner, taps: tuple[int, ...] = ()):
        self.inner = runner
        self.taps = taps
        self.records: dict[int, dict[int, tuple[torch.Tensor, int]]] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, chunks, route=None, **kw):
        kw["want_hidden"] = True
        if self.taps:
            kw["taps"] = self.taps
        wide = [dataclasses.replace(c, num_logits=len(c.token_ids)) for c in chunks]
        out = self.inner.forward(wide, route, **kw)
        greedy = out.logits.argmax(-1).tolist()
        feats = out.hidden if out.taps is None else torch.cat([out.taps.flatten(1), out.hidden], dim=1)
        keep, row = [], 0
        for c in chunks:
            rec = self.records.setdefault(id(c.table), {})
            for j in range(len(c.token_ids)):
                rec[c.start + j] = (feats[row].to(torch.float16).clone(), greedy[row])
                if j >= len(c.token_ids) - c.num_logits:
                    keep.append(row)
                row += 1
        idx = torch.tensor(keep)
        return ForwardOutput(out.logits[idx], out.hidden[idx], out.prefix_hidden)


def collect(model_dir: str, prompts: list[dict], max_tokens: int, batch: int, taps: tuple[int, ...] = ()) -> list[dict]:
    """Greedy answers with every position's features: `hidden [T, H]` at positions 0..T-1
    (with `taps`, [T, (len(taps) + 1) H]: the tapped layers' outputs, then the final-norm state),
    `tokens [T + 1]`, `greedy [T]`, `answer_start` = the last prompt position."""
    from tqdm import tqdm

    from server.engine.api import GenerationRequest
    from server.engine.config import EngineConfig, SamplingParams, SpecConfig
    from server.engine.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=model_dir, spec=SpecConfig(mode="off"), max_num_seqs=batch,
                                 max_num_batched_tokens=4096, enable_prefix_caching=False))
    rec = PrefillRecorder(eng.runner, taps)
    eng.runner = rec
    out = []
    bar = tqdm(total=len(prompts), desc="collect", unit="answer")
    for b0 in range(0, len(prompts), batch):
        part = prompts[b0:b0 + batch]
        rec.records.clear()
        seqs = {}
        for r in part:
            ids = tuple(eng.tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}]))
            seqs[r["id"]] = (eng.add_request(GenerationRequest(str(r["id"]), ids,
                                                               SamplingParams(max_tokens=max_tokens, temperature=0.0))), len(ids))
        tables = {rid: id(s.table) for rid, (s, _) in seqs.items()}
        while eng.has_unfinished():
            eng.step()
        for r in part:
            s, n_prompt = seqs[r["id"]]
            recs = rec.records.get(tables[r["id"]], {})
            T = s.num_tokens - 1
            if T - (n_prompt - 1) < 3 or any(p not in recs for p in range(T)):
                continue
            out.append({"prompt_id": r["id"], "category": r["category"], "kind": "greedy",
                        "tokens": torch.tensor(s.token_ids[:T + 1]),
                        "hidden": torch.stack([recs[p][0] for p in range(T)]),
                        "greedy": torch.tensor([recs[p][1] for p in range(T)]),
                        "answer_start": n_prompt - 1})
        bar.update(len(part))
    bar.close()
    return out


def answer_only(s: dict) -> dict:
    """The shipped recipe's view of an answer: its pairs from the last prompt position on."""
    a = s["answer_start"]
    return {**s, "tokens": s["tokens"][a:], "hidden": s["hidden"][a:], "greedy": s["greedy"][a:], "answer_start": 0}


def top_only(s: dict, hidden: int) -> dict:
    """`answer_only` with the final-norm state alone (the last `hidden` of a tapped feature)."""
    s = answer_only(s)
    return {**s, "hidden": s["hidden"][:, -hidden:]}


def segments(s: dict, hidden: int, length: int = 128, context: int = 32) -> list[dict]:
    """A whole sequence (prompt and answer pairs, the final-norm state) as pieces of at most
    `length` pairs for `pad`, every pair a training target once: each piece after the first
    starts `context` pairs early, and those pairs (marked by `answer_start`) are context only."""
    T = len(s["hidden"])
    out, start = [], 0
    while True:
        end = min(T, start + length)
        out.append({**s, "tokens": s["tokens"][start:end + 1], "hidden": s["hidden"][start:end, -hidden:],
                    "greedy": s["greedy"][start:end], "answer_start": 0 if start == 0 else context})
        if end == T:
            return out
        start = end - context


def pad(seqs: list[dict]) -> dict[str, torch.Tensor]:
    """`th.pad_answers` plus `loss [N, T]`: the positions whose prediction is an answer token
    (`th.unrolled_loss` scores only those; prompt pairs are context)."""
    d = th.pad_answers(seqs)
    d["loss"] = d["valid"].clone()
    for n, s in enumerate(seqs):
        d["loss"][n, : s["answer_start"]] = False
    return d


class _Layer(torch.nn.Module):
    """One more decoder layer of a `MultiLayerHead` (the first is the `DraftHead`'s own)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=False)
        self.gate_up = torch.nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = torch.nn.Linear(ffn, hidden, bias=False)
        self.w_attn = torch.nn.Parameter(torch.ones(hidden))
        self.w_ffn = torch.nn.Parameter(torch.ones(hidden))


class MultiLayerHead(DraftHead):
    """The draft head with `layers` decoder layers between the fusion and the output norm, each
    attending over its own keys and values of the window (torch ops only; `multi_outputs` is its
    `th.unrolled_outputs`)."""

    def __init__(self, *args, layers: int = 2, **kw):
        super().__init__(*args, **kw)
        self.extra = torch.nn.ModuleList([_Layer(self.hidden, self.ffn) for _ in range(layers - 1)])

    def _layer(self, i: int):
        return self if i == 0 else self.extra[i - 1]

    def project_layer(self, i: int, z: torch.Tensor, pos: torch.Tensor):
        m = self._layer(i)
        B, T, _ = z.shape
        qkv = F.linear(hd._rms(z, m.w_attn), m.qkv.weight).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = pos[:, None, :]
        return hd._rope(qkv[0], p), hd._rope(qkv[1], p), qkv[2]

    def block(self, i: int, z: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual stream after layer i (no output norm)."""
        m = self._layer(i)
        B, T, _ = z.shape
        z = z + F.linear(attn.transpose(1, 2).reshape(B, T, self.hidden), m.o.weight)
        g, u = F.linear(hd._rms(z, m.w_ffn), m.gate_up.weight).chunk(2, dim=-1)
        a = F.silu(g) * u
        if self.training and self.dropout:
            a = F.dropout(a, self.dropout)
        return z + F.linear(a, m.down.weight)


def multi_outputs(head, h: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, unroll: int) -> list[torch.Tensor]:
    """`th.unrolled_outputs` for a head of any number of layers (a `DraftHead` counts as one):
    the same levels and masks, each layer keeping its own keys and values across levels."""
    B, T, _ = h.shape
    pos = torch.arange(T).expand(B, T)
    n = 1 + len(getattr(head, "extra", ()))
    outs, ks, vs = [], [[] for _ in range(n)], [[] for _ in range(n)]
    feat = h
    for u in range(unroll):
        mask = th.level_mask(valid, u, head.window)
        z = head.fuse(feat, x)
        for i in range(n):
            if isinstance(head, MultiLayerHead):
                q, k, v = head.project_layer(i, z, pos)
            else:
                q, k, v = head.project(z, pos)
            ks[i].append(k)
            vs[i].append(v)
            attn = hd._attend(q, torch.cat(ks[i], 2), torch.cat(vs[i], 2), mask)
            z = head.block(i, z, attn) if isinstance(head, MultiLayerHead) else head.finish(z, attn)
        out = hd._rms(z, head.w_out) if isinstance(head, MultiLayerHead) else z
        outs.append(out)
        feat = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
    return outs


def new_multi_head(model, reduced: torch.Tensor, *, layers: int, ffn: int, heads: int, window: int, dropout: float):
    """`th.new_head` for a `MultiLayerHead`."""
    return th.init_head(MultiLayerHead(model.cfg.hidden_size, ffn, reduced, heads=heads, window=window, layers=layers),
                        model, dropout)


def train(model, seqs: list[dict], reduced: torch.Tensor, window: int, epochs: int, seed: int,
          unroll: int = 3, lr: float = 1.5e-3, batch_size: int = 8, ffn: int = 1536, heads: int = 9,
          taps: tuple[int, ...] = (), name: str = "", feature_weight: float = 1.0, bf16: bool = False,
          layers: int = 1):
    from tqdm import tqdm

    torch.manual_seed(seed)
    d = pad(seqs)
    d["scale"] = model.norm.float().abs().mean()
    if layers > 1:
        head = new_multi_head(model, reduced, layers=layers, ffn=ffn, heads=heads, window=window, dropout=0.1)
    else:
        head = th.new_head(model, reduced, ffn=ffn, heads=heads, window=window, dropout=0.1, taps=taps)
    outputs = multi_outputs if layers > 1 else None
    N = len(d["h"])
    spe = math.ceil(N / batch_size)
    opt, sched = th.training_schedule(head, lr, 0.05, spe * epochs)
    g = torch.Generator().manual_seed(seed)
    head.train()
    bar = tqdm(total=spe * epochs, desc=f"train {name}", unit="batch")
    t0 = time.monotonic()
    for _ in range(epochs):
        perm = torch.randperm(N, generator=g)
        for b in range(spe):
            loss, _ = th.unrolled_loss(head, d, perm[b * batch_size:(b + 1) * batch_size], unroll, feature_weight,
                                       bf16=bf16, outputs=outputs)
            th.optimizer_step(head, opt, sched, loss)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    head.eval()
    return head, time.monotonic() - t0


@torch.no_grad()
def evaluate(head, seqs: list[dict], reduced: torch.Tensor, gamma: int) -> dict:
    """Teacher-forced on greedy answers, one answer at a time: top-1 (level 0), and per start
    position the leading drafts that match (level k-1 at position s+k-1 predicts the token after
    it; along a matching prefix the drafted tokens are the true ones, so this is what drafting
    proposes), walked as the engine steps (`th.walk`)."""
    hit = tot = 0
    kept_all, first = [], []
    for s in seqs:
        d = th.pad_answers([s])
        outs = (multi_outputs if isinstance(head, MultiLayerHead) else th.unrolled_outputs)(
            head, d["h"].float(), d["x"], d["valid"], gamma)
        preds = [reduced[head.logits(o[0]).argmax(-1)] for o in outs]  # [T] each: token at p+1
        y = d["y"][0]
        T = len(y)
        a = s["answer_start"]
        ok = [torch.zeros(T, dtype=torch.bool) for _ in range(gamma)]
        for k in range(gamma):
            ok[k][: T - 1] = preds[k][: T - 1] == y[1:]  # level k at p: right about y_{p+1}
        hit += int(ok[0][a:T - 1].sum())
        tot += T - 1 - a
        starts = range(a, T - 1)
        first.append((len(kept_all), len(starts)))
        for st in starts:
            n = 0
            while n < gamma and st + n < T - 1 and ok[n][st + n]:
                n += 1
            kept_all.append(n)
    per_step, _ = th.walk(torch.tensor(kept_all), torch.full((len(kept_all),), gamma), first)
    return {"answers": len(seqs), "positions": tot, "top1": round(hit / max(tot, 1), 4),
            "tokens_per_step": round(per_step, 4)}


def spec_bench(head, bench: list[dict], reduced: torch.Tensor, gamma: int, view=answer_only) -> dict:
    """`evaluate` per Spec-Bench task and over all of them, each answer seen through `view`."""
    r = {cat: evaluate(head, [view(s) for s in bench if s["category"] == cat], reduced, gamma) for cat in CATEGORIES}
    r["all"] = evaluate(head, [view(s) for s in bench], reduced, gamma)
    return r


def evaluate_saved(args, model_dir: Path, bench: list[dict]) -> int:
    from server.engine.drafters.head import DraftHead
    from server.engine.model import LlamaModel

    model = LlamaModel.from_folder(model_dir)
    result = {"command": "python benchmarks/head_context.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "bench_answers": len(bench), "heads": {}}
    for path in args.head:
        head, info = DraftHead.load(Path(path))
        head.attach(model.embed, model.lm_head)
        head.eval()
        with torch.no_grad():
            view = answer_only if head.taps else functools.partial(top_only, hidden=head.hidden)
            r = {"record": info, "spec_bench": spec_bench(head, bench, head.reduced_ids, args.gamma, view)}
        result["heads"][Path(path).name] = r
        print(Path(path).name, json.dumps(r["spec_bench"]["all"]))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=1000, help="training instructions (builtin set, in order)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--gamma", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(Path.home() / ".cache" / "via-sd" / "head-context-data.pt"))
    p.add_argument("--spec-bench", default=str(SPEC_BENCH_FILE))
    p.add_argument("--limit-per-category", type=int, default=10)
    p.add_argument("--prompt-file", default=None,
                   help="train on the instructions of this JSONL ({id, category, prompt}) instead of the builtin set; "
                        "or named sets as train-head's --prompts takes them ('third', 'papers', 'builtin+third')")
    p.add_argument("--train-answers", type=int, default=None, help="train on the first N training answers only")
    p.add_argument("--only", default=None,
                   help="train only these heads (comma-separated: window, context, taps, window_prompt; "
                        "default: window, context and, with --taps, taps)")
    p.add_argument("--taps", default="",
                   help="layer indices (comma-separated) whose outputs are recorded with the final-norm state; "
                        "head `taps` fuses them (EAGLE-3's low- and mid-level features), `window` reads the "
                        "final-norm state alone")
    p.add_argument("--head", action="append", default=[],
                   help="evaluate this saved head on the Spec-Bench answers instead of training (repeatable)")
    p.add_argument("--feature-weight", type=float, default=1.0, help="weight of the feature regression loss")
    p.add_argument("--bf16", action="store_true", help="train under bf16 autocast (the matrix products in bf16)")
    p.add_argument("--ffn", type=int, default=1536, help="the head's MLP width (the shipped head: 1536)")
    p.add_argument("--layers", type=int, default=1, help="decoder layers of the `window` head (the shipped head: 1)")
    p.add_argument("--out", default="benchmarks/results/head_context.json")
    args = p.parse_args()
    torch.set_num_threads(2)

    from server.bench.prompts import read_questions, select_prompts
    from server.engine.model import LlamaModel
    from server.engine.model_files import prepare_model

    model_dir = prepare_model()
    taps = tuple(int(t) for t in args.taps.split(",") if t)
    path = Path(args.data)
    data = torch.load(path) if path.exists() else {}
    t0 = time.monotonic()
    if "train" not in data:
        source = th.named_prompts(args.prompt_file or "builtin", args.seed) or \
            th.load_prompts(Path(args.prompt_file), None)
        data["train"] = collect(str(model_dir), source[: args.prompts], args.max_tokens, args.batch, taps)
        data["taps"] = list(taps)
        bench = select_prompts(read_questions(args.spec_bench), CATEGORIES, args.limit_per_category)
        data["bench"] = collect(str(model_dir), [{"id": b.question_id, "category": b.category, "prompt": b.text}
                                                 for b in bench], args.max_tokens, args.batch, taps)
        data["collect_seconds"] = time.monotonic() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    if args.head:
        return evaluate_saved(args, model_dir, data["bench"])
    if tuple(data.get("taps", ())) != taps:
        raise SystemExit(f"{path} holds taps {data.get('taps', [])}, not {list(taps)}: pass another --data")
    train_all, held = th.split_by_prompt(data["train"], 0.1, args.seed)
    train_all = train_all[: args.train_answers]
    model = LlamaModel.from_folder(model_dir)
    H = model.cfg.hidden_size
    top = functools.partial(top_only, hidden=H)
    reduced = th.reduced_vocabulary([top(s) for s in train_all], 4096, tuple(model.cfg.eos_token_ids),
                                    model.cfg.vocab_size)
    result = {"command": "python benchmarks/head_context.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "collect_seconds": round(data["collect_seconds"], 1),
              "train_answers": len(train_all), "heldout_answers": len(held), "bench_answers": len(data["bench"]),
              "train_answer_positions": sum(len(s["greedy"]) - s["answer_start"] for s in train_all),
              "train_prompt_positions": sum(s["answer_start"] for s in train_all), "heads": {}}
    heads = [("window", args.window, top, ()),
             ("context", 1 << 30, lambda s: {**s, "hidden": s["hidden"][:, -H:]}, ()),
             # the `window` head trained on the prompts' pairs as well as the answers' (evaluated
             # on answers, as the others)
             ("window_prompt", args.window, top, ())]
    if taps:
        heads.append(("taps", args.window, answer_only, taps))
    only = set(args.only.split(",")) if args.only else {"window", "context", *(["taps"] if taps else [])}
    for name, window, view, head_taps in heads:
        if name not in only:
            continue
        seqs = [p for s in train_all for p in segments(s, H, context=window)] if name == "window_prompt" \
            else [view(s) for s in train_all]
        head, secs = train(model, seqs, reduced, window, args.epochs, args.seed,
                           taps=head_taps, name=name, feature_weight=args.feature_weight, bf16=args.bf16,
                           ffn=args.ffn, layers=args.layers if name == "window" else 1)
        r = {"window": args.window if name != "context" else "all", "taps": list(head_taps),
             "feature_weight": args.feature_weight, "bf16": args.bf16, "ffn": args.ffn,
             "layers": args.layers if name == "window" else 1,
             "train_positions": sum(len(q["hidden"]) - q["answer_start"] for q in seqs),
             "train_seconds": round(secs, 1),
             "heldout": evaluate(head, [view(s) for s in held], reduced, args.gamma),
             "spec_bench": spec_bench(head, data["bench"], reduced, args.gamma, view)}
        result["heads"][name] = r
        print(name, json.dumps(r))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
