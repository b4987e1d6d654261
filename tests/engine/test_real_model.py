"""The bundled SmolLM2-135M-Instruct: the engine is exact against Hugging Face transformers, and
speculation (`binary`) is lossless, on Spec-Bench prompts. Marked `real_model`; runs in make test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from server.bench.prompts import SPEC_BENCH_FILE
from tests.engine.helpers import assert_pool_full, greedy_requests, hf_greedy, make_engine

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

CATEGORIES = ("writing", "coding", "math_reasoning", "qa", "translation", "summarization", "rag", "extraction",
              "reasoning", "stem")
MAX_TOKENS = 64


def spec_bench_prompts(tokenizer, n: int, max_prompt_tokens: int = 320) -> list[list[int]]:
    """The first turn of Spec-Bench questions, round-robin over categories, chat template applied."""
    by_cat: dict[str, list[list[int]]] = {c: [] for c in CATEGORIES}
    with open(SPEC_BENCH_FILE) as f:
        for line in f:
            q = json.loads(line)
            if q["category"] in by_cat and len(by_cat[q["category"]]) < n:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}])
                if len(ids) <= max_prompt_tokens:
                    by_cat[q["category"]].append(ids)
    out = []
    i = 0
    while len(out) < n:
        for c in CATEGORIES:
            if i < len(by_cat[c]) and len(out) < n:
                out.append(by_cat[c][i])
        i += 1
    return out


@pytest.fixture(scope="module")
def off_engine(real_model_dir):
    return make_engine(real_model_dir, spec={"mode": "off"})


@pytest.fixture(scope="module")
def prompts(off_engine):
    return spec_bench_prompts(off_engine.tokenizer, 20)


@pytest.fixture(scope="module")
def off_outputs(off_engine, prompts):
    res = off_engine.generate(greedy_requests(prompts, MAX_TOKENS, mode="off"))
    assert_pool_full(off_engine)
    return [r.token_ids for r in res]


def test_greedy_equals_transformers_on_20_spec_bench_prompts(real_model_dir, prompts, off_outputs):
    ref = hf_greedy(real_model_dir, prompts, MAX_TOKENS, eos=2)
    for i, (a, b) in enumerate(zip(off_outputs, ref)):
        assert a == b, f"prompt {i}: engine and transformers differ at token {next(j for j, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y)}"


def test_batched_and_preempted_outputs_are_unchanged(real_model_dir, prompts, off_outputs):
    eng = make_engine(real_model_dir, spec={"mode": "off"}, max_num_seqs=8)
    res = eng.generate(greedy_requests(prompts, MAX_TOKENS, mode="off"))
    assert [r.token_ids for r in res] == off_outputs
    assert_pool_full(eng)
    small = make_engine(real_model_dir, spec={"mode": "off"}, max_num_seqs=8, block_size=16, num_blocks=80)
    res = small.generate(greedy_requests(prompts[:8], MAX_TOKENS, mode="off"))
    assert [r.token_ids for r in res] == off_outputs[:8]
    assert small.stats().preemptions > 0
    assert_pool_full(small)


@pytest.mark.parametrize("drafter", ["ngram", "self", "head", "hybrid"])
def test_binary_is_lossless_with_each_drafter(real_model_dir, prompts, off_outputs, drafter):
    eng = make_engine(real_model_dir, spec={"mode": "binary", "drafter": drafter}, max_num_seqs=8)
    batched = eng.generate(greedy_requests(prompts, MAX_TOKENS, mode="binary"))
    assert [r.token_ids for r in batched] == off_outputs
    assert sum(r.via_sd.draft_tokens for r in batched) > 0
    alone = [eng.generate(greedy_requests([p], MAX_TOKENS, mode="binary", prefix=f"a{i}"))[0].token_ids
             for i, p in enumerate(prompts)]
    assert alone == off_outputs
    assert_pool_full(eng)


def test_three_tier_escalating_everything_equals_binary(real_model_dir, prompts, off_outputs):
    eng = make_engine(real_model_dir, spec={"mode": "three_tier", "accept_threshold": 2.0, "escalate_threshold": 2.0,
                                            "bonus_confidence": 2.0, "controller": False}, max_num_seqs=8)
    res = eng.generate(greedy_requests(prompts[:8], MAX_TOKENS, mode="three_tier"))
    assert [r.token_ids for r in res] == off_outputs[:8]
    assert sum(r.via_sd.slim_passes for r in res) > 0
    assert_pool_full(eng)


def test_generate_cli_reports_three_tier_usage(real_model_dir):
    # a pattern to continue, and a gate loose enough that some steps end at the slim tier
    prompt = "a b c d e f g h i j k l m n o p q r s t u v w x y z a b c d e f g h i j k l m n o p q r s t u v w x y z a b"
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "--prompt", prompt, "--spec-mode", "three_tier",
         "--max-tokens", "64", "--json", "--slim-confidence", "0.2", "--accept-threshold", "0.3",
         "--escalate-threshold", "0.1"],
        capture_output=True, text=True, timeout=600, check=True,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    u = data["usage"]["via_sd"]
    assert data["text"] and data["token_ids"]
    assert u["slim_passes"] > 0 and u["full_passes"] < u["steps"]
    assert u["accepted"] <= u["draft_tokens"]
    assert u["full_verified"] <= u["draft_tokens"]
    assert u["accepted"] + u["slim_regenerated"] <= len(data["token_ids"]) <= u["accepted"] + u["slim_regenerated"] + u["steps"]


def test_packed_weights_give_the_fp32_models_logprobs_bitwise(off_engine, prompts):
    """The bundled model's layer matrices are Q4_1 blocks and its LM head Q8_0: decode passes read
    them packed, and every logprob equals the one computed from the fp32 matrices."""
    model = off_engine.model
    assert [len(lw.packed) for lw in model.layers] == [4] * model.cfg.num_layers
    assert model.lm_head_packed is not None and model.lm_head_packed.dtype == torch.int8
    packed = off_engine.generate(greedy_requests(prompts[:4], 24, mode="off", prefix="p", logprobs=3))
    kept, head = [lw.packed for lw in model.layers], model.lm_head_packed
    model.lm_head_packed = None
    for lw in model.layers:
        lw.packed = {}
    model.weights_changed()
    try:
        plain = off_engine.generate(greedy_requests(prompts[:4], 24, mode="off", prefix="f", logprobs=3))
    finally:
        model.lm_head_packed = head
        for lw, p in zip(model.layers, kept):
            lw.packed = p
        model.weights_changed()
    for a, b in zip(packed, plain):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs and a.logprobs
    assert_pool_full(off_engine)
