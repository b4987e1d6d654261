"""benchmarks/oracle_drafts.py: its oracle drafter, whose rows bound what any drafter can buy,
must draft the answer at the acceptance it is given and leave the output `off`'s."""

from __future__ import annotations

import math

import pytest

from server.engine.api import GenerationRequest
from server.engine.config import SamplingParams, SpecParams
from tests.bench import load_script
from tests.engine.helpers import assert_pool_full, greedy_requests, make_engine

PROMPTS = [list(b"count to nine"), list(b"hello there, tiny model"), list(b"x" * 30)]
MAX_TOKENS = 25


@pytest.fixture(scope="module")
def od():
    return load_script("oracle_drafts")


@pytest.fixture(scope="module")
def engine_and_answers(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "ngram", "adaptive_draft": False})
    res = eng.generate(greedy_requests(PROMPTS, MAX_TOKENS, mode="off", prefix="p", ignore_eos=True))
    answers = {f"p{i}": list(r.token_ids) for i, r in enumerate(res)}
    return eng, answers


def run(eng, drafter, tag: str):
    """The prompts together through `binary` with `drafter`: request ids "p<i>#<tag>" name the answer."""
    eng.spec.drafter = drafter
    res = eng.generate([GenerationRequest(f"p{i}#{tag}", tuple(p), SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True), SpecParams(mode="binary"))
        for i, p in enumerate(PROMPTS)])
    assert_pool_full(eng)
    return [list(r.token_ids) for r in res]


@pytest.mark.parametrize("gamma", [1, 3])
def test_right_drafts_are_all_accepted_and_steps_commit_gamma_plus_one(od, engine_and_answers, gamma):
    eng, answers = engine_and_answers
    d = od.OracleDrafter(answers, 1.0, gamma, eng.model.cfg.vocab_size)
    outs = run(eng, d, f"a1g{gamma}")
    assert outs == [answers[f"p{i}"] for i in range(len(PROMPTS))]
    assert d.proposed > 0 and d.right == d.proposed
    # every step, the prompt's included (drafts ride on its last chunk), commits gamma drafts and one more
    assert d.steps == sum(math.ceil(len(a) / (gamma + 1)) for a in answers.values())


def test_wrong_drafts_leave_one_token_a_step_and_the_output_unchanged(od, engine_and_answers):
    eng, answers = engine_and_answers
    d = od.OracleDrafter(answers, 0.0, 3, eng.model.cfg.vocab_size)
    outs = run(eng, d, "a0")
    assert outs == [answers[f"p{i}"] for i in range(len(PROMPTS))]
    assert d.right == 0 and d.proposed > 0
    assert d.steps == sum(len(a) for a in answers.values())


def test_acceptance_is_the_share_asked_for(od, engine_and_answers):
    eng, answers = engine_and_answers
    d = od.OracleDrafter(answers, 0.5, 1, eng.model.cfg.vocab_size, seed=3)
    for k in range(8):
        outs = run(eng, d, f"h{k}")
        assert outs == [answers[f"p{i}"] for i in range(len(PROMPTS))]
    # one draft a step, each right with probability 0.5: ~200+ drafts, 0.5 within a wide margin
    assert d.proposed >= 150
    assert 0.38 < d.right / d.proposed < 0.62
