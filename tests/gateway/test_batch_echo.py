"""`/v1/completions` with a batch of prompts and with `echo` (scoring a prompt: lm-eval-harness's
loglikelihood requests), over the fake engine (shapes, order, usage, streams) and the embedded
engine on the tiny model (the echoed logprobs are the model's)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.gateway.conftest import client_for
from tests.gateway.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio


def sse(text: str) -> list[dict]:
    frames = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


async def test_a_batch_of_prompts_gives_prompt_major_choices_and_counts_each_prompt():
    # (the fake engine advances a request only while the gateway reads it: every choice needs a slot)
    engine = FakeEngine(max_num_seqs=8)
    prompts = ["alpha beta", "gamma", "delta epsilon zeta"]
    async with client_for(engine) as c:
        alone = []
        for p in prompts:
            r = await c.post("/v1/completions", json={"prompt": p, "max_tokens": 5, "temperature": 0})
            alone.append(r.json()["choices"][0]["text"])
        r = await c.post("/v1/completions", json={"prompt": prompts, "max_tokens": 5, "temperature": 0, "n": 2})
        body = r.json()
    assert r.status_code == 200, body
    assert [ch["index"] for ch in body["choices"]] == list(range(6))
    # choice p * n + i is prompt p's choice i
    assert [ch["text"] for ch in body["choices"]] == [t for t in alone for _ in range(2)]
    tok = FakeEngine().tokenizer
    n_prompt = sum(len(tok.encode(p)) for p in prompts)
    assert body["usage"]["prompt_tokens"] == n_prompt  # each prompt once, not once per choice
    assert body["usage"]["completion_tokens"] == 6 * 5
    # token-id prompts in a batch, streamed: every choice ends once, the texts are the same
    async with client_for(engine) as c:
        ids = [tok.encode(p) for p in prompts]
        r = await c.post("/v1/completions", json={"prompt": ids, "max_tokens": 5, "temperature": 0, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    frames = sse(r.text)
    texts = {}
    for f in frames[:-1]:
        for ch in f["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    assert [texts[i] for i in range(3)] == alone
    assert sum(1 for f in frames for ch in f["choices"] if ch["finish_reason"]) == 3
    assert frames[-1]["usage"]["prompt_tokens"] == n_prompt


async def test_echo_puts_the_prompt_and_its_logprobs_first(engine):
    async with client_for(engine) as c:
        plain = (await c.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 4,
                                                        "temperature": 0, "logprobs": 1})).json()["choices"][0]
        r = await c.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 4, "temperature": 0,
                                                  "logprobs": 1, "echo": True})
    ch = r.json()["choices"][0]
    assert ch["text"] == "hello world" + plain["text"]
    lp = ch["logprobs"]
    n_prompt = len(FakeEngine().tokenizer.encode("hello world"))
    assert len(lp["tokens"]) == n_prompt + 4
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first
    assert all(v is not None for v in lp["token_logprobs"][1:])
    assert lp["tokens"][n_prompt:] == plain["logprobs"]["tokens"]
    assert "".join(lp["tokens"]) == ch["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    # the engine was asked for prompt logprobs only here
    assert engine.requests[0].sampling.prompt_logprobs is None and engine.requests[1].sampling.prompt_logprobs == 1


async def test_echo_with_max_tokens_0_scores_the_prompt_alone_streamed_or_not(engine):
    body = {"prompt": ["one two", "three"], "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
    async with client_for(engine) as c:
        r = await c.post("/v1/completions", json=body)
        s = await c.post("/v1/completions", json={**body, "stream": True})
    out = r.json()
    assert [ch["text"] for ch in out["choices"]] == ["one two", "three"]
    assert all(ch["finish_reason"] == "length" for ch in out["choices"])
    assert out["usage"]["completion_tokens"] == 0
    tok = FakeEngine().tokenizer
    for ch, p in zip(out["choices"], ["one two", "three"]):
        assert len(ch["logprobs"]["tokens"]) == len(tok.encode(p))
    frames = sse(s.text)
    by_index = {}
    for f in frames:
        for ch in f["choices"]:
            by_index.setdefault(ch["index"], []).append(ch)
    for i, chunks in by_index.items():
        assert "".join(ch["text"] for ch in chunks) == out["choices"][i]["text"]
        assert chunks[-1]["finish_reason"] == "length"
        toks = [t for ch in chunks if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
        assert toks == out["choices"][i]["logprobs"]["tokens"]


async def test_streamed_echo_sends_the_prompt_in_the_first_frame():
    engine = FakeEngine()
    async with client_for(engine) as c:
        r = await c.post("/v1/completions", json={"prompt": "the sky is", "max_tokens": 6, "temperature": 0,
                                                  "echo": True, "stream": True})
        full = (await c.post("/v1/completions", json={"prompt": "the sky is", "max_tokens": 6, "temperature": 0,
                                                       "echo": True})).json()["choices"][0]["text"]
    frames = sse(r.text)
    assert frames[0]["choices"][0]["text"].startswith("the sky is")
    assert "".join(ch["text"] for f in frames for ch in f["choices"]) == full


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from server.engine.config import EngineConfig, SpecConfig
    from server.engine.testing import write_tiny_model

    async_engine = pytest.importorskip("server.engine.async_engine")
    folder = write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    return folder, EngineConfig(model=str(folder), num_blocks=128, max_num_seqs=4, prefill_chunk=16,
                                spec=SpecConfig(mode="three_tier")), async_engine


async def test_scoring_a_continuation_as_lm_eval_does_reads_the_models_logprobs(tiny_engine):
    """lm-eval-harness's `local-completions` loglikelihood request: token-id prompts (context +
    continuation) in a batch, echo, logprobs 1, max_tokens 1, temperature 0; it reads
    token_logprobs[ctxlen:-1] and whether each was the top one."""
    from transformers import AutoModelForCausalLM

    folder, config, async_engine = tiny_engine
    engine = async_engine.EmbeddedAsyncEngine(config)
    await engine.start()
    try:
        prompts = [[(7 * i + 3 * j) % 250 + 1 for j in range(5 + 9 * i)] for i in range(3)]  # 5, 14, 23 tokens
        async with client_for(engine, served_model_names=["tiny"]) as c:
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": prompts, "echo": True,
                                                      "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234})
        assert r.status_code == 200, r.text
        m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        for p, ch in zip(prompts, r.json()["choices"]):
            lp = ch["logprobs"]
            assert len(lp["token_logprobs"]) == len(p) + 1 and lp["token_logprobs"][0] is None
            with torch.inference_mode():
                lsm = torch.log_softmax(m(torch.tensor([p])).logits[0].float(), -1)
            want = lsm[:-1].gather(-1, torch.tensor(p[1:]).view(-1, 1)).squeeze(-1)
            got = torch.tensor(lp["token_logprobs"][1:len(p)])
            assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
            tok = engine.tokenizer
            for j in range(1, len(p)):  # the top entry is the model's most likely token there
                top = lp["top_logprobs"][j]
                assert list(top) == [tok.token_text(int(lsm[j - 1].argmax()))]
            # the one generated token is greedy's, after the prompt
            assert lp["tokens"][-1] == tok.token_text(int(lsm[-1].argmax()))
        s = engine.stats()
        assert s.requests_running == 0 and s.kv_cache_usage == 0
    finally:
        await engine.shutdown(grace_s=1)


async def test_penalties_and_logit_bias_reach_the_engine(engine):
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "presence_penalty": 0.5,
            "frequency_penalty": -1.25, "logit_bias": {"65": 3, "7": -100}, "repetition_penalty": 1.2, "min_p": 0.1,
            "min_tokens": 2})
        assert r.status_code == 200, r.text
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "frequency_penalty": 2})
        assert r.status_code == 200, r.text
    a, b = (q.sampling for q in engine.requests)
    assert (a.presence_penalty, a.frequency_penalty, a.logit_bias) == (0.5, -1.25, ((65, 3.0), (7, -100.0)))
    assert (b.presence_penalty, b.frequency_penalty, b.logit_bias) == (0.0, 2.0, ())
    assert (a.repetition_penalty, a.min_p, a.min_tokens) == (1.2, 0.1, 2)
    assert (b.repetition_penalty, b.min_p, b.min_tokens) == (1.0, 0.0, 0)


async def test_prompt_logprobs_are_the_models_with_ranks_on_both_routes(tiny_engine):
    """vLLM's `prompt_logprobs`: null first, then per prompt position {token id: {logprob, rank,
    decoded_token}} for the prompt's token (its true rank) and the top k (ranks 1..k)."""
    from transformers import AutoModelForCausalLM

    folder, config, async_engine = tiny_engine
    engine = async_engine.EmbeddedAsyncEngine(config)
    await engine.start()
    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = engine.tokenizer

    def check(ids, plp, k):
        with torch.inference_mode():
            lsm = torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)
        assert len(plp) == len(ids) and plp[0] is None
        for j in range(1, len(ids)):
            row, entry = lsm[j - 1], plp[j]
            mine = entry[str(ids[j])]
            assert mine["logprob"] == pytest.approx(float(row[ids[j]]), abs=1e-4)
            assert mine["rank"] == int((row > row[ids[j]]).sum()) + 1
            assert mine["decoded_token"] == tok.token_text(ids[j])
            top = row.topk(k).indices.tolist()
            assert all(entry[str(t)]["rank"] == r for r, t in enumerate(top, 1) if t != ids[j])
            assert set(entry) == {str(ids[j])} | {str(t) for t in top}

    try:
        async with client_for(engine, served_model_names=["tiny"]) as c:
            prompt = [(5 * j) % 250 + 1 for j in range(12)]
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": [prompt, prompt[:7]], "max_tokens": 2,
                                                      "temperature": 0, "prompt_logprobs": 3})
            assert r.status_code == 200, r.text
            check(prompt, r.json()["choices"][0]["prompt_logprobs"], 3)
            check(prompt[:7], r.json()["choices"][1]["prompt_logprobs"], 3)
            msgs = [{"role": "user", "content": "hello there"}]
            r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 2,
                                                           "prompt_logprobs": 0, "logprobs": True})
            assert r.status_code == 200, r.text
            check(tok.apply_chat_template(msgs), r.json()["prompt_logprobs"], 0)
            assert r.json()["choices"][0]["logprobs"]["content"]  # the output's logprobs as before
            # without the field, null; streamed, a 400 (as in vLLM)
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
            assert r.json()["choices"][0]["prompt_logprobs"] is None
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1,
                                                      "prompt_logprobs": 1, "stream": True})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1,
                                                      "prompt_logprobs": 21})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
        s = engine.stats()
        assert s.requests_running == 0 and s.kv_cache_usage == 0
    finally:
        await engine.shutdown(grace_s=1)
