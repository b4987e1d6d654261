"""`via-sd train-head`: train the EAGLE-family draft head on the target model's own outputs.

Three stages, one command (a fixed seed makes it reproducible):

1. **Collect.** The engine generates answers (mode `off`, batched) to instructions that are not
   Spec-Bench questions: by default (`--prompts builtin`) the 226 hand-written ones of
   `assets/train_prompts.jsonl` and the 1,318 + 1,113 templated ones of `train_prompts.py` (two
   sets), plus, with `--self-instructions N`, N instructions the model writes itself (user turns
   sampled from its own chat template, `self_instructions`; `--prompts self` takes only those;
   `--prompts third` a third templated set, `papers` passages of research papers of the PyPI
   package `aclsum` to summarize and answer from; names join with '+', as `builtin+third`);
   once greedy and `--sampled` more times at `--temperature`. While it decodes, a recording runner keeps the
   target's final-norm hidden state and greedy next token at every generated position, so the
   features cost no second forward: `h_p` [H] is what `lm_head` sees at position p, `y_p` =
   argmax of the target's logits there. Saved to `--data` (reused, and resumed, when it exists).
2. **Reduced vocabulary.** The `--vocab` most frequent tokens among the target's greedy next
   tokens (EOS always included); `reduced_ids [R]` maps reduced index -> full token id.
3. **Train** `DraftHead` on each answer's pairs (h_p, x_{p+1}) -> (h_{p+1}, y_{p+1}) with
   smooth-L1 feature regression plus cross-entropy against the target's distribution over the
   reduced vocabulary, chained `--unroll` levels deep on its own predictions exactly as drafting
   chains them (`unrolled_outputs`), AdamW with a one-cycle schedule, held-out split by prompt.
   `--init HEAD` continues a saved head (its layout and reduced vocabulary) instead of a fresh one.
   `--bf16` runs the matrix products under bf16 autocast (weights and optimizer state stay fp32).

It prints the held-out top-1 acceptance (head argmax == target greedy token given true pairs)
and the chained acceptance (expected accepted tokens per step with γ = 5, drafted by the
drafter's own code), and writes `<out>.safetensors` plus `<out>.json` (command, seed, data size,
held-out numbers, the chosen confidence threshold); without `--out`, to
`~/.cache/via-sd/heads/<model>.head`, never over the head the package ships.
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
HEADS = Path("~/.cache/via-sd/heads")  # where a trained head goes without --out


def trained_stem(out: str | None, model_name: str) -> Path:
    """Where training writes: `--out`, else `~/.cache/via-sd/heads/<model>.head`. Never the
    package's own head, which only an explicit `--out` replaces."""
    return Path(out).expanduser() if out else HEADS.expanduser() / f"{model_name}.head"


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
        hidden = out.hidden.to("cpu", torch.float16)  # one copy per forward (from the GPU, or a graph's buffer)
        for c in chunks:
            for j in range(c.num_logits):
                pos = c.start + len(c.token_ids) - c.num_logits + j
                self.records.setdefault(id(c.table), []).append((pos, hidden[row].clone(), greedy[row]))
                row += 1
        return out


def collect(model_dir: str, prompts: list[dict], *, max_tokens: int, sampled: int, temperature: float, seed: int,
            batch: int, threads: int | None, done: list[dict] | None = None, checkpoint=None,
            taps: tuple[int, ...] = (), device: str = "cpu", engine=None) -> list[dict]:
    """Generate answers with the engine (mode off) and record per-position features. Answers in
    `done` (a checkpoint) are kept, not regenerated; `checkpoint(answers)` runs after each batch.
    With `taps`, each position's feature is those layers' outputs and then the final-norm state.
    On `device` (CUDA: the engine's graphs) the features still land on the host. `engine`: an
    `LLMEngine` (mode off) to use instead of one built from `model_dir`."""
    from server.engine.config import EngineConfig, SpecConfig
    from server.engine.engine import LLMEngine

    eng = engine or LLMEngine(EngineConfig(model=model_dir, spec=SpecConfig(mode="off"), max_num_seqs=batch,
                                           max_num_batched_tokens=8192, num_threads=threads, device=device))
    eng.runner.taps = tuple(taps)
    rec = _RecordingRunner(eng.runner)
    eng.runner = rec
    try:
        return _collect_with(eng, rec, prompts, max_tokens=max_tokens, sampled=sampled, temperature=temperature,
                            seed=seed, batch=batch, done=done, checkpoint=checkpoint)
    finally:
        eng.runner = rec.inner


def _collect_with(eng, rec, prompts, *, max_tokens, sampled, temperature, seed, batch, done, checkpoint):
    from tqdm import tqdm

    from server.engine.api import GenerationRequest
    from server.engine.config import SamplingParams

    jobs = []
    for r in prompts:
        ids = tuple(eng.tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}]))
        jobs.append((r, "greedy", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)))
        for k in range(sampled):
            jobs.append((r, f"sampled{k}", ids, SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                              seed=seed * 100003 + r["id"] * 31 + k)))
    out = list(done or [])
    have = {(a["prompt_id"], a["kind"]) for a in out}
    jobs = [j for j in jobs if (j[0]["id"], j[1]) not in have]
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
                "hidden": torch.stack([keep[p][0] for p in poss]),  # [T, H] fp16, h_p ([T, (taps + 1) H])
                "greedy": torch.tensor([keep[p][1] for p in poss]),  # [T], argmax at p
            })
        bar.update(len(part))
        if checkpoint is not None:
            checkpoint(out)
    bar.close()
    return out


def parse_taps(text: str) -> tuple[int, ...]:
    """'2,15,27' -> (2, 15, 27); '' -> ()."""
    return tuple(int(t) for t in text.split(",") if t.strip())


def load_prompts(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def builtin_prompts(seed: int) -> list[dict]:
    """The hand-written instructions and the first templated set (train_prompts.py), interleaved so
    that a `--limit-prompts` prefix still mixes both, then the second set (ids from 20,000): so
    `--limit-prompts 1544` is the first set alone, as earlier heads were trained."""
    from server.engine.drafters.train_prompts import generated_prompts, more_prompts

    hand, gen = load_prompts(DEFAULT_PROMPTS, None), generated_prompts(seed)
    out, step = [], max(1, len(gen) // max(1, len(hand)))
    for i, r in enumerate(hand):
        out.append(r)
        out.extend(gen[i * step:(i + 1) * step])
    out.extend(gen[len(hand) * step:])
    return out + more_prompts(seed)


# ---------------------------------------------------------------------------- data
SELF_START = 30_000  # ids of the instructions the model writes itself (`--self-instructions`)
PAPERS_START = 40_000  # ids of the papers' set (`train_prompts.paper_prompts`, `--prompts papers`)
THIRD_START = 50_000  # ids of the third templated set (`train_prompts.third_prompts`, `--prompts third`)
SET_STARTS = (20_000, SELF_START, PAPERS_START, THIRD_START)  # prompt ids where a later set begins


def papers_or_exit(seed: int) -> list[dict]:
    """The papers' set (`train_prompts.paper_prompts`), or exit 2 when the `aclsum` package is absent."""
    from server.engine.drafters.train_prompts import paper_prompts

    rows = paper_prompts(seed, start_id=PAPERS_START)
    if not rows:
        raise SystemExit("via-sd train-head: --prompts papers needs the aclsum package "
                         "(make install puts it in; pip install --no-deps aclsum==0.1.2)")
    return rows


def named_prompts(names: str, seed: int) -> list[dict] | None:
    """The instructions of named sets joined by '+' ('builtin', 'papers', 'third'; e.g.
    'builtin+third'), in that order; None when `names` is not such a name (a file's path)."""
    from server.engine.drafters.train_prompts import third_prompts

    sets = {"builtin": builtin_prompts, "papers": papers_or_exit,
            "third": lambda sd: third_prompts(sd, start_id=THIRD_START)}
    parts = names.split("+")
    if not all(p in sets for p in parts):
        return None
    return [r for p in parts for r in sets[p](seed)]


def self_instructions(model_dir: str, n: int, *, seed: int, batch: int, threads: int | None,
                      temperature: float = 1.0, top_p: float = 0.95, max_tokens: int = 96) -> list[dict]:
    """`n` instructions the target writes itself (as Magpie does, Xu et al. 2024): the engine
    samples from the chat template cut where a user's message begins, until the model ends the
    turn. An instruct model's user turns follow the instructions it was tuned on, so its answers to
    them are what it answers in use. Kept: turns the model ended, 16-600 characters, each once
    (case-insensitive); ids from `SELF_START`, category "self". Deterministic in `seed`."""
    from tqdm import tqdm

    from server.engine.api import GenerationRequest
    from server.engine.config import EngineConfig, SamplingParams, SpecConfig
    from server.engine.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=model_dir, spec=SpecConfig(mode="off"), max_num_seqs=batch,
                                 max_num_batched_tokens=8192, num_threads=threads))
    prefix = tuple(eng.tokenizer.user_turn_prefix())
    rows: list[dict] = []
    seen: set[str] = set()
    bar = tqdm(total=n, desc="self-instructions", unit="instruction")
    k = 0
    while len(rows) < n:
        reqs = [GenerationRequest(f"self-{k + i}", prefix, SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed * 1_000_003 + k + i))
            for i in range(batch)]
        k += batch
        for res in eng.generate(reqs):
            text = res.text.strip()
            if res.finish_reason != "stop" or not 16 <= len(text) <= 600 or text.lower() in seen:
                continue
            seen.add(text.lower())
            rows.append({"id": SELF_START + len(rows), "category": "self", "prompt": text})
        bar.update(min(n, len(rows)) - bar.n)
        if k > 20 * n + batch:
            raise RuntimeError(f"the model ended only {len(rows)} of {k} user turns within {max_tokens} tokens")
    bar.close()
    return rows[:n]


def split_by_prompt(seqs: list[dict], heldout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out a `heldout` share of the prompts of each set (ids below 20,000, from 20,000, the
    model's own from `SELF_START`, the papers' from `PAPERS_START`, the third templated set's from
    `THIRD_START`) on its own, so that adding a set leaves the earlier sets' held-out prompts where
    they were."""
    held: set[int] = set()
    all_ids = {s["prompt_id"] for s in seqs}
    for k in range(len(SET_STARTS) + 1):
        ids = sorted(i for i in all_ids if sum(i >= b for b in SET_STARTS) == k)
        if not ids:
            continue
        rng = random.Random(seed)
        rng.shuffle(ids)
        held |= set(ids[: max(1, round(len(ids) * heldout))])
    return [s for s in seqs if s["prompt_id"] not in held], [s for s in seqs if s["prompt_id"] in held]


def reduced_vocabulary(seqs: list[dict], size: int, always: tuple[int, ...], vocab: int | None = None) -> torch.Tensor:
    """The `size` most frequent greedy next tokens of the target (ties by id), `always` included.
    When the data has fewer distinct tokens than `size` and `vocab` is given, the rest is filled
    with the lowest ids not yet in: a BPE vocabulary numbers its merges in order, so low ids are
    the common tokens, and the tied output embedding lets the head predict tokens it never saw."""
    counts = torch.bincount(torch.cat([s["greedy"] for s in seqs]))
    order = sorted(range(len(counts)), key=lambda t: (-int(counts[t]), t))
    keep = list(dict.fromkeys(always))
    seen = set(keep)
    for t in order:
        if len(keep) >= size or counts[t] == 0:
            break
        if t not in seen:
            keep.append(t)
            seen.add(t)
    for t in range(vocab or 0):
        if len(keep) >= size:
            break
        if t not in seen:
            keep.append(t)
            seen.add(t)
    return torch.tensor(sorted(keep), dtype=torch.int64)


def pad_answers(seqs: list[dict]) -> dict[str, torch.Tensor]:
    """Answers as padded sequences of pairs. Answer n with T positions: `h[n, j]` = h_j (fp16),
    `x[n, j]` = x_{j+1}, `y[n, j]` = the target's greedy token at j, `valid[n, j]` for j < T.
    The training target of pair j is (h_{j+1}, y_{j+1})."""
    seqs = [s for s in seqs if len(s["hidden"]) >= 2]
    N, T, H = len(seqs), max(len(s["hidden"]) for s in seqs), seqs[0]["hidden"].shape[1]
    d = {"h": torch.zeros(N, T, H, dtype=torch.float16), "x": torch.zeros(N, T, dtype=torch.int64),
         "y": torch.zeros(N, T, dtype=torch.int64), "valid": torch.zeros(N, T, dtype=torch.bool)}
    for n, s in enumerate(seqs):
        t = len(s["hidden"])
        d["h"][n, :t] = s["hidden"]
        d["x"][n, :t] = s["tokens"][1:t + 1]
        d["y"][n, :t] = s["greedy"]
        d["valid"][n, :t] = True
    return d


def to_reduced(full_ids: torch.Tensor, reduced_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full ids -> reduced index, -100 (ignored by cross-entropy) for tokens outside it."""
    table = torch.full((vocab,), -100, dtype=torch.int64)
    table[reduced_ids] = torch.arange(len(reduced_ids))
    return table[full_ids]


# ---------------------------------------------------------------------------- train
def unrolled_outputs(head, h: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, unroll: int) -> list[torch.Tensor]:
    """The head's predictions at every position, chained `unroll` deep, as drafting chains them.

    Level 0 reads the true pairs (h_p, x_{p+1}) and predicts h_{p+1}. Level u at position p is
    the u-th chained draft from the committed position p-u: its input is level u-1's prediction
    at p-1 with the true token x_{p+1} (teacher forcing), and it attends to true pairs at
    positions <= p-u and to the level-k pair at p-u+k for k = 1..u, all inside the window.
    h [B, T, H], x [B, T], valid [B, T] -> [levels][B, T, H]."""
    from server.engine.drafters.head import _attend

    B, T, _ = h.shape
    pos = torch.arange(T, device=h.device).expand(B, T)
    outs, ks, vs = [], [], []
    feat = h
    for u in range(unroll):
        z = head.fuse(feat, x)
        q, k, v = head.project(z, pos)
        ks.append(k)
        vs.append(v)
        out = head.finish(z, _attend(q, torch.cat(ks, 2), torch.cat(vs, 2), level_mask(valid, u, head.window)))
        outs.append(out)
        feat = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
    return outs


def level_mask(valid: torch.Tensor, u: int, window: int) -> torch.Tensor:
    """`unrolled_outputs`' attention mask at level u, [B, 1, T, (u+1)T]: the true pairs at
    positions <= p-u inside the window (valid ones, and the pair itself at level 0), then the
    level-k pair at p-u+k for k = 1..u."""
    B, T = valid.shape
    pos = torch.arange(T, device=valid.device)
    d = pos[:, None] - pos[None, :]  # [T, T] query minus key position
    blocks = [(d >= u) & (d < window) & (valid[:, None, :] | (d == 0)) if u == 0 else
              ((d >= u) & (d < window))[None] & valid[:, None, :]]
    blocks += [(d == u - lvl)[None].expand(B, T, T) for lvl in range(1, u + 1)]
    return torch.cat([m.expand(B, T, T) for m in blocks], dim=2)[:, None]


def unrolled_loss(head, d: dict[str, torch.Tensor], idx: torch.Tensor, unroll: int, feature_weight: float,
                  bf16: bool = False, outputs=None):
    """Feature regression (smooth L1, in units of the final norm's mean weight) plus cross-entropy
    against the target's own distribution over the reduced vocabulary, at every chained level;
    deeper levels count a little less. With `d["loss"]` [N, T], only the positions it marks are
    scored (the others are context only). With `bf16`, under bf16 autocast (the matrix products
    in bf16, the weights, gradients and optimizer state fp32). `outputs` replaces `unrolled_outputs`
    (an experiment's other head shape). Returns (loss, level-0 cross-entropy)."""
    with torch.autocast(d["h"].device.type, dtype=torch.bfloat16, enabled=bf16):
        return _unrolled_loss(head, d, idx, unroll, feature_weight, outputs or unrolled_outputs)


def _unrolled_loss(head, d, idx, unroll, feature_weight, outputs):
    h, x, valid = d["h"][idx].float(), d["x"][idx], d["valid"][idx]
    scored = valid if "loss" not in d else valid & d["loss"][idx]
    B, T, _ = h.shape
    outs = outputs(head, h, x, valid, unroll)
    tgt = h[:, 1:, -head.hidden:]  # h_{p+1} for p < T-1 (the final-norm state, the last H of a tapped feature)
    with torch.no_grad():
        p_tgt = torch.softmax(head.logits(tgt), -1)  # [B, T-1, R]
    total, ce0 = 0.0, 0.0
    for u, out in enumerate(outs):
        m = (scored[:, 1:] & (torch.arange(T - 1, device=h.device) >= u)[None]).float()  # target exists, chain starts at p-u >= 0
        if m.sum() == 0:
            break
        o = out[:, :-1]
        feat = F.smooth_l1_loss(o / d["scale"], tgt / d["scale"], reduction="none").mean(-1)
        ce = -(p_tgt * torch.log_softmax(head.logits(o), -1)).sum(-1)
        level = ((ce + feature_weight * feat) * m).sum() / m.sum()
        total = total + 0.8 ** u * level
        if u == 0:
            ce0 = float((ce.detach() * m).sum() / m.sum())
    return total, ce0


def new_head(model, reduced: torch.Tensor, *, ffn: int, heads: int, window: int, dropout: float,
             taps: tuple[int, ...] = ()):
    """A fresh `DraftHead` on `model`'s embeddings: matrices N(0, 0.02), the output norm's weight
    from the target's final norm."""
    from server.engine.drafters.head import DraftHead

    return init_head(DraftHead(model.cfg.hidden_size, ffn, reduced, heads=heads, window=window, taps=taps), model,
                     dropout)


def init_head(head, model, dropout: float):
    """`head` attached to `model`'s embeddings and initialised for training: matrices N(0, 0.02),
    the output norm's weight from the target's final norm."""
    head.attach(model.embed, model.lm_head)
    head.dropout = dropout
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
        head.w_out.copy_(model.norm.float())
    return head


def training_schedule(head, lr: float, weight_decay: float, total_steps: int):
    """AdamW with a one-cycle learning rate over `total_steps`: (optimizer, scheduler)."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.05)


def optimizer_step(head, opt, sched, loss: torch.Tensor) -> None:
    """One training step: backward, clip the gradient norm to 1, step the optimizer and the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    opt.step()
    sched.step()


@torch.no_grad()
def evaluate(head, seqs: list[dict], reduced: torch.Tensor, gamma: int = 5, thresholds=(0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
             draft_cost: float = 0.07, chunk: int = 512) -> dict:
    """Held-out numbers. `top1`: head argmax on the true pairs == target greedy token, over every
    position (tokens outside the reduced vocabulary count as misses). Chained, on greedy answers
    (where the answer is the target's greedy continuation), with the drafter's own code: from
    each position, draft γ tokens from the last `window` pairs and count the leading matches;
    `tau` = expected tokens per step (matches + the bonus token), averaged over start positions.
    `tokens_per_step` walks each answer as the engine does: a step from position t commits its
    matches and the bonus token, and the next step starts after them. Where the head is right it
    commits many tokens in few steps, so the walk counts those stretches less than `tau` does, and
    is what the engine's tokens per step come to on these answers. Per threshold: the block stops
    at the first draft whose head probability is below it; `est_speedup` = walked tokens per step
    / (1 + draft_cost * drafted per step), with a draft token costing `draft_cost` of a step,
    ranks thresholds."""
    from server.engine.drafters.head import accepted_lengths, draft, pack_windows

    dev = head.fc.weight.device  # the data stays on the host; each slice goes where the head is
    d = pad_answers(seqs)
    hit, tot = 0, 0
    for b in range(0, len(d["h"]), 64):
        sl = slice(b, b + 64)
        valid = d["valid"][sl].to(dev)
        out = unrolled_outputs(head, d["h"][sl].to(dev).float(), d["x"][sl].to(dev), valid, 1)[0][:, :-1]
        pred = reduced.to(dev)[head.logits(out).argmax(-1)]
        m = valid[:, 1:]
        hit += int(((pred == d["y"][sl][:, 1:].to(dev)) & m).sum())
        tot += int(m.sum())
    res = {"top1": hit / max(tot, 1), "positions": tot, "gamma": gamma}
    W = head.window
    starts, first = [], []  # first: index in `starts` of each greedy answer's position 0
    for s in seqs:
        if s["kind"] != "greedy":
            continue
        T = len(s["hidden"])
        first.append((len(starts), T - 1))
        for t in range(T - 1):
            starts.append((s, t))
    if not starts:
        return res
    ids_all, probs_all, conts = [], [], []
    for c0 in range(0, len(starts), chunk):
        part = starts[c0:c0 + chunk]
        packed = []
        for s, t in part:
            lo = max(0, t - W + 1)
            packed.append((s["hidden"][lo:t + 1].float(), s["tokens"][lo + 1:t + 2], t))
            c = s["tokens"][t + 2:t + 2 + gamma]
            conts.append(torch.cat([c, torch.full((gamma - len(c),), -1, dtype=c.dtype)]))
        h, tok, pos, valid = (t.to(dev) for t in pack_windows(packed, W))
        ids, probs = draft(head, h, tok, pos, valid, gamma)
        ids_all.append(ids.cpu())
        probs_all.append(probs.cpu())
    ids, probs, cont = torch.cat(ids_all), torch.cat(probs_all), torch.stack(conts)
    match = (ids == cont).long().cumprod(1)  # leading matches
    res["chain_positions"] = int(len(cont))
    res["chained_accept_per_position"] = [round(float(v), 4) for v in match.float().mean(0)]
    res["tau"] = round(float(match.sum(1).float().mean()) + 1.0, 4)
    res["tokens_per_step"] = round(walk(match.sum(1), torch.full((len(cont),), gamma), first)[0], 4)
    per = []
    for th in thresholds:
        for mt in (0, 1):
            n = accepted_lengths(probs, torch.full((len(cont),), gamma), th, mt)
            keep = torch.arange(gamma)[None, :] < n[:, None]
            kept = (match.bool() & keep).long().sum(1)
            per_step, drafted = walk(kept, n, first)
            per.append({"threshold": th, "min_tokens": mt, "tau": round(float(kept.float().mean()) + 1.0, 4),
                        "tokens_per_step": round(per_step, 4), "drafted": round(drafted, 4),
                        "est_speedup": round(per_step / (1 + draft_cost * drafted), 4)})
    res["per_threshold"] = per
    return res


def walk(kept: torch.Tensor, drafted: torch.Tensor, answers: list[tuple[int, int]]) -> tuple[float, float]:
    """Steps through each answer as the engine does. `kept[i]` / `drafted[i]`: drafts kept and
    proposed from start i; `answers`: (index of the answer's first start, its number of starts).
    A step from start t commits its kept drafts and the bonus token, and the next step starts
    after them; from start t the answer has n - t tokens left. Returns (tokens per step, drafts
    proposed per step)."""
    kept_l, drafted_l = kept.tolist(), drafted.tolist()
    tokens = steps = proposed = 0
    for i0, n in answers:
        t = 0
        while t < n:
            step = min(kept_l[i0 + t] + 1, n - t)
            proposed += drafted_l[i0 + t]
            tokens += step
            steps += 1
            t += step
    return tokens / max(steps, 1), proposed / max(steps, 1)


def train_and_save(args, model_dir: Path, data: dict, argv) -> int:
    from tqdm import tqdm

    from server.engine.model import LlamaModel

    torch.manual_seed(args.seed)
    t0 = time.monotonic()
    device = torch.device(args.device)
    model = LlamaModel.from_folder(model_dir)
    taps = parse_taps(args.taps)
    train, held = split_by_prompt(data["seqs"], args.heldout, args.seed)
    eos = tuple(model.cfg.eos_token_ids)
    init = None
    if args.init:  # continue a saved head: its layout and reduced vocabulary stay
        from server.engine.drafters.head import DraftHead

        head, _ = DraftHead.load(Path(args.init))
        if taps != head.taps:
            if head.taps:
                raise SystemExit(f"--init {args.init} reads taps {list(head.taps)}: pass --taps "
                                 f"{','.join(map(str, head.taps))}")
            head = head.with_taps(taps)
        head.attach(model.embed, model.lm_head)
        head.dropout = args.dropout
        reduced = head.reduced_ids
        init_record = Path(args.init).with_suffix(".json")
        init = {"head": Path(args.init).name,
                "record": json.loads(init_record.read_text()) if init_record.exists() else None}
    else:
        reduced = reduced_vocabulary(train, args.vocab, eos, model.cfg.vocab_size)
    d = pad_answers(train)
    y_red = to_reduced(d["y"][d["valid"]], reduced, model.cfg.vocab_size)
    coverage = float((y_red >= 0).float().mean())
    N, npos = len(d["h"]), int(d["valid"].sum())
    print(f"train: {N} answers, {npos} positions; held out: {len(held)} answers; "
          f"reduced vocabulary {len(reduced)} covers {coverage:.3f} of the target's greedy tokens")
    d["scale"] = model.norm.float().abs().mean()
    if init is None:
        head = new_head(model, reduced, ffn=args.ffn, heads=args.heads, window=args.window, dropout=args.dropout,
                        taps=taps)
    del model
    if device.type != "cpu":  # the answers (fp16 features) and the head go to the device whole
        d = {k: v.to(device) for k, v in d.items()}
        head.to_device(device)
    steps_per_epoch = math.ceil(N / args.batch_size)
    total = steps_per_epoch * args.epochs
    opt, sched = training_schedule(head, args.lr, args.weight_decay, total)
    g = torch.Generator().manual_seed(args.seed)
    bar = tqdm(total=total, desc="train", unit="batch")
    head.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(N, generator=g)
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size].to(device)
            loss, ce = unrolled_loss(head, d, idx, args.unroll, args.feature_weight, bf16=args.bf16)
            optimizer_step(head, opt, sched, loss)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3f}", ce=f"{ce:.3f}")
        if epoch + 1 < args.epochs:
            head.eval()
            bar.write(f"epoch {epoch + 1}: held-out top-1 {evaluate(head, held, reduced, thresholds=())['top1']:.3f}")
            head.train()
    bar.close()
    head.eval()
    train_seconds = time.monotonic() - t0
    ev = evaluate(head, held, reduced, gamma=args.gamma)
    head.to_device("cpu")
    best = max(ev["per_threshold"], key=lambda r: (r["est_speedup"], r["threshold"]))
    print(f"held-out top-1 acceptance {ev['top1']:.3f} over {ev['positions']} positions")
    print(f"held-out chained (γ={args.gamma}, own features): per position {ev['chained_accept_per_position']}, "
          f"expected tokens per step {ev['tau']:.3f}")
    print(f"chosen threshold {best['threshold']} (min_tokens {best['min_tokens']}): tokens per step {best['tau']:.3f}, "
          f"drafted {best['drafted']:.2f}")
    stem = trained_stem(args.out, model_dir.name)
    stem.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": model_dir.name,
        "command": "via-sd train-head " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "prompts": str(Path(args.prompts).name),
        "data": {"answers": len(data["seqs"]), "train_answers": len(train), "heldout_answers": len(held),
                 "train_positions": npos, "num_prompts": data.get("num_prompts"), "max_tokens": args.max_tokens,
                 "self_instructions": args.self_instructions,
                 "sampled_per_prompt": args.sampled, "temperature": args.temperature,
                 "collect_seconds": round(float(data.get("collect_seconds", 0.0)), 1)},
        "head": {"arch": "eagle-window", "hidden": head.hidden, "ffn": head.ffn, "heads": head.heads,
                 "window": head.window, "taps": list(head.taps), "reduced_vocab": len(reduced),
                 "params": head.num_params(),
                 "reduced_vocab_coverage_train": round(coverage, 4)},
        "training": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "unroll": args.unroll,
                     "feature_weight": args.feature_weight, "dropout": args.dropout, "weight_decay": args.weight_decay,
                     "bf16": args.bf16, "device": str(device),
                     "seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads()},
        "init": init,
        "heldout": ev,
        "threshold": best["threshold"],
        "min_tokens": best["min_tokens"],
        "date": time.strftime("%Y-%m-%d"),
    }
    head.save(Path(str(stem) + ".safetensors"), {"threshold": best["threshold"], "min_tokens": best["min_tokens"],
                                                 "model": model_dir.name})
    Path(str(stem) + ".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {stem}.safetensors and {stem}.json; serve it with --draft-head {stem}.safetensors")
    return 0


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="via-sd train-head", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", default="builtin",
                   help="a JSONL of {id, category, prompt}; 'builtin' (default) = assets/train_prompts.jsonl plus "
                        "the first two templated sets of train_prompts.py; 'third' = its third templated set "
                        "(train_prompts.third_prompts); 'papers' = passages of the aclsum package's papers to "
                        "summarize and answer from (train_prompts.paper_prompts); names join with '+' "
                        "(e.g. 'builtin+third'); 'self' = only the --self-instructions")
    p.add_argument("--limit-prompts", type=int, default=None)
    p.add_argument("--self-instructions", type=int, default=0,
                   help="also N instructions the model writes itself (user turns sampled from its chat template), "
                        "cached beside --data")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--sampled", type=int, default=1, help="sampled answers per prompt, besides the greedy one")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", default=None, help="feature cache (.pt); reused when it exists")
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--vocab", type=int, default=4096, help="reduced vocabulary size")
    p.add_argument("--ffn", type=int, default=1536, help="the head's MLP width")
    p.add_argument("--heads", type=int, default=9, help="attention heads of the head's layer")
    p.add_argument("--window", type=int, default=32, help="pairs the head's attention looks back over")
    p.add_argument("--taps", default="",
                   help="layers (comma-separated indices) whose outputs the head reads besides the final-norm "
                        "state, fused first (EAGLE-3's low- and mid-level features); with --init on a head "
                        "without them, the fusion starts as the identity on the final-norm state")
    p.add_argument("--gamma", type=int, default=5, help="draft length of the held-out chained evaluation")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--batch-size", type=int, default=8, help="answers per batch")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--unroll", type=int, default=3, help="training levels chained on the head's own features")
    p.add_argument("--feature-weight", type=float, default=1.0)
    p.add_argument("--bf16", action="store_true",
                   help="train under bf16 autocast: the matrix products in bf16 (1.5-1.8x faster measured on AMD EPYC "
                        "CPUs with AVX-512 bf16), weights and optimizer state fp32")
    p.add_argument("--device", default="cpu",
                   help="where the answers are generated and the head trained: cpu (default), cuda or cuda:N; the "
                        "features stay on the host, the head is saved from the host")
    p.add_argument("--heldout", type=float, default=0.1, help="share of prompts held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="output stem: <out>.safetensors and <out>.json (default: ~/.cache/via-sd/heads/<model>.head; "
                        "the package's own head is replaced only when named here)")
    p.add_argument("--init", default=None,
                   help="continue training this saved head (.safetensors; its layout and reduced vocabulary are "
                        "kept) instead of a fresh one")
    p.add_argument("--evaluate", action="store_true",
                   help="train nothing: collect the held-out prompts' answers only, evaluate the head at --out "
                        "(default: the shipped one) and rewrite the held-out numbers of its record")
    return p


def evaluate_saved(args, model_dir: Path, data: dict, argv) -> int:
    """`--evaluate`: the held-out numbers of a trained head, from the same held-out prompts as its
    training (the split depends only on the prompt ids and the seed), written into its record."""
    from server.engine.drafters.head import DraftHead
    from server.engine.model import LlamaModel

    stem = Path(args.out) if args.out else ASSETS / f"{model_dir.name}.head"
    head, info = DraftHead.load(Path(str(stem) + ".safetensors"))
    model = LlamaModel.from_folder(model_dir)
    head.attach(model.embed, model.lm_head)
    del model
    ev = evaluate(head, data["seqs"], head.reduced_ids, gamma=args.gamma)
    record_path = Path(str(stem) + ".json")
    record = json.loads(record_path.read_text()) if record_path.exists() else {"model": model_dir.name}
    record["heldout"] = ev
    record["heldout_command"] = "via-sd train-head " + " ".join(argv if argv is not None else sys.argv[1:])
    record["heldout_date"] = time.strftime("%Y-%m-%d")
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    chosen = next((r for r in ev.get("per_threshold", []) if r["threshold"] == info.get("threshold")
                   and r["min_tokens"] == info.get("min_tokens")), None)
    print(f"held-out top-1 acceptance {ev['top1']:.3f} over {ev['positions']} positions; "
          f"γ={args.gamma}: {ev.get('tau', 1.0):.3f} tokens per start position, "
          f"{ev.get('tokens_per_step', 1.0):.3f} per step walked as the engine does")
    if chosen:
        print(f"at the head's threshold {chosen['threshold']} (min_tokens {chosen['min_tokens']}): "
              f"{chosen['tokens_per_step']:.3f} tokens per step, {chosen['drafted']:.2f} drafted per step")
    print(f"wrote {record_path}")
    return 0


def cached_self_instructions(args, model_dir: Path, folder: Path) -> list[dict]:
    """`self_instructions` for `args`, read from (or written to) a JSONL in `folder`."""
    path = folder / f"{model_dir.name}.self-instructions-seed{args.seed}-{args.self_instructions}.jsonl"
    if path.exists():
        return load_prompts(path, None)
    rows = self_instructions(str(model_dir), args.self_instructions, seed=args.seed, batch=args.batch,
                             threads=args.threads)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} instructions the model wrote itself to {path}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from server.engine.model_files import prepare_model

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"via-sd train-head: --device {args.device}, but torch sees no CUDA device here", file=sys.stderr)
        return 2

    model_dir = Path(args.model) if args.model else prepare_model()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_name = f"{model_dir.name}.head-{'heldout' if args.evaluate else 'data'}.pt"
    data_path = Path(args.data) if args.data else Path.home() / ".cache" / "via-sd" / cache_name
    if args.prompts == "self" and not args.self_instructions:
        print("via-sd train-head: --prompts self needs --self-instructions N", file=sys.stderr)
        return 2
    prompts = [] if args.prompts == "self" else named_prompts(args.prompts, args.seed)
    if prompts is None:
        prompts = load_prompts(Path(args.prompts), None)
    if args.limit_prompts:
        prompts = prompts[: args.limit_prompts]
    if args.self_instructions:
        prompts = prompts + cached_self_instructions(args, model_dir, data_path.parent)
    if args.evaluate:  # the held-out prompts only, split as training splits the answers
        _, held = split_by_prompt([{"prompt_id": r["id"]} for r in prompts], args.heldout, args.seed)
        held_ids = {h["prompt_id"] for h in held}
        prompts = [r for r in prompts if r["id"] in held_ids]
    key = {"model": model_dir.name, "prompts": Path(args.prompts).name, "max_tokens": args.max_tokens,
           "sampled": args.sampled, "temperature": args.temperature, "seed": args.seed}
    taps = parse_taps(args.taps)
    if args.evaluate and not taps:  # the held-out features are the evaluated head's
        from server.engine.drafters.head import DraftHead

        stem = Path(args.out) if args.out else ASSETS / f"{model_dir.name}.head"
        taps = DraftHead.load(Path(str(stem) + ".safetensors"))[0].taps
    if taps:  # the features differ in width; a cache without taps keeps its key
        key["taps"] = list(taps)
    data = {"key": key, "seqs": [], "collect_seconds": 0.0, "num_prompts": len(prompts)}
    if data_path.exists():
        old = torch.load(data_path)
        if {k: v for k, v in old.get("key", {}).items() if k != "num_prompts"} == key:  # answers are per prompt id
            data["seqs"], data["collect_seconds"] = old["seqs"], old["collect_seconds"]
            print(f"loaded {len(data['seqs'])} answers from {data_path}")
    wanted = {r["id"] for r in prompts}
    data["seqs"] = [a for a in data["seqs"] if a["prompt_id"] in wanted]
    if len(data["seqs"]) < len(prompts) * (1 + args.sampled):
        t0, base = time.monotonic(), data["collect_seconds"]
        data_path.parent.mkdir(parents=True, exist_ok=True)

        last_save = [time.monotonic()]

        def checkpoint(answers, final=False):
            data["seqs"], data["collect_seconds"] = answers, base + time.monotonic() - t0
            if final or time.monotonic() - last_save[0] > 300:  # the file grows to hundreds of MB
                torch.save(data, data_path)
                last_save[0] = time.monotonic()

        collect(str(model_dir), prompts, max_tokens=args.max_tokens, sampled=args.sampled, temperature=args.temperature,
                seed=args.seed, batch=args.batch, threads=args.threads, done=data["seqs"], checkpoint=checkpoint,
                taps=taps, device=args.device)
        checkpoint(data["seqs"], final=True)
        print(f"collected {len(data['seqs'])} answers, {sum(len(s['hidden']) for s in data['seqs'])} positions "
              f"in {data['collect_seconds']:.0f}s -> {data_path}")
    if args.collect_only:
        return 0
    if args.evaluate:
        return evaluate_saved(args, model_dir, data, argv)
    return train_and_save(args, model_dir, data, argv)


if __name__ == "__main__":
    sys.exit(main())
