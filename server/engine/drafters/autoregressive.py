"""Greedy autoregressive drafting, batched over sequences, shared by the `self` and `model`
drafters: feed what the drafter has not seen, then one token at a time, stopping a sequence
where the drafter's top probability falls below `min_confidence` (it is unsure) or at its limit.

Such a drafter runs a model for every draft token, so drafting has a price of its own, paid
before verification can say whether the drafts were worth it: `DraftPrice` decides how many
tokens to draft at all.
"""

from __future__ import annotations

import time

import torch

from server.engine.draft_length import AcceptanceEstimate, best_length, prior_relative, prior_slope
from server.engine.kv_cache import Chunk


def draft_loop(forward, first_chunks: list[Chunk], max_tokens: list[int], min_confidence: float,
               timed=None) -> list[list[int]]:
    """`forward(chunks) -> logits [B, V]` (one row per chunk). `first_chunks[i]` feeds sequence
    i's unseen tokens; later rounds feed the previous draft token. Returns the drafts.
    `timed(seconds, chunks)`, when given, hears how long each forward took."""
    drafts: list[list[int]] = [[] for _ in first_chunks]
    active = [i for i, k in enumerate(max_tokens) if k > 0]
    chunks = {i: first_chunks[i] for i in active}
    while active:
        batch = [chunks[i] for i in active]
        t0 = time.perf_counter()
        logits = forward(batch)  # [len(active), V]
        probs = torch.softmax(logits.float(), -1)
        conf, tok = probs.max(-1)
        conf_l, tok_l = conf.tolist(), tok.tolist()  # the host sync ends the forward's time
        if timed is not None:
            timed(time.perf_counter() - t0, batch)
        nxt = []
        for j, i in enumerate(active):
            if drafts[i] and conf_l[j] < min_confidence:
                continue  # unsure: stop drafting this sequence (the first token is always kept)
            drafts[i].append(tok_l[j])
            if len(drafts[i]) < max_tokens[i]:
                c = chunks[i]
                chunks[i] = Chunk(c.table, c.start + len(c.token_ids), [tok_l[j]], 1)
                nxt.append(i)
        active = nxt
    return drafts


class DraftPrice:
    """What one draft token costs to make, in one-token passes of the target, and how many tokens
    a sequence should draft at that price.

    Verification keeps the leading drafts that pay for their place in the pass
    (`SpecDecoder._trim`), but a model drafter has paid for every token it drafted by then: on
    the bundled model a `self` draft token (a route over most of the target's layers) costs most
    of a pass, and drafting every step ran at about half `off`'s speed. So before drafting, each
    sequence drafts the n tokens that maximise E(n) / (r(n + 1) + n c), with E(n) the tokens a step
    commits at the sequence's own keep rate (`Sequence.draft_accept`), r the verification pass's
    cost and c this price; none where no n beats a plain step, except one token now and then
    (`AcceptanceEstimate.explore`) so that the keep rate stays measured.

    c is measured: a running mean of one-sequence, one-token draft forwards (decay 0.9) over
    the engine's one-token full pass (`PassCosts`), `prior` (the drafter's share of the target's
    parameters) until both have been seen. A seeded three-tier request, whose text must not
    depend on timings (`spec_step._fixed_path`), prices with `prior` and the prior cost line."""

    def __init__(self, engine, prior: float, decay: float = 0.9):
        self.engine = engine
        self.prior = prior
        self.decay = decay
        self.seconds: float | None = None  # running mean of one-token, one-sequence draft forwards

    def observe(self, seconds: float, chunks: list[Chunk]) -> None:
        if len(chunks) == 1 and len(chunks[0].token_ids) == 1 and seconds > 0:
            self.seconds = seconds if self.seconds is None else self.decay * self.seconds + (1 - self.decay) * seconds

    def relative(self) -> float:
        one = self.engine.pass_costs.seconds(1)
        return self.seconds / one if self.seconds is not None and one else self.prior

    def lengths(self, seqs, max_tokens: list[int]) -> list[int]:
        if not self.engine.spec.adaptive:
            return list(max_tokens)
        from server.engine.spec_step import _fixed_path

        measured = self.relative()
        out = []
        for seq, k in zip(seqs, max_tokens):
            if k <= 0:
                out.append(0)
                continue
            if seq.draft_accept is None:
                seq.draft_accept = AcceptanceEstimate()
            est = seq.draft_accept
            if _fixed_path(seq):
                slope = prior_slope(self.engine.device.type)
                price, line = self.prior, (lambda n, s=slope: prior_relative(n, s))
            else:
                price, line = measured, self.engine.pass_costs.relative
            n = best_length(est.chances(k), lambda tokens: line(tokens) + (tokens - 1) * price)
            out.append(est.explore(n, k, at=seq.num_tokens))
        return out
