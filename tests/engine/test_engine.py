"""The embedded engine on a tiny random Llama: exactness, batching, preemption, sampling."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.api import GenerationRequest, RequestRejected
from server.engine.config import SamplingParams, SpecParams
from tests.engine.helpers import assert_pool_full, generate_checked, greedy_requests, hf_greedy, make_engine

PROMPTS = [[random.Random(i).randrange(256) for _ in range(5 + 7 * i)] for i in range(8)]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return hf_greedy(tiny_model_dir, PROMPTS, 24)


def run(engine, reqs):
    return [r.token_ids for r in generate_checked(engine, reqs)]


def test_greedy_equals_transformers_alone_and_batched(tiny_model_dir, reference):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    alone = [run(eng, greedy_requests([p], 24, ignore_eos=True, prefix=f"a{i}"))[0] for i, p in enumerate(PROMPTS)]
    assert alone == reference
    batched = run(eng, greedy_requests(PROMPTS, 24, ignore_eos=True))
    assert batched == reference


def test_chunked_prefill_and_preemption_keep_output_exact(tiny_model_dir, reference):
    # 12 usable blocks of 4 slots: eight sequences of up to 78 tokens cannot all fit
    eng = make_engine(tiny_model_dir, spec={"mode": "off"}, block_size=4, num_blocks=24, prefill_chunk=8,
                      max_num_batched_tokens=32)
    out = run(eng, greedy_requests(PROMPTS, 24, ignore_eos=True))
    assert out == reference
    assert eng.stats().preemptions > 0


def test_abort_returns_every_block(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "three_tier"})
    for r in greedy_requests(PROMPTS[:4], 50, ignore_eos=True):
        eng.add_request(r)
    for _ in range(3):
        eng.step()
    assert eng.cache.pool.num_free < eng.cache.pool.num_usable
    outs = [eng.abort(f"r{i}") for i in range(4)]
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    assert_pool_full(eng)
    assert eng.abort("r0") is None  # aborting twice is harmless


def test_max_tokens_eos_and_stop_strings(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    (r,) = eng.generate(greedy_requests([PROMPTS[0]], 7, ignore_eos=True))
    assert len(r.token_ids) == 7 and r.finish_reason == "length"
    text = eng.tokenizer.decode(r.token_ids)
    # a stop string taken from the middle of the greedy text cuts the text right before it
    stop = text[3:5]
    (s,) = eng.generate(greedy_requests([PROMPTS[0]], 7, ignore_eos=True, stop=(stop,), prefix="s"))
    assert s.finish_reason == "stop" and s.text == text[: text.find(stop)]
    # a stop token id ends generation and is the last token
    (t,) = eng.generate(greedy_requests([PROMPTS[0]], 7, ignore_eos=True, stop_token_ids=(r.token_ids[2],), prefix="t"))
    assert t.finish_reason == "stop" and t.token_ids == r.token_ids[: r.token_ids.index(r.token_ids[2]) + 1]
    assert_pool_full(eng)


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})

    def req(rid, seed):
        return GenerationRequest(rid, tuple(PROMPTS[1]), SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9,
                                                                          top_k=50, seed=seed, ignore_eos=True))

    (a,) = eng.generate([req("a", 7)])
    b = eng.generate([req("x", 1), req("b", 7), req("y", 2)])[1]
    assert a.token_ids == b.token_ids
    (c,) = eng.generate([req("c", 8)])
    assert c.token_ids != a.token_ids
    assert_pool_full(eng)


def test_logprobs_match_the_model(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    (r,) = eng.generate(greedy_requests([PROMPTS[2]], 4, ignore_eos=True, logprobs=3))
    assert len(r.logprobs) == 4
    for lp in r.logprobs:
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely
        assert abs(lp.top[0][1] - lp.logprob) < 1e-5 and len(lp.top) == 3 and lp.logprob <= 0


@pytest.mark.parametrize("bad,param", [
    (dict(prompt=()), "prompt"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=600), "max_tokens"),
    (dict(prompt=(999999,)), "prompt"),
])
def test_bad_requests_are_rejected_without_state(tiny_model_dir, bad, param):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"})
    prompt = bad.pop("prompt", (1, 2, 3))
    sp = SamplingParams(**{"max_tokens": 4, **bad})
    with pytest.raises(RequestRejected) as e:
        eng.add_request(GenerationRequest("bad", prompt, sp))
    assert e.value.param == param
    assert_pool_full(eng)
    assert eng.seqs == {}


def test_spec_usage_to_dict_is_every_field_in_order_and_a_copy():
    import dataclasses

    from server.engine.api import SpecUsage

    u = SpecUsage(**{f.name: i + 1 for i, f in enumerate(dataclasses.fields(SpecUsage))})
    d = u.to_dict()
    assert d == dataclasses.asdict(u) and list(d) == [f.name for f in dataclasses.fields(SpecUsage)]
    copy = SpecUsage(**d)
    u.add(u)
    assert copy != u and copy.to_dict() == d  # an output's counts do not move with the request's
