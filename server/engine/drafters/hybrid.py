"""The `hybrid` drafter: prompt lookup where the context repeats itself, the trained head elsewhere.

The two drafters are right in different places. Prompt lookup (n-gram) copies spans of the prompt
or of the answer so far: it is long and right on translation, summarization and retrieval, costs
nothing to propose, and has nothing to say when the text is new. The head (`head.py`) predicts new
text from the target's hidden states, is right about half the time at the first token wherever it
is, and costs a small forward per draft. So for each sequence the hybrid takes the n-gram draft
when the context's last `n_min` (default 2) or more tokens occurred before, and asks the head only
for the others, in one batched call. A single-token match is weak evidence (it is mostly function
words) and goes to the head.

A model without a trained head (no `spec.head_path` and none shipped for it) gets lookup alone, at
the n-gram drafter's sizes, and the log says so once: `hybrid` is then `ngram`.

Both parts are deterministic (`draft_probs` None), so `binary` stays lossless. The head's state is
kept current for every sequence (`observe`), whichever part drafted its last step.
"""

from __future__ import annotations

import logging

import torch

from server.engine.drafters.base import DraftBatch, Drafter
from server.engine.drafters.head import HeadDrafter
from server.engine.drafters.ngram import lookup

log = logging.getLogger("via_sd.engine")


class HybridDrafter(Drafter):
    name = "hybrid"
    def __init__(self, engine, *, head: HeadDrafter | None = None, n_min: int | None = None, n_max: int | None = None):
        spec = engine.config.spec
        if head is None:
            try:
                head = HeadDrafter(engine)
            except FileNotFoundError as e:
                if spec.head_path:  # a head asked for by name is not quietly replaced by lookup
                    raise
                log.warning("drafter hybrid: %s; drafting by n-gram lookup alone", e)
        self.head = head
        default_min = spec.ngram_min if head is None else max(2, spec.ngram_min)
        self.n_min = default_min if n_min is None else n_min
        self.n_max = max(self.n_min, spec.ngram_max) if n_max is None else n_max
        if not (1 <= self.n_min <= self.n_max):
            raise ValueError("hybrid n-gram sizes need 1 <= n_min <= n_max")
        self.wants_hidden = self.head is not None
        self.taps = self.head.taps if self.head is not None else ()
        self.lookups = 0  # steps drafted by lookup, and by the head: what the mix was
        self.head_calls = 0

    def propose(self, seqs, max_tokens: list[int], pass_cost=None) -> DraftBatch:
        out: list[list[int]] = [[] for _ in seqs]
        spans: list[int | None] = [None] * len(seqs)
        rest = []
        for i, (seq, k) in enumerate(zip(seqs, max_tokens)):
            if k <= 0:
                continue
            out[i], span = lookup(seq, self.n_min, self.n_max, k)
            if out[i]:
                spans[i] = span
                self.lookups += 1
            else:
                rest.append(i)
        conf: list[list[float] | None] = [None] * len(seqs)  # lookups carry no probability
        if rest and self.head is not None:
            self.head_calls += len(rest)
            got = self.head.propose([seqs[i] for i in rest], [max_tokens[i] for i in rest],
                                    pass_cost if len(seqs) == 1 else None)
            for j, (i, toks) in enumerate(zip(rest, got.tokens)):
                out[i] = toks
                if got.confidence is not None:
                    conf[i] = got.confidence[j]
        return DraftBatch(out, confidence=conf, spans=spans)

    def observe(self, seq, hidden: torch.Tensor | None, tokens: list[int] | None = None) -> None:
        if self.head is not None:
            self.head.observe(seq, hidden, tokens)

    def release(self, seq) -> None:
        if self.head is not None:
            self.head.release(seq)
