"""A seed fixes a sampled request's text, however speculation cut its steps.

The engine draws each sampled token's noise from a generator seeded by the request's seed and
the token's position (`via_sd_kernels.sampling.position_noise`) and verifies deterministic drafts
with coupled uniforms, so every emitted token is the exponential race's sample of its row:
`binary` emits the tokens `off` samples, whatever the batch, the draft lengths or what the engine
learned before. A seeded `three_tier` request (lossy tiers) steps by its own history alone, so it
repeats its text on an engine that has served other requests since.
"""

from __future__ import annotations

import random

import pytest

from server.engine.api import GenerationRequest
from server.engine.config import SamplingParams, SpecParams
from tests.engine.helpers import assert_pool_full, make_engine

MESSAGES = ["List the days of the week, then list them again in the same order.",
            "Write the numbers from 1 to 20 separated by commas.",
            "Copy this sentence three times: The quick brown fox jumps over the lazy dog."]


def _requests(eng, tag: str, temperature: float = 0.7, **sp) -> list[GenerationRequest]:
    return [GenerationRequest(f"{tag}{i}", tuple(eng.tokenizer.apply_chat_template([{"role": "user", "content": m}])),
                              SamplingParams(max_tokens=48, temperature=temperature, seed=11 + i, ignore_eos=True, **sp),
                              SpecParams())
            for i, m in enumerate(MESSAGES)]


def _tokens(eng, reqs) -> list[list[int]]:
    out = [r.token_ids for r in eng.generate(reqs)]
    assert_pool_full(eng)
    return out


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_binary_samples_the_tokens_off_samples(real_model_dir, temperature):
    off = make_engine(real_model_dir, spec={"mode": "off"})
    binary = make_engine(real_model_dir, spec={"mode": "binary", "drafter": "ngram"})
    ref = _tokens(off, _requests(off, "o", temperature, top_p=0.95))
    assert _tokens(binary, _requests(binary, "b", temperature, top_p=0.95)) == ref
    st = binary.stats_
    # both branches of verification ran: drafts kept, and drafts rejected and recovered
    assert st.accepted_tokens > 0 and st.draft_tokens > st.accepted_tokens
    assert len({tuple(t) for t in ref}) == len(ref)


@pytest.mark.parametrize("mode,controller", [("binary", True), ("three_tier", True), ("three_tier", False)])
def test_a_seed_repeats_its_text_on_an_engine_that_has_learned_since(real_model_dir, mode, controller):
    """With the controller on, a seeded three-tier request starts from the fixed prior (binary
    steps until it explores, after 48); with it off, every drafted step runs the slim tier, so the
    lossy tiers decide tokens of the seeded requests themselves."""
    eng = make_engine(real_model_dir, spec={"mode": mode, "drafter": "ngram", "controller": controller})
    first = _tokens(eng, _requests(eng, "a"))
    seeded_slim = eng.stats_.tier_accept + eng.stats_.tier_slim
    # other traffic in between moves the engine-wide estimates and pass costs
    _tokens(eng, _requests(eng, "x", temperature=0.0))
    assert _tokens(eng, _requests(eng, "b")) == first
    st = eng.stats_
    assert st.accepted_tokens > 0
    if mode == "three_tier":
        if controller:
            assert seeded_slim == 0  # the fixed prior: no warm-up of the slim tier
        else:
            assert st.tier_accept > 0 and seeded_slim > 0  # the lossy tiers decided seeded tokens


def test_binary_seeded_output_does_not_depend_on_the_batch(tiny_model_dir):
    prompts = [[random.Random(9 + i).randrange(256) for _ in range(8)] * 4 for i in range(4)]
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "ngram"})

    def req(i, rid):
        return GenerationRequest(rid, tuple(prompts[i]), SamplingParams(max_tokens=24, temperature=0.9, seed=5 + i,
                                                                       ignore_eos=True), SpecParams())

    batched = _tokens(eng, [req(i, f"b{i}") for i in range(4)])
    assert [_tokens(eng, [req(i, f"a{i}")])[0] for i in range(4)] == batched
    assert eng.stats_.draft_tokens > 0
