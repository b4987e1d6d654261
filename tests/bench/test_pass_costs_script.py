"""benchmarks/pass_costs.py: what it records from an engine, and its replay of two cost tables."""

from __future__ import annotations

import random

import pytest

from tests.bench import load_script
from tests.engine.helpers import assert_pool_full, make_engine

PROMPTS = [[5, 6, 7, 8] * 4, [9, 10, 9, 10, 9, 10, 11], [20, 21, 22, 20, 21, 22, 20, 21]]


def test_it_records_the_passes_the_cost_table_is_given(tiny_model_dir):
    mod = load_script("pass_costs")
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "ngram"})
    observe = eng.pass_costs.observe
    passes = mod.record(eng, PROMPTS, 16)
    assert eng.pass_costs.observe == observe  # put back
    assert passes and all(n >= 1 and s > 0 for n, _, s in passes)
    # a one-sequence decode pass reads the prompt and the tokens before it, and one more each step
    assert all(c >= min(len(p) for p in PROMPTS) for _, c, _ in passes)
    assert sum(1 for n, _, _ in passes if n > 1) > 0  # the ngram drafts were verified in wider passes
    assert_pool_full(eng)


def test_the_replay_shows_the_context_mix_that_moved_the_raw_table():
    """Passes whose cost is 1 + 0.2 (n - 1) one-token passes at their context. In the second half
    the wide passes read long contexts and most one-token passes short ones (long lookup drafts in
    long answers): by context every r(n) stays put; the raw medians move."""
    mod = load_script("pass_costs")
    rng = random.Random(0)

    def secs(n, ctx):
        return (0.005 + 0.005 * ctx / 1000) * (1 + 0.2 * (n - 1)) * rng.uniform(0.98, 1.02)

    passes = []
    for i in range(2000):
        late = i >= 1000
        n = rng.choice([1, 1, 2, 3, 4])
        long = late and (n > 1 or rng.random() < 0.2)
        ctx = rng.choice([1200, 1500]) if long else rng.choice([100, 150])
        passes.append((n, ctx, secs(n, ctx)))
    out = mod.replay(passes)
    by_ctx, raw = out["by_context"]["r_min_max_median"], out["raw_medians"]["r_min_max_median"]
    for n in (2, 3, 4):
        lo, hi, med = by_ctx[n]
        assert med == pytest.approx(1 + 0.2 * (n - 1), rel=0.03) and hi - lo < 0.1
        assert raw[n][1] - raw[n][0] > 0.5  # the raw table swung with the contexts
    bins = mod.by_bin(passes)
    assert set(bins) == {"0-200", "800-1600"} and bins["0-200"][1]["passes"] > 0
