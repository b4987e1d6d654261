"""Engine-side edges that bad input reaches: what the engine's own `validate` must refuse, so that
a caller other than the gateway (which now checks these at the edge) cannot fail a request with
an internal error."""

from __future__ import annotations

import pytest

from server.engine.api import GenerationRequest, RequestRejected
from server.engine.config import SamplingParams, SpecParams
from tests.reliability.conftest import engine_config


@pytest.fixture(scope="module")
def llm(tiny_model):
    from server.engine.engine import LLMEngine

    return LLMEngine(engine_config(tiny_model, num_blocks=32))


@pytest.mark.parametrize("seed", [2**80, -(2**70)])
def test_validate_rejects_a_seed_torch_cannot_take(llm, seed):
    request = GenerationRequest("r1", (1, 2, 3), SamplingParams(max_tokens=2, temperature=0.8, seed=seed))
    with pytest.raises(RequestRejected):
        llm.validate(request)


def test_in_range_seeds_are_accepted_and_run(llm):
    for i, seed in enumerate((0, -1, 2**63 - 1)):
        request = GenerationRequest(f"ok{i}", (1, 2, 3), SamplingParams(max_tokens=2, temperature=0.8, seed=seed))
        llm.add_request(llm.validate(request))
    for _ in range(50):
        if not llm.has_unfinished():
            break
        llm.step()
    assert not llm.has_unfinished()
    assert llm.stats().kv_cache_usage == 0


def test_a_request_larger_than_the_whole_kv_cache_is_refused_not_preempted_for_ever(tiny_model):
    from server.engine.engine import LLMEngine

    eng = LLMEngine(engine_config(tiny_model, num_blocks=9, block_size=16))  # 8 usable blocks: 128 slots
    too_big = GenerationRequest("big", tuple(range(1, 41)), SamplingParams(max_tokens=100, temperature=0.0),
                                SpecParams(mode="off"))
    with pytest.raises(RequestRejected) as e:
        eng.add_request(too_big)
    assert e.value.param == "max_tokens" and "128 tokens" in str(e.value)
    # draft slots count for a speculative request: 40 + 80 fits plainly, not with 16 lookahead slots
    eng.add_request(GenerationRequest("plain", tuple(range(1, 41)), SamplingParams(max_tokens=80, temperature=0.0,
                                                                                 ignore_eos=True), SpecParams(mode="off")))
    with pytest.raises(RequestRejected):
        eng.add_request(GenerationRequest("spec", tuple(range(1, 41)), SamplingParams(max_tokens=80, temperature=0.0),
                                          SpecParams(mode="binary")))
    for _ in range(200):
        if not eng.has_unfinished():
            break
        eng.step()
    assert not eng.has_unfinished() and eng.cache.pool.num_free == eng.cache.pool.num_usable
