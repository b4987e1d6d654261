"""The drafter interface.

A drafter proposes up to `max_tokens[i]` tokens for each sequence of a batch, in one call (so a
model-based drafter batches its forwards). It may propose fewer, or none: the n-gram drafter
proposes nothing when the context has no match, a model drafter stops where it is unsure.

`draft_probs` is None for a deterministic drafter (verification then treats p as one-hot), or a
`[T, V]` tensor of the drafter's distributions, flat in the same order as the tokens.
`confidence` optionally gives, per token, the drafter's own probability that it is right.
`spans` optionally gives, per sequence, the length of the context match a lookup draft copies
(None for a draft that is not a lookup): the engine learns how often drafts after a match of each
span are accepted (`server.engine.draft_length.LookupAcceptance`).

`pass_cost`, when given, is the relative cost line (r(n): a verification pass over n tokens, in
one-token passes) by which verification will trim the one sequence of the call
(`draft_length.best_length`); a drafter that pays for each token it drafts may stop where no
longer draft could be kept. Drafters that cost nothing per token ignore it.

A drafter with `wants_hidden` gets `observe(seq, hidden [m, H], tokens)` after every step that
commits tokens for a speculative sequence (plain steps included), before they join the sequence:
the target's final-norm hidden states that predicted the m committed tokens (from the full pass
when it ran, else from the slim pass). That is what a head reading hidden states (EAGLE family)
needs; other drafters ignore it. A drafter with `taps` gets the outputs of those layers too.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch


@dataclass
class DraftBatch:
    tokens: list[list[int]]
    draft_probs: torch.Tensor | None = None  # [T, V]
    # per sequence, the drafter's probability of each of its tokens, or None where it has none
    # (prompt lookup): what `server.engine.draft_length` weighs each draft by
    confidence: list[list[float] | None] | None = None
    # per sequence, the span of the match a lookup draft copies (`ngram_match`), None elsewhere
    spans: list[int | None] | None = None


class Drafter(abc.ABC):
    name: str = "drafter"
    wants_hidden: bool = False
    # layers whose outputs `observe`'s hidden states carry before the final-norm state
    # ([m, (len(taps) + 1) H]): a head that reads low- and mid-level features
    taps: tuple[int, ...] = ()

    @abc.abstractmethod
    def propose(self, seqs: list, max_tokens: list[int], pass_cost=None) -> DraftBatch: ...

    def observe(self, seq, hidden: torch.Tensor | None, tokens: list[int] | None = None) -> None:
        return None

    def release(self, seq) -> None:
        """The sequence finished, was aborted or preempted: drop any state held for it."""
        return None
