"""`full_accept_threshold`: where the full model decides a draft token of a `three_tier` request,
it keeps d when q(d) >= θ max q (temperature 1). θ = 1 is the exact rule; `binary` never bends."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from server.engine.api import GenerationRequest
from server.engine.config import ConfigError, ResolvedSpec, SamplingParams, SpecConfig, SpecParams
from server.engine.spec_step import SpecDecoder
from via_sd_kernels.lenient import repeats as _repeats
from tests.engine.helpers import assert_pool_full, generate_checked as outputs, greedy_requests, make_engine

# repetitive prompts so that prompt lookup finds matches
PROMPTS = [([random.Random(i).randrange(40, 120) for _ in range(6)] * (2 + i % 3))[: 10 + 4 * i] for i in range(6)]


def _plan(drafts, theta, mode="three_tier"):
    spec = ResolvedSpec(mode=mode, accept_threshold=0.7, escalate_threshold=0.5, num_draft_tokens=5,
                        bonus_confidence=0.9, full_accept_threshold=theta)
    return SimpleNamespace(drafts=drafts, sched=SimpleNamespace(seq=SimpleNamespace(spec=spec)))


def test_the_rule_keeps_near_ties_and_nothing_else():
    logits = torch.tensor([
        [0.0, 2.0, 1.5, -1.0],  # d = 2: q(2)/max q = e^-0.5 = 0.61 >= 0.5, not the argmax: kept, forced
        [0.0, 0.0, 0.0, 5.0],  # d = 3: the argmax, kept, not forced
        [0.0, 0.0, 0.0, 0.0],  # bonus row of the first plan: never a draft position
        [3.0, 0.0, 0.0, 0.0],  # second plan, d = 1: ratio e^-3 < 0.5: not kept
        [0.0, 0.0, 0.0, 0.0],
        [9.0, 0.0, 0.0, 0.0],  # third plan (binary): never considered
        [0.0, 0.0, 0.0, 0.0],
    ])
    plans = [(_plan([2, 3], 0.5), 0), (_plan([1], 0.5), 3), (_plan([1], 0.0, mode="binary"), 5)]
    rows, ids, kept, forced = SpecDecoder._lenient(plans, logits)
    assert rows.tolist() == [0, 1, 3] and ids.tolist() == [2, 3, 1]
    assert kept.tolist() == [True, True, False]
    assert forced.tolist() == [True, False, False]
    # the boundary is q(d) = θ max q
    edge = torch.tensor([[math.log(0.5), 0.0], [0.0, 0.0]])
    assert SpecDecoder._lenient([(_plan([0], 0.5 - 1e-6), 0)], edge)[2].tolist() == [True]
    assert SpecDecoder._lenient([(_plan([0], 0.5 + 1e-6), 0)], edge)[2].tolist() == [False]
    # θ = 0 keeps every draft; θ = 1 (or binary requests) leaves the exact rule: nothing to do
    assert SpecDecoder._lenient([(_plan([1], 0.0), 3)], logits)[2].tolist() == [True]
    assert SpecDecoder._lenient([(_plan([2, 3], 1.0), 0), (_plan([1], 0.0, "binary"), 3)], logits) is None

    # the kept rows become one-hot at their draft: argmax and a sampled test both keep d; the
    # others are untouched, and the input is not modified
    before = logits.clone()
    forced_logits = SpecDecoder._force(logits, SpecDecoder._lenient(plans, logits))
    assert torch.equal(logits, before)
    assert forced_logits.argmax(-1).tolist()[:2] == [2, 3]
    assert forced_logits[0].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert torch.equal(forced_logits[2:], logits[2:])

    # what a request is charged: forced rows among [stop, accepted) of each plan
    lenient = SpecDecoder._lenient(plans, logits)
    assert SpecDecoder._forced_counts(lenient, {0: (0, 0, 2), 1: (3, 0, 0)}) == {0: 1, 1: 0}
    assert SpecDecoder._forced_counts(lenient, {0: (0, 1, 2)}) == {0: 0}


def test_the_threshold_is_validated_and_resolved():
    with pytest.raises(ConfigError):
        SpecParams(full_accept_threshold=1.5).validate()
    with pytest.raises(ConfigError):
        SpecParams(full_accept_threshold=-0.1).validate()
    cfg = SpecConfig(full_accept_threshold=0.4)
    assert cfg.resolve(SpecParams()).full_accept_threshold == 0.4
    assert cfg.resolve(SpecParams(full_accept_threshold=1.0)).full_accept_threshold == 1.0


@pytest.mark.parametrize("slim", [False, True], ids=["slim-bypassed", "slim-then-full"])
def test_threshold_zero_keeps_every_draft_the_full_model_decides(tiny_model_dir, slim):
    """θ = 0 keeps every draft token that reaches the full model, whichever path verified it
    (the slim tier bypassed, or every position escalated to tier C), greedy or sampled; θ = 1
    on the same paths is the exact rule."""
    if slim:  # the slim pass at every drafted step, every position escalated to the full model
        spec = {"mode": "three_tier", "controller": False, "escalate_threshold": 2.0, "accept_threshold": 2.0,
                "bonus_confidence": 2.0}
    else:  # no sequence is ever eligible for the slim tier
        spec = {"mode": "three_tier", "max_slim_backlog": 0}
    eng = make_engine(tiny_model_dir, spec={**spec, "full_accept_threshold": 0.0, "lenient_no_repeat": 0})
    off = outputs(eng, greedy_requests(PROMPTS, 24, mode="off", ignore_eos=True, prefix="o"))
    res = outputs(eng, greedy_requests(PROMPTS, 24, mode="three_tier", ignore_eos=True, prefix="t"))
    drafted = sum(r.via_sd.draft_tokens for r in res)
    assert drafted > 0
    for r in res:
        assert r.via_sd.accepted == r.via_sd.draft_tokens
        assert (r.via_sd.slim_passes > 0) == (slim and r.via_sd.draft_tokens > 0)
    lenient = sum(r.via_sd.lenient_accepted for r in res)
    assert 0 < lenient <= drafted and eng.stats().lenient_accepted == lenient
    assert [r.token_ids for r in res] != [r.token_ids for r in off]  # a random model's drafts are mostly wrong

    # sampled requests take the tensor path of verification: the same rule
    sampled = [GenerationRequest(f"s{i}", tuple(p), SamplingParams(max_tokens=24, temperature=1.0, seed=i, ignore_eos=True),
                                 SpecParams(mode="three_tier")) for i, p in enumerate(PROMPTS)]
    for r in outputs(eng, sampled):
        assert r.via_sd.accepted == r.via_sd.draft_tokens

    # θ = 1 per request: the exact rule, the same tokens as off (nothing in tiers A or B here)
    exact = [GenerationRequest(f"x{i}", tuple(p), SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                               SpecParams(mode="three_tier", full_accept_threshold=1.0)) for i, p in enumerate(PROMPTS)]
    res1 = outputs(eng, exact)
    assert [r.token_ids for r in res1] == [r.token_ids for r in off]
    assert sum(r.via_sd.lenient_accepted for r in res1) == 0
    assert_pool_full(eng)


def test_binary_requests_stay_lossless_beside_lenient_three_tier_ones(tiny_model_dir):
    """One batch, the engine's default θ = 0: the binary requests' output is off's token for
    token, the three-tier ones keep every draft."""
    eng = make_engine(tiny_model_dir, spec={"mode": "three_tier", "max_slim_backlog": 0, "full_accept_threshold": 0.0,
                                            "lenient_no_repeat": 0})
    off = outputs(eng, greedy_requests(PROMPTS, 24, mode="off", ignore_eos=True, prefix="o"))
    mixed = [GenerationRequest(f"m{i}", tuple(p), SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                               SpecParams(mode="binary" if i % 2 == 0 else "three_tier")) for i, p in enumerate(PROMPTS)]
    res = outputs(eng, mixed)
    for i, r in enumerate(res):
        if i % 2 == 0:
            assert r.token_ids == off[i].token_ids and r.via_sd.lenient_accepted == 0
        else:
            assert r.via_sd.accepted == r.via_sd.draft_tokens
    assert sum(r.via_sd.draft_tokens for r in res[0::2]) > 0


def test_the_guard_keeps_the_rule_from_completing_a_repeated_ngram():
    """With `no_repeat` = 4, a near-tie draft that would repeat a 4-gram of the output is left to
    the exact rule; an argmax draft is kept whatever it repeats."""
    assert _repeats([1, 2, 3, 4, 9, 1, 2, 3], 4, 4)  # ... 1 2 3 | 4: "1 2 3 4" again
    assert not _repeats([1, 2, 3, 4, 9, 1, 2, 3], 5, 4)
    assert not _repeats([1, 2, 3], 4, 4)  # too short to hold a 4-gram

    out = [1, 2, 3, 4, 9, 1, 2]
    plan = _plan([3, 4], 0.5)
    plan.sched.seq.output_ids = out
    logits = torch.zeros(3, 6)
    logits[0, 5] = 0.5  # d = 3: not the argmax (5), ratio e^-0.5: a near tie
    logits[1, 5] = 0.5  # d = 4: the same, and "1 2 3 4" would repeat the output's first 4-gram
    rows, ids, kept, forced = SpecDecoder._lenient([(plan, 0)], logits)
    assert kept.tolist() == [True, True] and forced.tolist() == [True, True]
    rows, ids, kept, forced = SpecDecoder._lenient([(plan, 0)], logits, no_repeat=4)
    assert kept.tolist() == [True, False] and forced.tolist() == [True, False]
    logits[1, 4] = 1.0  # now 4 is the argmax: kept, repeat or not
    assert SpecDecoder._lenient([(plan, 0)], logits, no_repeat=4)[2].tolist() == [True, True]


def test_with_the_guard_no_lenient_token_completes_a_repeated_ngram(tiny_model_dir):
    """θ = 0 with the guard on (the default, n = 4): every draft token the rule keeps against the
    full model's choice leaves the output without a new repeated 4-gram; on these repetitive
    prompts the guard turns some of them away, which without it were kept."""
    res = {}
    for n in (0, 4):
        eng = make_engine(tiny_model_dir, spec={"mode": "three_tier", "max_slim_backlog": 0,
                                                "full_accept_threshold": 0.0, "lenient_no_repeat": n})
        seen = []
        real = SpecDecoder._lenient

        def spy(plans_rows, logits, no_repeat=0):
            out = real(plans_rows, logits, no_repeat)
            if out is not None:
                i = 0
                forced = out[3].tolist()
                for p, _ in plans_rows:
                    if p.sched.seq.spec.full_accept_threshold < 1 and p.drafts:
                        for j, d in enumerate(p.drafts):
                            if forced[i + j]:
                                seen.append(_repeats(p.sched.seq.output_ids + p.drafts[:j], d, 4))
                        i += len(p.drafts)
            return out

        eng.spec._lenient = spy
        res[n] = outputs(eng, greedy_requests(PROMPTS, 32, mode="three_tier", ignore_eos=True, prefix=f"g{n}"))
        res[n, "seen"] = seen
    assert any(res[0, "seen"]) and not any(res[4, "seen"]) and res[4, "seen"]
    assert sum(r.via_sd.accepted for r in res[4]) < sum(r.via_sd.accepted for r in res[0])
