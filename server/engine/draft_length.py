"""How many of a sequence's draft tokens to verify: as many as pay for their place in the pass.

A verification pass over n + 1 tokens costs more than a plain decode step by a factor r(n + 1)
that depends on the machine: on a GPU, or on a CPU streaming fp32 weights, r stays near 1 for a
few tokens (the pass is bound by reading the weights); on a CPU reading packed 4-bit weights the
pass is bound by fp32 multiply-adds, and six tokens cost about 1.8 times one. What n draft tokens
buy is the tokens the step commits, 1 + the expected run of accepted drafts:

    E(n) = 1 + sum_{i <= n} a_1 a_2 ... a_i

with a_i the chance that draft i is accepted once drafts 1 .. i-1 were. The step keeps the n that
maximises E(n) / r(n + 1), which is 0 (a plain step) when no draft is likely enough.

* `PassCosts` measures r: every one-sequence decode-sized full pass is timed with its token
  count and the context it attends to. A pass's seconds grow with its context as much as with its
  width, while its cost relative to a one-token pass at the same context barely moves (this CPU,
  hybrid drafts over 48 Spec-Bench prompts, `benchmarks/pass_costs.py`: one token 6.8 ms under
  200 positions and 9.8 ms at 800-1,600; four tokens 1.43x, 1.45x and 1.36x the one-token pass of
  their context bin). So one-token passes, kept by context (a bucket per power of two), give a
  base line of seconds against context, and each wider pass counts as its ratio to that line at
  its own context: r(n) is the median of the latest 31 such ratios of n tokens, and a line through
  the measured sizes where a size has not run (a prior slope until one-token passes and a wider
  size have been seen a few times). The first form of this table, medians of raw seconds by size,
  mixed contexts: lookup drafts run long in rag and summarization answers, whose passes read
  ~1,000 positions, so over one run r(4) read anywhere from 1.19 to 2.13 (1.32-1.48 by context)
  by which prompts had run last, and the draft lengths cut by it moved with it.
* `LookupAcceptance` estimates a for prompt-lookup drafts from the span of the match they copy
  (`drafters.ngram.ngram_match`), engine-wide: per span and draft position, discounted counts of
  drafts kept over drafts checked. Replaying the `off` answers of the 60 Spec-Bench prompts, the
  first copied token was kept 23% of the time after a 1-token match, 47% after 2, 69% after 4 and
  95% after 12 or more. In that replay, with the pass costs of this CPU, choosing each step's
  length from rates learned as the replay went committed 1.26 tokens per unit of pass cost
  (1.45 per step); verifying every lookup draft committed 0.97 (1.63 per step).
* `AcceptanceEstimate` keeps a per-sequence estimate of a for other drafts that carry no
  probability of their own, as discounted counts of kept drafts over drafts checked; like
  `LookupAcceptance` it verifies one draft token now and then once its drafts stopped paying.
  Drafts with a probability (the draft head's) use it as a_i.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

# r(n) = 1 + slope (n - 1) until measured. On the CPU boxes a verified token adds 0.16-0.23 of a
# one-token pass (its fp32 multiply-adds at the two cores' peak: `benchmarks/step_phases.py`, passes
# by size); elsewhere between a weight-bound pass (0) and that
PRIOR_SLOPE = 0.1
CPU_PRIOR_SLOPE = 0.2
MIN_SAMPLES = 3  # passes of a size before its median counts


def prior_slope(device_type: str) -> float:
    """The prior cost line's slope for a device type ("cpu", "cuda", ...)."""
    return CPU_PRIOR_SLOPE if device_type == "cpu" else PRIOR_SLOPE


def prior_relative(tokens: int, slope: float = PRIOR_SLOPE) -> float:
    """The prior cost line, in plain decode steps: what `PassCosts.relative` gives before any
    measurement (for requests whose steps must not depend on timings: a fixed line per device
    type, never the measured one)."""
    return 1.0 + slope * (tokens - 1)


class PassCosts:
    """Relative pass costs r(n) from timed one-sequence passes (module docstring)."""

    def __init__(self, max_tokens: int = 64, keep: int = 31, prior_slope: float = PRIOR_SLOPE):
        self.prior_slope = prior_slope
        self.keep = keep
        self.reset(max_tokens)

    def reset(self, max_tokens: int | None = None) -> None:
        """Forget every measurement (back to the prior line)."""
        n = max_tokens if max_tokens is not None else len(self.samples) - 1
        # per size: (context, seconds) of the latest passes
        self.samples: list[deque] = [deque(maxlen=self.keep) for _ in range(n + 1)]
        # one-token passes also by context, a power of two a bucket: the base line's points
        self.ones: dict[int, deque] = {}
        self.count = [0] * (n + 1)
        self._table: list[float | None] | None = None  # r(n) where measured, refitted every 16 passes
        self._slope: float | None = None  # the line through the measured sizes' r(n)
        self._since_fit = 0

    def observe(self, tokens: int, seconds: float, context: int = 0) -> None:
        """A timed pass over `tokens` new tokens attending to `context` positions in all."""
        if not 1 <= tokens < len(self.samples) or seconds <= 0:
            return
        sample = (max(0, int(context)), seconds)
        self.samples[tokens].append(sample)
        if tokens == 1:
            self.ones.setdefault(sample[0].bit_length(), deque(maxlen=self.keep)).append(sample)
        self.count[tokens] += 1
        self._since_fit += 1
        # refit now and then (a few hundred microseconds of Python each); at every pass while no
        # wide size has been measured
        if self._since_fit >= 16 or self._slope is None:
            self._table, self._since_fit = None, 0

    def seconds(self, tokens: int) -> float | None:
        """The median seconds of the latest passes over `tokens` tokens, whatever their context."""
        s = self.samples[tokens]
        return statistics.median(t for _, t in s) if len(s) >= MIN_SAMPLES else None

    def base(self) -> tuple[float, float] | None:
        """A one-token pass's seconds against its context, (at context 0, per position): the
        least-squares line through the median context and seconds of each context bucket that
        holds a few one-token passes (the buckets weigh the same, so the latest prompt's contexts
        do not make the line; a stray slow pass moves no median). Flat with one bucket."""
        pts = [(statistics.median(c for c, _ in b), statistics.median(t for _, t in b))
               for b in self.ones.values() if len(b) >= MIN_SAMPLES]
        if not pts:
            return None
        mc = sum(c for c, _ in pts) / len(pts)
        mt = sum(t for _, t in pts) / len(pts)
        sxx = sum((c - mc) ** 2 for c, _ in pts)
        per = max(0.0, sum((c - mc) * (t - mt) for c, t in pts) / sxx) if sxx > 0 else 0.0
        at0 = mt - per * mc
        return (at0, per) if at0 > 0 else (mt, 0.0)

    def _fit(self) -> None:
        table: list[float | None] = [None] * len(self.samples)
        table[1] = 1.0
        slope = None
        line = self.base()
        if line is not None:
            at0, per = line
            pts = []
            for n in range(2, len(self.samples)):
                s = self.samples[n]
                if len(s) >= MIN_SAMPLES:
                    table[n] = statistics.median(t / (at0 + per * c) for c, t in s)
                    pts.append((n, table[n], min(self.count[n], 20)))
            if pts:  # r(n) = 1 + slope (n - 1) through the measured sizes, weighted by how often each ran
                slope = max(0.0, sum(w * (r - 1) * (n - 1) for n, r, w in pts) / sum(w * (n - 1) ** 2 for n, _, w in pts))
        self._table, self._slope = table, slope

    def relative(self, tokens: int) -> float:
        """Cost of a pass over `tokens` tokens, in one-token passes at the same context: measured
        where that size has run, else from the line through the measured sizes, else the prior."""
        if tokens <= 1:
            return 1.0
        if self._table is None:
            self._fit()
        if tokens < len(self._table) and self._table[tokens] is not None:
            return self._table[tokens]
        return 1.0 + (self.prior_slope if self._slope is None else self._slope) * (tokens - 1)


@dataclass
class AcceptanceEstimate:
    """Chance that a draft without a probability of its own is accepted, given the ones before it
    were: discounted kept / checked, starting from `prior` over `weight` checked drafts.

    A sequence whose drafts stop paying has none verified, so nothing would tell it that they
    pay again: after `explore_every` such steps in a row one draft token is verified anyway.

    A model drafter asks twice in a step: before drafting, at its own price
    (`drafters.autoregressive.DraftPrice`), and again when verification trims the draft
    (`SpecDecoder._trim`). Both calls name the step (`at`, the sequence's length), so the token the
    first call granted is kept by the second, even where a measured verification pass looks too
    dear for one draft token to pay (a loaded box)."""

    kept: float = 1.4
    checked: float = 2.0
    decay: float = 0.9
    explore_every: int = 16
    skipped: int = 0
    granted_at: int | None = None  # the step (sequence length) whose exploration token was granted

    @property
    def rate(self) -> float:
        return self.kept / self.checked

    def chances(self, n: int) -> list[float]:
        return [self.rate] * n

    def length(self, n: int, relative_cost, at: int | None = None) -> int:
        """How many of a draft's n tokens to verify."""
        return self.explore(best_length(self.chances(n), relative_cost), n, at)

    def explore(self, keep: int, n: int, at: int | None = None) -> int:
        """`keep` of a draft's n tokens pay: that, or 1 where none have paid for a while (or where
        an earlier call for the same step `at` granted it)."""
        if keep == 0 and n > 0:
            if at is not None and at == self.granted_at:
                return 1
            self.skipped += 1
            if self.skipped >= self.explore_every:
                self.skipped = 0
                self.granted_at = at
                return 1
        elif keep:
            self.skipped = 0
        return keep

    def update(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        checked = accepted + (1 if accepted < drafted else 0)  # drafts after the first rejection are not tried
        self.kept = self.decay * self.kept + accepted
        self.checked = self.decay * self.checked + checked


class LookupAcceptance:
    """Chance that token i of a lookup draft is accepted once tokens 0 .. i-1 were, by the span of
    the match it copies (spans from `max_span` on share a bucket): discounted kept / checked over
    every sequence's lookup drafts, starting from a prior of `prior_weight` drafts in which longer
    matches continue more often (first token m / (m + 2), later ones (m + 3) / (m + 5)).

    A span whose drafts stop paying is no longer verified, so nothing would tell it that they pay
    again: after `explore_every` such steps in a row one draft token of it is verified anyway."""

    def __init__(self, max_span: int = 8, positions: int = 8, decay: float = 0.995, prior_weight: float = 4.0,
                 explore_every: int = 32):
        self.max_span, self.positions, self.decay = max_span, positions, decay
        self.explore_every = explore_every
        self.kept = [[prior_weight * self.prior(m, i) for i in range(positions)] for m in range(max_span + 1)]
        self.checked = [[prior_weight] * positions for _ in range(max_span + 1)]
        self.skipped = [0] * (max_span + 1)

    @staticmethod
    def prior(span: int, i: int) -> float:
        return span / (span + 2) if i == 0 else (span + 3) / (span + 5)

    def _bucket(self, span: int) -> int:
        return max(1, min(span, self.max_span))

    def chances(self, span: int, n: int) -> list[float]:
        b = self._bucket(span)
        return [self.kept[b][min(i, self.positions - 1)] / self.checked[b][min(i, self.positions - 1)]
                for i in range(n)]

    def length(self, span: int, n: int, relative_cost) -> int:
        """How many of a lookup draft's n tokens to verify."""
        return self.explore(span, best_length(self.chances(span, n), relative_cost), n)

    def explore(self, span: int, keep: int, n: int) -> int:
        """`keep` of a lookup draft's n tokens pay: that, or 1 where drafts after matches of this
        span have not paid for a while."""
        b = self._bucket(span)
        if keep == 0 and n > 0:
            self.skipped[b] += 1
            if self.skipped[b] >= self.explore_every:
                self.skipped[b] = 0
                return 1
        return keep

    def update(self, span: int, drafted: int, accepted: int) -> None:
        """A verified lookup draft of `drafted` tokens whose first `accepted` were kept."""
        if drafted <= 0:
            return
        b = self._bucket(span)
        self.skipped[b] = 0
        kept, checked = self.kept[b], self.checked[b]
        for i in range(min(accepted + 1, drafted)):  # tokens after the first rejection are not tried
            j = min(i, self.positions - 1)
            kept[j] = self.decay * kept[j] + (1.0 if i < accepted else 0.0)
            checked[j] = self.decay * checked[j] + 1.0


def best_length(chances: list[float], relative_cost) -> int:
    """The n in 0..len(chances) that maximises E(n) / relative_cost(n + 1)."""
    best_n, best = 0, 1.0 / relative_cost(1)
    expected, run = 1.0, 1.0
    for i, a in enumerate(chances):
        run *= max(0.0, min(1.0, a))
        expected += run
        v = expected / relative_cost(i + 2)
        if v > best:
            best_n, best = i + 1, v
    return best_n


def best_lengths(chances: list[list[float]], relative_cost) -> list[int]:
    """For the B sequences of one pass, how many of each one's drafts to verify: the n_i that
    maximise sum_i E_i(n_i) / relative_cost(B + sum_i n_i), what the pass commits per unit of its
    cost. Each draft token adds its chance of being committed (the product of its own and its
    predecessors' chances), so the best choice takes tokens by that chance, highest first, and
    stops where the ratio peaks: a prefix of every sequence's draft. One sequence: `best_length`.

    A token in a batch of B buys a B-th of the pass's tokens, against the same marginal cost, so
    drafts must be likelier to pay as the batch grows: where each token adds 0.21 of a one-token
    pass (this CPU's packed passes), a first draft token pays from a chance of 0.21 alone, 0.35
    beside one other sequence, 0.52 beside three."""
    b = len(chances)
    if b == 0:
        return []
    tokens: list[tuple[float, int]] = []  # (chance of being committed, sequence), in draft order
    for i, ch in enumerate(chances):
        run = 1.0
        for a in ch:
            run *= max(0.0, min(1.0, a))
            tokens.append((run, i))
    tokens.sort(key=lambda t: -t[0])  # stable: each sequence's tokens keep their order
    best_k, best = 0, b / relative_cost(b)
    expected = float(b)
    for k, (run, _) in enumerate(tokens, 1):
        expected += run
        v = expected / relative_cost(b + k)
        if v > best:
            best_k, best = k, v
    keep = [0] * b
    for _, i in tokens[:best_k]:
        keep[i] += 1
    return keep
