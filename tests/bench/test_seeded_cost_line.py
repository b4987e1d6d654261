"""benchmarks/seeded_cost_line.py: its rows on the tiny model, and the slope it puts in place."""

from __future__ import annotations

from server.engine import spec_step
from tests.bench import load_script
from tests.engine.helpers import assert_pool_full, make_engine

PROMPTS = [[5, 6, 7, 8] * 4, [9, 10, 9, 10, 9, 10, 11], [20, 21, 22, 20, 21, 22, 20, 21]]


def test_rows_and_the_slope_in_place(tiny_model_dir):
    mod = load_script("seeded_cost_line")
    eng = make_engine(tiny_model_dir, spec={"mode": "three_tier", "drafter": "ngram"})
    shipped = spec_step.prior_slope
    rows = [("off", "off", None), ("binary", "binary", None), ("free", "three_tier", 0.0), ("dear", "three_tier", 100.0)]
    res = mod.run(eng, PROMPTS, rows, temperature=0.8, max_tokens=24, rounds=2)
    assert spec_step.prior_slope is shipped  # put back
    assert res["binary"]["outputs"] == res["off"]["outputs"]  # a seed's binary text is off's
    for r in res.values():
        assert r["tokens"] == 2 * 24 * len(PROMPTS) and r["seconds"] > 0
    # drafts that cost nothing are all verified; at 100 passes a draft token, none is
    assert res["free"]["draft_tokens"] > 0
    assert res["dear"]["draft_tokens"] == 0 and res["dear"]["steps"] == res["dear"]["tokens"]
    assert_pool_full(eng)


def test_the_warm_up_row_starts_its_controllers_empty(tiny_model_dir):
    """The shipped seeded path starts from the fixed prior (no slim pass before its first
    exploration, after 48 steps); the warm-up row runs the slim tier on its first drafted steps."""
    from server.engine.controller import SlimController

    mod = load_script("seeded_cost_line")
    eng = make_engine(tiny_model_dir, spec={"mode": "three_tier", "drafter": "ngram"})
    fixed_state = SlimController.fixed_state
    rows = [("three_tier", "three_tier", None), (mod.WARMUP, "three_tier", None)]
    res = mod.run(eng, PROMPTS, rows, temperature=0.8, max_tokens=24, rounds=1)
    assert SlimController.fixed_state is fixed_state  # put back
    assert res["three_tier"]["slim_passes"] == 0 < res["three_tier"]["steps"]
    assert res[mod.WARMUP]["slim_passes"] >= 2  # a request that drafts warms the slim tier up twice
    assert_pool_full(eng)
