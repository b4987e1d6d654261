"""Structured outputs in the engine (tiny random Llama): the text follows its grammar, the chosen
token is the model's best allowed one, the grammar ends the request, and speculation under a
grammar gives what masked plain decoding gives."""

from __future__ import annotations

import json
import random
import re

import pytest

from server.engine.api import GenerationRequest, RequestRejected
from server.engine.config import ConfigError, SamplingParams, SpecParams, StructuredOutputs
from tests.engine.helpers import assert_pool_full, generate_checked, make_engine

PROMPTS = [[random.Random(i).randrange(256) for _ in range(5 + 7 * i)] for i in range(6)]
REGEX = r"[0-9]{3}-[a-z]{2,6}( [A-Z][a-z]{1,5})?"
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer",
          "minimum": 1, "maximum": 30}}, "required": ["city", "days"], "additionalProperties": False}
CONSTRAINTS = [
    StructuredOutputs(regex=REGEX),
    StructuredOutputs(choice=("yes", "no", "not sure")),
    StructuredOutputs(grammar='start: "(" item ("," item)? ("," item)? ")"\nitem: /[a-c]{1,3}/'),
    StructuredOutputs(json=json.dumps(SCHEMA), disable_any_whitespace=True),
]


def follows(so: StructuredOutputs, text: str) -> bool:
    if so.regex is not None:
        return re.fullmatch(so.regex, text) is not None
    if so.choice is not None:
        return text in so.choice
    if so.grammar is not None:
        return re.fullmatch(r"\([a-c]{1,3}(,[a-c]{1,3}){0,2}\)", text) is not None
    value = json.loads(text)
    return value["city"] in ("Paris", "Rome", "Oslo") and 1 <= value["days"] <= 30 and set(value) == {"city", "days"}


def requests(so, temperature=0.0, mode="three_tier", max_tokens=48, **kw):
    return [GenerationRequest(f"r{i}", tuple(p), SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                                 seed=i, structured_outputs=so, **kw),
                              SpecParams(mode=mode))
            for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return make_engine(tiny_model_dir, spec={"mode": "three_tier"})


@pytest.mark.parametrize("so", CONSTRAINTS, ids=["regex", "choice", "lark", "json"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_follows_its_grammar_and_the_grammar_ends_it(engine, so, temperature):
    res = generate_checked(engine, requests(so, temperature))
    for r in res:
        assert r.finish_reason == "stop", (r.text, r.finish_reason)
        assert follows(so, r.text), r.text
    if temperature == 0.0:  # greedy: the same in a batch and alone
        alone = [generate_checked(engine, [q])[0].token_ids for q in requests(so)[:2]]
        assert alone == [r.token_ids for r in res[:2]]


def test_the_chosen_token_is_the_models_best_allowed_one(engine):
    """Greedy under a grammar: every token the model ranks above the chosen one is one the grammar
    forbids there (checked with a matcher of its own), and logprobs are the model's."""
    so = StructuredOutputs(regex=REGEX)
    res = generate_checked(engine, requests(so, logprobs=20))
    ranked_above = 0
    for r in res:
        m = engine.grammars.matcher(so)
        for t, lp in zip(r.token_ids, r.logprobs):
            assert lp.token_id == t
            better = [tid for tid, v in lp.top if v > lp.logprob]
            ranked_above += len(better)
            assert all(m.validate_tokens([b]) == 0 for b in better)
            assert m.consume_token(t)
    assert ranked_above > 0  # the random model's own choices were overruled somewhere


@pytest.mark.parametrize("mode", ["binary", "three_tier"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculating_under_a_grammar_gives_what_masked_plain_decoding_gives(engine, mode, temperature):
    drafted = accepted = 0
    for so in CONSTRAINTS + [StructuredOutputs(regex=r"[a-z ]{40,60}")]:
        off = generate_checked(engine, requests(so, temperature, mode="off", max_tokens=64))
        spec = generate_checked(engine, requests(so, temperature, mode=mode, max_tokens=64))
        assert [r.token_ids for r in spec] == [r.token_ids for r in off], so
        assert all(r.via_sd.slim_passes == 0 for r in spec)  # the slim tier stays out of it
        drafted += sum(r.via_sd.draft_tokens for r in spec)
        accepted += sum(r.via_sd.accepted for r in spec)
    assert accepted > 0 and drafted > accepted  # drafts were verified, and some were refused


def test_max_tokens_cuts_a_constrained_output_to_a_prefix_of_the_grammar(engine):
    so = StructuredOutputs(json=json.dumps(SCHEMA), disable_any_whitespace=True)
    for r in generate_checked(engine, requests(so, max_tokens=3)):
        assert r.finish_reason == "length" and len(r.token_ids) == 3
        m = engine.grammars.matcher(so)
        assert m.consume_tokens(r.token_ids) and not m.is_stopped()


def test_preemption_keeps_constrained_outputs_exact(tiny_model_dir, engine):
    so = StructuredOutputs(regex=r"[a-z ]{40,60}")
    reference = [r.token_ids for r in generate_checked(engine, requests(so, max_tokens=64))]
    small = make_engine(tiny_model_dir, spec={"mode": "three_tier"}, block_size=4, num_blocks=32, prefill_chunk=8,
                        max_num_batched_tokens=32)
    out = [r.token_ids for r in generate_checked(small, requests(so, max_tokens=64))]
    assert small.stats().preemptions > 0
    assert out == reference


def test_a_bad_constraint_is_rejected_with_its_field_and_leaves_nothing_behind(engine):
    bad = [
        (StructuredOutputs(regex="([a-z"), "structured_outputs.regex"),
        (StructuredOutputs(json='{"type": "nonsense"}'), "structured_outputs.json"),
        (StructuredOutputs(json="{not json"), "structured_outputs.json"),
        (StructuredOutputs(grammar="start: undefined_rule"), "structured_outputs.grammar"),
        (StructuredOutputs(choice=()), "structured_outputs.choice"),
        (StructuredOutputs(), "structured_outputs"),
        (StructuredOutputs(regex="a", choice=("a",)), "structured_outputs"),
    ]
    for so, param in bad:
        with pytest.raises(ConfigError) as e:
            so.validate()
        assert e.value.param == param, (so, e.value)
        with pytest.raises(RequestRejected) as e:
            engine.add_request(requests(so)[0])
        assert e.value.param == param
    assert_pool_full(engine)
    # and the engine still serves
    assert generate_checked(engine, requests(CONSTRAINTS[1])[:1])[0].text in ("yes", "no", "not sure")


def test_unconstrained_neighbours_keep_speculating_and_stay_exact(engine):
    plain = [GenerationRequest(f"p{i}", tuple(p), SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                               SpecParams(mode="three_tier")) for i, p in enumerate(PROMPTS)]
    alone = [r.token_ids for r in generate_checked(engine, plain)]
    mixed = generate_checked(engine, plain + requests(StructuredOutputs(regex=REGEX)))
    assert [r.token_ids for r in mixed[:len(plain)]] == alone
    assert all(follows(StructuredOutputs(regex=REGEX), r.text) for r in mixed[len(plain):])
