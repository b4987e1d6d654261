"""benchmarks/paired_engines.py: which change engine B goes without, and the paired runs' checks."""

from __future__ import annotations

import pytest

from tests.bench import load_script
from tests.engine.helpers import assert_pool_full

PROMPTS = [[5, 6, 7, 8] * 4, [9, 10, 9, 10, 9, 10, 11], [20, 21, 22, 20, 21, 22, 20, 21]]


def test_engine_b_goes_without_the_change_and_both_write_the_same_tokens(tiny_model_dir):
    mod = load_script("paired_engines")
    a, b = mod.pair(tiny_model_dir, "head-pricing", "binary", "ngram", num_blocks=128)
    assert a.spec._trim_line.__func__ is type(a.spec)._trim_line  # A as loaded
    assert b.spec._trim_line(["any"]) is None  # B never prices a draft
    got = mod.paired(a, b, PROMPTS, 12, "binary", rounds=2, warm=1)
    assert len(got["ratios"]) == 2 * len(PROMPTS) and all(r > 0 for r in got["ratios"])
    assert min(got["steps"]) >= 2 * len(PROMPTS) and min(got["seconds"]) > 0
    assert_pool_full(a)
    assert_pool_full(b)

    a, b = mod.pair(tiny_model_dir, "rows", "off", "ngram", num_blocks=128)
    assert all(lw.rows_from == 0 for lw in b.model.layers)

    a, b = mod.pair(tiny_model_dir, "layers", "off", "ngram", num_blocks=128)
    assert a.model.small_weights(1) is not None and b.model.small_weights(1) is None  # B: the loop in Python
    got = mod.paired(a, b, PROMPTS, 12, "off", rounds=1, warm=1)
    assert len(got["ratios"]) == len(PROMPTS)
    assert_pool_full(a)
    assert_pool_full(b)


def test_different_tokens_stop_the_comparison(tiny_model_dir, monkeypatch):
    mod = load_script("paired_engines")
    a, b = mod.pair(tiny_model_dir, "head-pricing", "off", "ngram", num_blocks=128)
    real = mod.run_once

    def b_writes_another_token(eng, *args):
        secs, steps, ids = real(eng, *args)
        return secs, steps, ids[:-1] + [ids[-1] + 1] if eng is b else ids

    monkeypatch.setattr(mod, "run_once", b_writes_another_token)
    with pytest.raises(SystemExit, match="different tokens"):
        mod.paired(a, b, PROMPTS[:1], 6, "off", rounds=1, warm=0)
    with pytest.raises(ValueError):
        mod.pair(tiny_model_dir, "nothing", "off", "ngram")
