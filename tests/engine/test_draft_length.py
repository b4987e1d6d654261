"""Cost-aware draft length: the pass-cost measurement, the acceptance estimate, the choice, and
that trimming drafts leaves greedy speculation lossless."""

from __future__ import annotations

import pytest

from server.engine.draft_length import AcceptanceEstimate, PassCosts, best_length
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


def test_pass_costs_start_from_the_prior_then_follow_the_measured_passes():
    pc = PassCosts(prior_slope=0.1)
    assert pc.relative(1) == 1.0 and pc.relative(3) == pytest.approx(1.2)
    for _ in range(5):
        for n in (1, 2, 4):
            pc.observe(n, 0.010 + 0.002 * (n - 1))
    assert pc.relative(2) == pytest.approx(1.2)
    assert pc.relative(4) == pytest.approx(1.6)
    assert pc.relative(6) == pytest.approx(2.0)  # the line through the measured sizes
    pc.observe(4, 5.0)  # one stray slow pass moves the median of five by nothing
    assert pc.relative(4) == pytest.approx(1.6)
    pc.observe(0, 1.0)
    pc.observe(10**6, 1.0)  # out of range: ignored
    assert pc.relative(1) == 1.0


def test_acceptance_estimate_counts_drafts_checked_up_to_the_first_rejection():
    est = AcceptanceEstimate(kept=0.0, checked=0.0, decay=1.0)
    est.update(5, 5)  # all kept: 5 of 5
    est.update(5, 1)  # second rejected: 1 of 2 (the last three were never checked)
    assert est.rate == pytest.approx(6 / 7)
    est.update(0, 0)
    assert est.rate == pytest.approx(6 / 7)


def test_trimmed_drafts_keep_binary_lossless(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "ngram"})
    off = eng.generate(greedy_requests(PROMPTS, 32, mode="off", ignore_eos=True, prefix="o"))
    # a machine where every extra token doubles the pass: only sure drafts are verified
    eng.pass_costs.prior_slope = 1.0
    for s in eng.pass_costs.samples:
        s.clear()
    eng.pass_costs.count = [0] * len(eng.pass_costs.count)
    eng.pass_costs.observe = lambda n, s: None
    trimmed = eng.generate(greedy_requests(PROMPTS, 32, mode="binary", ignore_eos=True, prefix="t"))
    assert [r.token_ids for r in trimmed] == [r.token_ids for r in off]
    assert eng.spec.trimmed > 0
    assert_pool_full(eng)
    eng.spec.adaptive = False
    before = eng.spec.trimmed
    whole = eng.generate(greedy_requests(PROMPTS, 32, mode="binary", ignore_eos=True, prefix="w"))
    assert [r.token_ids for r in whole] == [r.token_ids for r in off]
    assert eng.spec.trimmed == before
    assert sum(r.via_sd.draft_tokens for r in whole) > sum(r.via_sd.draft_tokens for r in trimmed)
