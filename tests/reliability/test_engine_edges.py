"""Engine-side edges that bad input reaches: what the engine's own `validate` must refuse, so that
a caller other than the gateway (which now checks these at the edge) cannot fail a request with
an internal error."""

from __future__ import annotations

import pytest

from server.engine.api import GenerationRequest, RequestRejected
from server.engine.config import SamplingParams
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
