"""vLLM's tokenizer routes (/tokenize, /detokenize), /version and OpenAI's "retrieve model"."""

from __future__ import annotations

import pytest

from server import __version__
from tests.gateway.conftest import client_for
from tests.gateway.test_errors import assert_error

pytestmark = pytest.mark.anyio


async def test_tokenize_gives_the_ids_the_v1_routes_run(engine):
    tok = engine.tokenizer
    async with client_for(engine) as c:
        r = await c.post("/tokenize", json={"prompt": "héllo"})
        assert r.status_code == 200, r.text
        assert r.json() == {"count": 6, "max_model_len": engine.max_model_len, "tokens": tok.encode("héllo"),
                            "token_strs": None}
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        r = await c.post("/tokenize", json={"model": "fake", "messages": msgs, "return_token_strs": True})
        body = r.json()
        want = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
        assert body["tokens"] == want and body["count"] == len(want)
        assert body["token_strs"] == tok.token_strs(want) and body["token_strs"][0] == "<|im_start|>"
        # the chat route counts the same prompt
        r = await c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1})
        assert r.json()["usage"]["prompt_tokens"] == len(want)
        r = await c.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False})
        assert r.json()["tokens"] == tok.apply_chat_template(
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], add_generation_prompt=False)


async def test_detokenize_round_trips_special_tokens_included(engine):
    tok = engine.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    async with client_for(engine) as c:
        r = await c.post("/detokenize", json={"tokens": ids})
        assert r.status_code == 200, r.text
        assert r.json() == {"prompt": tok.decode(ids, skip_special_tokens=False)}
        assert r.json()["prompt"].startswith("<|im_start|>user\nhi")
        assert_error(await c.post("/detokenize", json={"tokens": [1, tok.vocab_size]}), 400, param="tokens")
        assert_error(await c.post("/detokenize", json={"tokens": [-1]}), 400, param="tokens")


@pytest.mark.parametrize("body,status,param", [
    ({}, 400, "prompt"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "prompt"),
    ({"messages": [{"role": "wizard", "content": "b"}]}, 400, "messages.0.role"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "a", "model": "other"}, 404, "model"),
])
async def test_tokenize_rejects_bad_bodies(engine, body, status, param):
    async with client_for(engine) as c:
        assert_error(await c.post("/tokenize", json=body), status, param=param)
    assert engine.requests == []


async def test_tokenizer_routes_need_the_key_and_version_and_model_card_answer(engine):
    async with client_for(engine, api_key="s3cret") as c:
        for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [97]})):
            assert_error(await c.post(path, json=body), 401, code="invalid_api_key")
            r = await c.post(path, json=body, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200, r.text
        assert_error(await c.get("/v1/models/fake"), 401, code="invalid_api_key")
        auth = {"Authorization": "Bearer s3cret"}
        r = await c.get("/v1/models/fake", headers=auth)
        assert r.status_code == 200 and r.json()["id"] == "fake" and r.json()["object"] == "model"
        assert_error(await c.get("/v1/models/other", headers=auth), 404, param="model", code="model_not_found")
        assert_error(await c.get("/version"), 401, code="invalid_api_key")
        r = await c.get("/version", headers=auth)
        assert r.status_code == 200 and r.json() == {"version": __version__}
