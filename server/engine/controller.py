"""The slim-tier controller: does the middle tier pay for this request, right now?

A three-tier step costs one slim pass (`slim_cost`, its share of the full model's weights, read
once per pass on a memory-bound machine) plus, when it escalates, a full pass less the prefix the
slim pass already computed. A binary step costs one full pass. What each buys is the tokens it
commits. The controller keeps, per request, an exponentially weighted estimate of tokens per
full-pass-equivalent for both kinds of step, runs the better one, and tries the other every
`explore_every` steps so that a change in the text (a code block, a quote to copy) is noticed.
An exploration that confirms the choice doubles the period (up to `max_explore_every`); one that
changes it resets the period. On a model where the slim tier seldom pays, a 128-token request
then spends 2 warm-up and about 3 exploring steps on it, not 4 and 5. The warm-up measures each
kind of step `warmup` times before comparing them: with one binary sample, a single rejected
draft made the slim tier look better and kept it on until the next exploration.

What the engine has seen also carries over: an engine-wide estimate (`prior`, the same EWMA over
every request's steps, slower) starts each new request once it holds `prior_steps` steps of each
kind. Such a request skips the warm-up, runs the kind the engine found better, and first explores
after `max_explore_every // 2` steps, so a model where the slim tier does not pay spends about one
step in 50 on it rather than 5 to 8 in the first 64 of every request. The engine's estimate also
makes that request's choices (its explorations feed it): comparing a request's own two values
turned the slim tier on whenever a few rejected drafts lowered the binary value below the
three-tier value the request had inherited (a log of 24 Spec-Bench requests: stretches of 1-6
slim steps at arbitrary points, each with the inherited 1.33 against a binary 1.1-1.2), though
the same drafts would have lowered a three-tier step's value as much.

Each estimate is the mean of its kind's first 1 / alpha steps and an EWMA after that. Seeded
with its first step instead, the engine's estimate (alpha 0.05) kept 70% of that one step after 7
more: on Spec-Bench the first request's lucky early three-tier steps left it at 1.58 a unit
against 1.09, above the margin, and the second request ran the slim tier for 37 steps in a row
(most of the 1% of drafted steps with the slim tier on in `make bench` at `6c52e62`, where
`three_tier` read 0.986-0.995x `binary`); from the mean, 30 requests ran 16 slim steps, not 53.

The slim tier must look `margin` (1.1) times better than the binary step to be chosen. The
estimates are EWMAs over a few noisy steps, the cost model counts weights read and leaves out
what a three-tier step adds on top (the gate, a second host sync), and a wrong choice of the slim
tier costs a slim pass while a missed one costs a fraction of it. On the bundled model, where the
slim tier seldom pays, the controller without a margin kept it on for 7% of the steps of
hybrid-drafted Spec-Bench requests (`three_tier` 0.97-0.99x `binary`).

Where the engine's estimate puts the slim tier far from paying (its value under `far` (0.8) of
what the margin asks), a request that starts from it does not explore on its own period: the
engine explores once every `far_explore_every` (256) three-tier steps of any request, whichever
is stepping then. On the bundled model (slim route cost 0.9, a three-tier step worth about 0.65
of a binary one) the per-request periods had the slim tier on for 1-2% of the steps of 128-token
Spec-Bench requests, each such step a slim pass wasted; the engine-wide period keeps that under
0.5% and still notices text where the slim tier pays (its explorations feed the estimate).

A request whose steps must not depend on what the engine served before (a seeded three-tier
one: its text follows its steps) cannot start from the engine's estimate. It starts from a fixed
prior instead (`fixed_state`): the slim tier off, and explored after 48 steps, not warmed up.

Example: slim_cost 0.8, prefix share 0.1. Three-tier steps that escalate 90% of the time and
commit 1.3 tokens cost 0.8 + 0.9 * 0.9 = 1.61 -> 0.81 tokens per unit; binary steps committing
1.25 tokens cost 1 -> 1.25 tokens per unit: the controller bypasses the slim tier.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ControllerState:
    value_three: float | None = None  # tokens per unit cost, EWMA
    value_binary: float | None = None
    steps: int = 0
    n_three: int = 0  # steps of each kind measured
    n_binary: int = 0
    since_explore: int = 0
    explore_every: int = 0  # the current exploration period; 0 = the controller's base period
    last_on: bool = True
    from_prior: bool = False  # started from the engine-wide estimate, which then decides


class SlimController:
    def __init__(self, slim_cost: float, prefix_share: float, *, alpha: float = 0.25, warmup: int = 2,
                 explore_every: int = 12, max_explore_every: int = 96, enabled: bool = True,
                 prior_alpha: float = 0.05, prior_steps: int = 8, margin: float = 1.1, far: float = 0.8,
                 far_explore_every: int = 256):
        self.slim_cost = slim_cost
        self.prefix_share = prefix_share
        self.alpha = alpha
        self.warmup = warmup
        self.explore_every = explore_every
        self.max_explore_every = max_explore_every
        self.enabled = enabled
        self.prior = ControllerState()  # engine-wide: every request's steps
        self.prior_alpha = prior_alpha
        self.prior_steps = prior_steps
        self.margin = margin
        self.far = far
        self.far_explore_every = far_explore_every
        self.since_slim = 0  # three-tier steps of any request since the slim tier last ran

    def new_state(self, own: bool = False) -> ControllerState:
        """A new request's state: from the engine-wide estimate once it has seen enough steps of
        each kind, else empty (the request warms up on its own). With `own` (a request whose
        choices must follow its own steps alone), from the fixed prior (`fixed_state`)."""
        p = self.prior
        if not self.enabled:
            return ControllerState()
        if own:
            return self.fixed_state()
        if p.n_three < self.prior_steps or p.n_binary < self.prior_steps:
            return ControllerState()
        return ControllerState(value_three=p.value_three, value_binary=p.value_binary, n_three=self.warmup,
                               n_binary=self.warmup, explore_every=self._started_period(),
                               last_on=self._preferred(p), from_prior=True)

    def fixed_state(self) -> ControllerState:
        """The start of a request that steps by its own history alone (a seeded three-tier one,
        whose text must not depend on what the engine served before), the same on every engine:
        as if warmed up on a three-tier step that escalated and committed one token
        (1 / (slim_cost + 1 - prefix_share) a unit of cost) and a binary step that committed one
        (1), first exploring the slim tier after `max_explore_every // 2` steps, as a request
        starting from the engine's estimate does. So the slim tier runs when the request's own
        explorations find that it pays. Warming up instead cost two slim passes per request:
        seeded Spec-Bench requests at temperature 0.7 had the slim tier on at 5.6% of their steps
        on the bundled model, where it does not pay, against 0.4% from this prior."""
        return ControllerState(value_three=1.0 / max(self.slim_cost + 1.0 - self.prefix_share, 1e-6),
                               value_binary=1.0, n_three=self.warmup, n_binary=self.warmup,
                               explore_every=self._started_period(), last_on=False)

    def _started_period(self) -> int:
        """The first exploration period of a request that starts without a warm-up."""
        return max(self.explore_every, self.max_explore_every // 2)

    def _deciding(self, st: ControllerState) -> ControllerState:
        """The estimate a request's choice is made from: its own, or the engine's once it started
        from it. A request's own two values are measured at different times, so a stretch of
        rejected drafts lowers the binary one while the three-tier one keeps older, better steps,
        though the same drafts would lower it as much; the engine's pair is measured over the
        same mix of text."""
        return self.prior if st.from_prior else st

    def want_slim(self, st: ControllerState) -> bool:
        if not self.enabled:
            return True
        if st.n_three < self.warmup:
            return True  # measure the three-tier step first
        if st.n_binary < self.warmup:
            return False  # then the binary step as many times: one unlucky step decides nothing
        best_three = self._preferred(self._deciding(st))
        if st.from_prior and not best_three and self._far(self.prior):
            return self.since_slim >= self.far_explore_every  # engine-wide exploration only
        if st.since_explore >= (st.explore_every or self.explore_every):
            return not best_three  # try the other kind now and then
        return best_three

    def update(self, st: ControllerState, *, slim_ran: bool, full_ran: bool, prefix_reused: bool, tokens: int) -> None:
        warm = st.n_three >= self.warmup and st.n_binary >= self.warmup
        before = self._preferred(self._deciding(st)) if warm else None
        if slim_ran:
            cost = self.slim_cost + (1.0 - (self.prefix_share if prefix_reused else 0.0)) * float(full_ran)
            v = tokens / max(cost, 1e-6)
        else:
            v = float(tokens)
        self._measure(st, slim_ran, v, self.alpha)
        self._measure(self.prior, slim_ran, v, self.prior_alpha)
        after = self._preferred(self._deciding(st))
        explored = before is not None and slim_ran != before
        if explored:
            period = st.explore_every or self.explore_every
            st.explore_every = min(2 * period, self.max_explore_every) if after == before else self.explore_every
            st.since_explore = 0
        else:
            st.since_explore += 1
        st.last_on = slim_ran
        st.steps += 1
        self.since_slim = 0 if slim_ran else self.since_slim + 1

    @staticmethod
    def _measure(st: ControllerState, three: bool, v: float, alpha: float) -> None:
        """Fold one step's value into `st`: the mean of the kind's first 1 / alpha steps, then
        the EWMA (an EWMA seeded with its first sample keeps (1 - alpha)^n of it after n more)."""
        if three:
            st.n_three += 1
            a = max(alpha, 1.0 / st.n_three)
            st.value_three = v if st.value_three is None else (1 - a) * st.value_three + a * v
        else:
            st.n_binary += 1
            a = max(alpha, 1.0 / st.n_binary)
            st.value_binary = v if st.value_binary is None else (1 - a) * st.value_binary + a * v

    def _far(self, st: ControllerState) -> bool:
        """The slim tier is far from paying by `st`: well under what the margin asks."""
        if st.value_three is None or st.value_binary is None:
            return False
        return st.value_three < self.far * self.margin * st.value_binary

    def _preferred(self, st: ControllerState) -> bool:
        if st.value_three is None or st.value_binary is None:
            return True
        return st.value_three >= self.margin * st.value_binary
