"""Cost-aware draft length: the pass-cost measurement, the acceptance estimate, the choice, and
that trimming drafts leaves greedy speculation lossless."""

from __future__ import annotations

import pytest

import torch

from server.engine.draft_length import AcceptanceEstimate, LookupAcceptance, PassCosts, best_length, best_lengths
from server.engine.drafters.ngram import MAX_SPAN, LookupIndex, ngram_lookup, ngram_match
from server.engine.kv_cache import Chunk
from tests.engine.helpers import assert_pool_full, greedy_requests, make_engine
from tests.engine.test_spec import PROMPTS


def flat(n: int) -> float:
    return 1.0


def test_best_length_verifies_every_likely_draft_when_width_is_free():
    assert best_length([0.9, 0.8, 0.7], flat) == 3
    assert best_length([0.05, 0.9], flat) == 2  # free width: even an unlikely run adds something
    assert best_length([], flat) == 0


def test_best_length_drops_drafts_that_do_not_pay_for_a_wider_pass():
    steep = lambda n: 1.0 + 0.3 * (n - 1)  # noqa: E731
    assert best_length([0.1, 0.1], steep) == 0  # 1.1 tokens for 1.3 steps: a plain step is better
    assert best_length([0.95, 0.95, 0.95, 0.2, 0.9], steep) == 3
    assert best_length([0.99] * 5, steep) == 5


def test_best_lengths_of_one_sequence_is_best_length():
    steep = lambda n: 1.0 + 0.21 * (n - 1)  # noqa: E731
    for ch in ([], [0.1, 0.1], [0.95, 0.95, 0.95, 0.2, 0.9], [0.99] * 5, [0.3, 0.9, 0.9], [0.25]):
        assert best_lengths([ch], steep) == [best_length(ch, steep)]
    assert best_lengths([], steep) == []


def test_best_lengths_asks_more_of_a_draft_as_the_batch_grows():
    """A token buys a B-th of the pass's tokens at the same marginal cost: at a slope of 0.21 a
    first draft token pays from a chance of 0.21 alone, about 0.35 beside one other sequence and
    0.52 beside three."""
    steep = lambda n: 1.0 + 0.21 * (n - 1)  # noqa: E731
    assert best_lengths([[0.3]], steep) == [1]
    assert best_lengths([[0.3], []], steep) == [0, 0]
    assert best_lengths([[0.4], []], steep) == [1, 0]
    assert best_lengths([[0.4], [], [], []], steep) == [0, 0, 0, 0]
    assert best_lengths([[0.6], [], [], []], steep) == [1, 0, 0, 0]
    # alone, each sequence would verify more of its draft
    drafts = [[0.9, 0.9, 0.9], [0.7, 0.7], [0.3], [0.95, 0.5]]
    assert [best_length(c, steep) for c in drafts] == [3, 2, 1, 2]
    assert best_lengths(drafts, steep) == [3, 1, 0, 1]


def test_best_lengths_keeps_a_prefix_of_each_draft_and_takes_the_likeliest_tokens_first():
    steep = lambda n: 1.0 + 0.1 * (n - 1)  # noqa: E731
    # the second sequence's later tokens are likelier on their own, but follow an unlikely first
    keep = best_lengths([[0.9, 0.9, 0.9, 0.9], [0.2, 1.0, 1.0, 1.0]], steep)
    assert keep == [4, 0]
    # free width: everything is verified, whatever the batch
    assert best_lengths([[0.9, 0.1], [0.05], []], flat) == [2, 1, 0]


def test_batched_steps_trim_drafts_together_and_stay_lossless(tiny_model_dir):
    """Two sequences speculating in one step (spec_max_batch 2) with a steep pass-cost line:
    the drafts kept are the batch's choice, and the greedy output is `off`'s."""
    off = make_engine(tiny_model_dir, spec={"mode": "off"})
    want = [o.token_ids for o in off.generate(greedy_requests(PROMPTS[:2], 24))]
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "ngram", "spec_max_batch": 2})
    eng.pass_costs = PassCosts(prior_slope=0.3)
    calls = []
    real = best_lengths

    def spy(chances, rel):
        keep = real(chances, rel)
        calls.append((len(chances), keep))
        return keep

    import server.engine.spec_step as spec_step
    spec_step.best_lengths = spy
    try:
        got = [o.token_ids for o in eng.generate(greedy_requests(PROMPTS[:2], 24))]
    finally:
        spec_step.best_lengths = real
    assert got == want
    assert any(b == 2 for b, _ in calls)  # the two sequences' drafts were weighed in one call
    assert_pool_full(eng)


def test_pass_costs_start_from_the_prior_then_follow_the_measured_passes():
    pc = PassCosts(prior_slope=0.1)
    assert pc.relative(1) == 1.0 and pc.relative(3) == pytest.approx(1.2)
    for _ in range(5):
        for n in (1, 2, 4):
            pc.observe(n, 0.010 + 0.002 * (n - 1), context=100)
    assert pc.relative(2) == pytest.approx(1.2)
    assert pc.relative(4) == pytest.approx(1.6)
    assert pc.relative(6) == pytest.approx(2.0)  # the line through the measured sizes
    pc.observe(4, 5.0, context=100)  # one stray slow pass moves the median of six by nothing
    pc._table = None  # refitted every 16 passes: now
    assert pc.relative(4) == pytest.approx(1.6)
    pc.observe(0, 1.0)
    pc.observe(10**6, 1.0)  # out of range: ignored
    assert pc.relative(1) == 1.0
    pc.reset()
    assert pc.relative(3) == pytest.approx(1.2) and pc.seconds(1) is None


def test_pass_costs_compare_each_pass_with_a_one_token_pass_at_its_own_context():
    """Passes get slower with the context they read. A wide pass is costed against what a
    one-token pass takes at its context, so where the wide passes ran decides nothing: here
    two-token passes that all read long contexts cost 1.1 one-token passes, though their seconds
    are twice those of the one-token passes' median."""
    def one(ctx):  # a one-token pass: 5 ms plus 5 ms per thousand positions
        return 0.005 + 0.005 * ctx / 1000

    pc = PassCosts(prior_slope=0.5)
    for ctx in (50, 60, 70, 80, 90, 100, 110, 120) * 3:  # most one-token passes read short contexts
        pc.observe(1, one(ctx), context=ctx)
    for ctx in (1500, 1600, 1700):
        pc.observe(1, one(ctx), context=ctx)
    for ctx in (1400, 1500, 1600, 1700, 1800):  # the wide passes, long ones
        pc.observe(2, 1.1 * one(ctx), context=ctx)
        pc.observe(3, 1.3 * one(ctx), context=ctx)
    assert pc.seconds(2) > 1.8 * pc.seconds(1)  # by raw seconds: the contexts, not the width
    assert pc.relative(2) == pytest.approx(1.1, rel=0.02)
    assert pc.relative(3) == pytest.approx(1.3, rel=0.02)
    assert pc.relative(5) == pytest.approx(1.6, rel=0.05)  # unmeasured: the line through 2 and 3
    at0, per = pc.base()
    assert at0 == pytest.approx(0.005, rel=0.02) and per == pytest.approx(0.005 / 1000, rel=0.02)
    # one context bucket alone: a flat base line, its median
    flat = PassCosts()
    for _ in range(3):
        flat.observe(1, 0.010, context=200)
    assert flat.base() == (pytest.approx(0.010), 0.0)


def test_acceptance_estimate_counts_drafts_checked_up_to_the_first_rejection():
    est = AcceptanceEstimate(kept=0.0, checked=0.0, decay=1.0)
    est.update(5, 5)  # all kept: 5 of 5
    est.update(5, 1)  # second rejected: 1 of 2 (the last three were never checked)
    assert est.rate == pytest.approx(6 / 7)
    est.update(0, 0)
    assert est.rate == pytest.approx(6 / 7)


def test_acceptance_estimate_explores_when_its_drafts_stopped_paying():
    """A sequence's estimate that fell below paying verifies one draft token every
    `explore_every` steps, and recovers once those are kept."""
    est = AcceptanceEstimate(explore_every=4)
    cost = lambda n: 1.0 + 0.5 * (n - 1)  # noqa: E731  a draft token pays when kept over half the time
    for _ in range(10):
        est.update(3, 0)  # never right
    got = [est.length(3, cost) for _ in range(8)]
    assert got == [0, 0, 0, 1, 0, 0, 0, 1]
    for _ in range(40):  # the explored tokens are kept from now on
        n = est.length(3, cost)
        if n:
            est.update(n, n)
    assert est.length(3, cost) == 3


def test_an_exploration_token_granted_before_drafting_survives_the_trim_of_its_step():
    """A model drafter's exploration token (granted at its price, before drafting) is asked about
    again when verification trims the draft, at a cost line where one token does not pay: the
    same step keeps it, and the counting goes on from there for the steps after."""
    est = AcceptanceEstimate(kept=0.0, checked=10.0, explore_every=3)
    dear = lambda n: 1.0 + 2.0 * (n - 1)  # noqa: E731  no draft token pays
    got = []
    for at in range(100, 109):
        n = est.length(4, dear, at=at)  # the drafter's call
        if n:
            n = est.length(n, dear, at=at)  # the trim's call, same step
        got.append(n)
    assert got == [0, 0, 1, 0, 0, 1, 0, 0, 1]
    # without the step named, a second call is a step of its own (lookup drafts, other callers)
    plain = AcceptanceEstimate(kept=0.0, checked=10.0, explore_every=3)
    assert [plain.length(4, dear) for _ in range(6)] == [0, 0, 1, 0, 0, 1]


def ids(*t: int) -> torch.Tensor:
    return torch.tensor(t, dtype=torch.int64)


def test_ngram_match_reports_the_span_of_the_match_it_copies():
    # suffix [3, 4] (n_max 2) matches at 2; the two tokens before agree too: span 4
    assert ngram_match(ids(1, 2, 3, 4, 5, 0, 1, 2, 3, 4), 1, 2, 3) == ([5, 0, 1], 4)
    # the token before differs (6 against 1): the span is the n-gram's
    assert ngram_match(ids(5, 6, 7, 8, 9, 1, 7, 8), 1, 2, 2) == ([9, 1], 2)
    # the most recent occurrence is copied, and measured
    assert ngram_match(ids(7, 1, 7, 2, 7), 1, 4, 1) == ([2], 1)
    assert ngram_match(ids(1, 2, 3), 1, 4, 2) == ([], 0)
    # a long repetition: the span stops at MAX_SPAN
    run = list(range(40))
    toks, span = ngram_match(torch.tensor(run + run[:30]), 1, 4, 5)
    assert toks == [30, 31, 32, 33, 34] and span == MAX_SPAN
    assert ngram_lookup(ids(1, 2, 3, 4, 5, 0, 1, 2, 3, 4), 1, 2, 3) == [5, 0, 1]


def test_lookup_index_answers_as_ngram_match_while_the_tokens_grow():
    """The per-sequence index, fed the committed tokens step by step (one or several at a time,
    as speculative steps commit them), finds the same continuation and span as scanning the
    whole context: repetitive and random texts, every n range, spans up to MAX_SPAN and beyond."""
    import random

    rng = random.Random(0)
    texts = [[rng.randrange(6) for _ in range(300)], [rng.randrange(500) for _ in range(300)],
             list(range(40)) * 3 + [rng.randrange(50) for _ in range(100)]]
    for text in texts:
        for n_min, n_max in ((1, 4), (2, 4), (1, 1), (3, 6)):
            index, L = LookupIndex(n_max), 5
            while L <= len(text):
                ids = text[:L]
                want = ngram_match(torch.tensor(ids), n_min, n_max, 5)
                assert index.match(ids, n_min, 5) == want, (L, n_min, n_max)
                L += rng.choice([1, 1, 2, 4])
    index = LookupIndex(4)
    index.match(texts[0][:200], 1, 5)
    assert index.match(texts[0][:50], 1, 5) == ngram_match(torch.tensor(texts[0][:50]), 1, 4, 5)  # went back: rebuilt


def test_lookup_acceptance_learns_per_span_and_position():
    la = LookupAcceptance(decay=1.0, prior_weight=4.0)
    # the prior: a longer match is likelier to continue
    assert la.chances(1, 1)[0] < la.chances(2, 1)[0] < la.chances(8, 1)[0] == la.chances(20, 1)[0]
    before = la.chances(3, 3)
    for _ in range(20):
        la.update(3, 3, 1)  # the first token kept, the second rejected, the third never checked
    after = la.chances(3, 3)
    assert after[0] > before[0] and after[1] < before[1] and after[2] == before[2]
    assert la.chances(4, 3) == LookupAcceptance(decay=1.0).chances(4, 3)  # other spans untouched


def test_lookup_acceptance_explores_a_span_it_stopped_verifying():
    la = LookupAcceptance(explore_every=4)
    steep = lambda n: 1.0 + 2.0 * (n - 1)  # noqa: E731
    for _ in range(50):
        la.update(1, 2, 0)  # 1-token matches: never right
    got = [la.length(1, 3, steep) for _ in range(8)]
    assert got == [0, 0, 0, 1, 0, 0, 0, 1]  # one draft token every fourth step
    assert la.length(8, 3, flat) == 3  # free width: every draft of a long match


def test_trimmed_drafts_keep_binary_lossless(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "ngram"})
    off = eng.generate(greedy_requests(PROMPTS, 32, mode="off", ignore_eos=True, prefix="o"))
    # a machine where every extra token doubles the pass: only sure drafts are verified
    eng.pass_costs.prior_slope = 1.0
    eng.pass_costs.reset()
    eng.pass_costs.observe = lambda *a: None
    trimmed = eng.generate(greedy_requests(PROMPTS, 32, mode="binary", ignore_eos=True, prefix="t"))
    assert [r.token_ids for r in trimmed] == [r.token_ids for r in off]
    assert eng.spec.trimmed > 0
    # the lookups' outcomes reached the per-span estimate
    fresh = LookupAcceptance()
    exact, lenient = eng.spec.lookup_accepts
    assert any(exact.checked[b] != fresh.checked[b] for b in range(1, fresh.max_span + 1))
    assert lenient.checked == fresh.checked  # no lenient request ran
    assert_pool_full(eng)
    eng.spec.adaptive = False
    before = eng.spec.trimmed
    whole = eng.generate(greedy_requests(PROMPTS, 32, mode="binary", ignore_eos=True, prefix="w"))
    assert [r.token_ids for r in whole] == [r.token_ids for r in off]
    assert eng.spec.trimmed == before
    assert sum(r.via_sd.draft_tokens for r in whole) > sum(r.via_sd.draft_tokens for r in trimmed)


def test_lenient_requests_keep_lookup_rates_of_their_own(tiny_model_dir):
    """`three_tier` requests with full_accept_threshold < 1 keep more lookup drafts than the
    exact rule would: their outcomes go to a table of their own, so the drafts of exact requests
    in the same engine are trimmed by exact outcomes only."""
    eng = make_engine(tiny_model_dir, spec={"mode": "three_tier", "drafter": "ngram", "max_slim_backlog": 0,
                                            "full_accept_threshold": 0.0, "lenient_no_repeat": 0})
    fresh = LookupAcceptance()
    exact, lenient = eng.spec.lookup_accepts
    eng.generate(greedy_requests(PROMPTS, 32, mode="three_tier", ignore_eos=True, prefix="l"))
    assert lenient.checked != fresh.checked
    assert exact.checked == fresh.checked and exact.kept == fresh.kept
    eng.generate(greedy_requests(PROMPTS, 32, mode="binary", ignore_eos=True, prefix="b"))
    assert exact.checked != fresh.checked
    assert_pool_full(eng)


@pytest.mark.parametrize("mode", ["binary", "three_tier"])
def test_steps_without_a_draft_decode_plainly_and_count_their_passes(tiny_model_dir, mode):
    """Where no draft is left to verify, the step is a plain decode (no verification's
    bookkeeping), counted in the request's usage as one step and one full pass per token."""
    eng = make_engine(tiny_model_dir, spec={"mode": mode, "drafter": "ngram"})
    off = eng.generate(greedy_requests(PROMPTS, 32, mode="off", ignore_eos=True, prefix="o"))
    eng.pass_costs.prior_slope = 100.0  # every draft token would cost a hundred plain steps
    eng.pass_costs.reset()
    eng.pass_costs.observe = lambda *a: None
    for table in eng.spec.lookup_accepts:
        table.explore_every = 10**9
    finished = []
    verify = eng.spec.finish
    eng.spec.finish = lambda *a, **k: finished.append(1) or verify(*a, **k)
    res = eng.generate(greedy_requests(PROMPTS, 32, mode=mode, ignore_eos=True, prefix="p"))
    assert [r.token_ids for r in res] == [r.token_ids for r in off]
    assert eng.spec.trimmed > 0 and not finished
    for r in res:
        assert r.via_sd.steps == r.via_sd.full_passes == len(r.token_ids) and r.via_sd.draft_tokens == 0
    assert_pool_full(eng)
    eng.pass_costs.prior_slope = 0.0  # free width: drafts are verified again
    res = eng.generate(greedy_requests(PROMPTS, 32, mode=mode, ignore_eos=True, prefix="q"))
    assert [r.token_ids for r in res] == [r.token_ids for r in off] and finished
    assert all(r.via_sd.steps <= len(r.token_ids) for r in res)
    assert sum(r.via_sd.steps for r in res) < sum(len(r.token_ids) for r in res)
    assert_pool_full(eng)


class _Engine:
    """What DraftPrice reads of an engine: its pass costs, device and speculative settings."""

    def __init__(self, adaptive: bool = True):
        self.pass_costs = PassCosts(prior_slope=0.2)
        self.device = torch.device("cpu")
        self.spec = type("Spec", (), {"adaptive": adaptive})()


class _Seq:
    def __init__(self, rate: float):
        self.draft_accept = AcceptanceEstimate(kept=rate * 100, checked=100.0, explore_every=4)
        self.seed = None
        self.num_tokens = 10


def _steps(price, seq: _Seq, n: int) -> list[int]:
    """`price.lengths` for `seq` over n steps, the sequence one token longer each step."""
    out = []
    for _ in range(n):
        out.append(price.lengths([seq], [5])[0])
        seq.num_tokens += 1
    return out


def test_draft_price_drafts_only_what_pays_for_its_own_forwards():
    """A draft token that costs a forward of its own pays only if it is likely enough to cover
    that too: at a price of 0.6 of a pass and verification at 1 + 0.2 per token, a keep rate of
    0.9 drafts one token (1.9 tokens for 1.8 passes; two give 2.71 for 2.6), 0.5 none (though it
    would pay for its place in the pass alone) except one token every `explore_every` steps;
    free drafts at 0.5 pay."""
    from server.engine.drafters.autoregressive import DraftPrice

    eng = _Engine()
    price = DraftPrice(eng, prior=0.6)
    sure, unsure = _Seq(0.9), _Seq(0.5)
    assert price.lengths([sure], [5]) == [1]
    assert DraftPrice(eng, prior=0.1).lengths([sure], [5]) == [5]
    assert _steps(price, unsure, 8) == [0, 0, 0, 1, 0, 0, 0, 1]
    assert best_length([0.5] * 5, lambda n: 1 + 0.2 * (n - 1)) > 0  # what verification alone would keep
    assert DraftPrice(eng, prior=0.0).lengths([_Seq(0.5)], [5])[0] > 0
    assert price.lengths([sure, unsure], [0, 0]) == [0, 0]  # nothing asked, nothing drafted
    # the measured price: one-token draft forwards over the measured one-token pass
    for _ in range(5):
        eng.pass_costs.observe(1, 0.010)
    price.observe(0.001, [Chunk(None, 0, [7], 1)])
    price.observe(0.5, [Chunk(None, 0, [7, 8, 9], 1)])  # a forward over unseen tokens: not a price
    price.observe(0.5, [Chunk(None, 0, [7], 1), Chunk(None, 0, [8], 1)])  # two sequences: neither
    assert price.relative() == pytest.approx(0.1)
    assert price.lengths([_Seq(0.5)], [5])[0] > 0  # at 0.1 of a pass, a coin toss pays
    # verifying every draft (adaptive_draft off) drafts every token asked for
    assert DraftPrice(_Engine(adaptive=False), prior=10.0).lengths([_Seq(0.0)], [3]) == [3]


def test_self_drafts_that_do_not_pay_are_not_drafted_and_binary_stays_lossless(tiny_model_dir):
    """The `self` drafter at a price no draft can pay drafts only its exploration tokens, and the
    output is `off`'s either way."""
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "self"})
    off = eng.generate(greedy_requests(PROMPTS[:3], 40, mode="off", ignore_eos=True, prefix="o"))
    drafter = eng.spec.drafter
    drafter.price.prior, drafter.price.observe = 5.0, lambda seconds, chunks: None
    # a verification pass as dear as a loaded box can measure it: even a sure draft token would
    # not pay for its place in it, so only the exploration tokens are verified
    eng.pass_costs.relative = lambda tokens: 1.0 + 3.0 * (tokens - 1)
    one = [eng.generate(greedy_requests([p], 40, mode="binary", ignore_eos=True, prefix=f"b{i}"))[0]
           for i, p in enumerate(PROMPTS[:3])]
    assert [r.token_ids for r in one] == [r.token_ids for r in off]
    drafted = [r.via_sd.draft_tokens for r in one]
    assert all(0 < d <= 40 // 16 + 1 for d in drafted)  # one token every 16 steps that did not pay
    drafter.price.prior = 0.0
    eng.pass_costs.relative = lambda tokens: 1.0 + 0.1 * (tokens - 1)  # and a cheap one: free drafts pay
    free = [eng.generate(greedy_requests([p], 40, mode="binary", ignore_eos=True, prefix=f"f{i}"))[0]
            for i, p in enumerate(PROMPTS[:3])]
    assert [r.token_ids for r in free] == [r.token_ids for r in off]
    assert sum(r.via_sd.draft_tokens for r in free) > sum(drafted)
    assert_pool_full(eng)
