"""vLLM's request extensions on both /v1 routes: they reach the engine with vLLM's meaning, and
bad values are 400s that reach nothing."""

from __future__ import annotations

import pytest

from tests.gateway.conftest import client_for
from tests.gateway.test_errors import assert_error

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


async def test_sampling_extensions_reach_the_engine(engine):
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json={
            **CHAT, "allowed_token_ids": [97, 98], "skip_special_tokens": False, "include_stop_str_in_output": True,
            "bad_words": ["foo", "bar baz"]})
        assert r.status_code == 200, r.text
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
    a, b = (q.sampling for q in engine.requests)
    assert (a.allowed_token_ids, a.skip_special_tokens, a.include_stop_str_in_output) == ((97, 98), False, True)
    assert (b.allowed_token_ids, b.skip_special_tokens, b.include_stop_str_in_output) == (None, True, False)
    assert (a.bad_words, b.bad_words) == (("foo", "bar baz"), ())


async def test_truncate_prompt_tokens_keeps_the_prompts_end(engine):
    async with client_for(engine) as c:
        r = await c.post("/v1/completions", json={"prompt": "abcdefgh", "max_tokens": 1, "echo": True,
                                                  "truncate_prompt_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 3 and r.json()["choices"][0]["text"].startswith("fgh")
        r = await c.post("/v1/completions", json={"prompt": [1, 2, 3, 4], "max_tokens": 1, "truncate_prompt_tokens": -1})
        assert r.json()["usage"]["prompt_tokens"] == 4
        r = await c.post("/v1/chat/completions", json={**CHAT, "truncate_prompt_tokens": 5})
        assert r.json()["usage"]["prompt_tokens"] == 5
        assert engine.requests[-1].prompt_token_ids == tuple(engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}])[-5:])
        for bad in (0, -2, engine.max_model_len + 1):
            assert_error(await c.post("/v1/completions", json={"prompt": "ab", "truncate_prompt_tokens": bad}),
                         400, param="truncate_prompt_tokens")


async def test_continue_final_message_and_the_template_options(engine):
    tok = engine.tokenizer
    msgs = [{"role": "user", "content": "count"}, {"role": "assistant", "content": "1, 2,"}]
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "messages": msgs, "continue_final_message": True,
                                                       "add_generation_prompt": False})
        assert r.status_code == 200, r.text
        want = tok.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True)
        assert engine.requests[-1].prompt_token_ids == tuple(want)
        assert tok.decode(want).endswith("assistant\n1, 2,")  # left open for the model to continue
        r = await c.post("/tokenize", json={"messages": msgs, "continue_final_message": True,
                                            "add_generation_prompt": False})
        assert r.json()["tokens"] == want
        r = await c.post("/v1/chat/completions", json={**CHAT, "add_generation_prompt": False})
        assert engine.requests[-1].prompt_token_ids == tuple(tok.apply_chat_template(CHAT["messages"],
                                                                                     add_generation_prompt=False))
        n = len(engine.requests)
        for body, param in [
            ({**CHAT, "messages": msgs, "continue_final_message": True}, "continue_final_message"),  # both true
            ({**CHAT, "continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),
            ({**CHAT, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
            ({**CHAT, "allowed_token_ids": []}, "allowed_token_ids"),
            ({**CHAT, "bad_words": ["ok", " "]}, "bad_words"),
        ]:
            assert_error(await c.post("/v1/chat/completions", json=body), 400, param=param)
        assert len(engine.requests) == n


async def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(engine):
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2,
                                                       "return_tokens_as_token_ids": True, "seed": 3})
        ids = r.json()["choices"][0]["logprobs"]["content"]
        named = [int(t["token"].removeprefix("token_id:")) for t in ids]
        # the ids name every token; the text leaves out a character the last tokens leave unfinished
        # (as vLLM's detokenizer does), which decoding the ids alone shows as U+FFFD
        assert engine.tokenizer.decode(named).removesuffix("\ufffd") == r.json()["choices"][0]["message"]["content"]
        assert all(t["bytes"] == list(t["token"].encode()) and t["top_logprobs"][0]["token"].startswith("token_id:")
                   for t in ids)
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "logprobs": 1, "echo": True,
                                                  "return_tokens_as_token_ids": True})
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["tokens"][:2] == ["token_id:104", "token_id:105"]  # the echoed prompt "hi" (bytes)
        assert all(t.startswith("token_id:") for t in lp["tokens"])
