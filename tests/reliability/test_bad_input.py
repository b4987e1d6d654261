"""Bad input against the gateway over the real embedded engine (tiny model, in-process): the
explicit hostile cases that tests/gateway/test_errors.py (over the fake engine) does not cover.
The schema-driven fuzz is in test_schema_fuzz.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from server.gateway.app import create_app
from tests.reliability.conftest import MODEL, new_engine, wait_idle

CONTEXT = 64  # max_model_len: keeps every generated request short


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = new_engine(tiny_model, max_model_len=CONTEXT, num_blocks=96, max_num_seqs=8, max_waiting=64)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown(2))


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, api_key=None, served_model_names=[MODEL], request_timeout_s=120)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMP = {"model": MODEL, "prompt": "hi", "max_tokens": 4}


def post(app, path: str, *, json_body=None, content: bytes | None = None, headers=None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as c:
            if content is not None:
                return await c.post(path, content=content, headers={"content-type": "application/json", **(headers or {})})
            return await c.post(path, json=json_body, headers=headers)

    return asyncio.run(go())


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "temperature": 1e308}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": -0.5}, "temperature"),
    ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {**CHAT, "top_p": -0.1}, "top_p"),
    ("/v1/completions", {**COMP, "top_p": 1.0000001}, "top_p"),
    ("/v1/completions", {**COMP, "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {**COMP, "max_tokens": 10**30}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": CONTEXT}, "max_tokens"),
    ("/v1/completions", {**COMP, "seed": 2**80}, "seed"),
    ("/v1/completions", {**COMP, "seed": -(2**70)}, "seed"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**63 - 1, "n": 2}, "seed"),
    ("/v1/completions", {**COMP, "prompt": [-1, 5]}, "prompt"),
    ("/v1/completions", {**COMP, "stop": [1, 2]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "via_sd": "fast"}, "via_sd"),
    ("/v1/chat/completions", {**CHAT, "via_sd": {"num_draft_tokens": -1}}, "via_sd.num_draft_tokens"),
])
def test_bad_values_are_400_not_500(app, engine, path, body, param):
    r = post(app, path, json_body=body)
    assert_openai_error(r, 400, param=param)
    wait_idle(engine)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {**CHAT, "temperature": 2.5}),  # above OpenAI's 2, served as vLLM does
    ("/v1/completions", {**COMP, "seed": -1}),
    ("/v1/completions", {**COMP, "seed": 2**63 - 1}),
    ("/v1/completions", {**COMP, "stop_token_ids": [10**12]}),  # can never match: ignored
    ("/v1/chat/completions", {**CHAT, "n": "2"}),  # lax integer
])
def test_edge_values_are_served_or_refused_never_5xx(app, engine, path, body):
    r = post(app, path, json_body=body)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert_openai_error(r, 400)
    wait_idle(engine)


@pytest.mark.parametrize("raw", [
    b'{"model": "tiny", "prompt": "\xff\xfe caf\xc3", "max_tokens": 2}',  # invalid UTF-8
    b'{"model": "tiny", "prompt": "x", "max_tokens": 2,}',               # trailing comma
    b"",
    b"null",
    b'"just a string"',
])
def test_undecodable_bodies_are_400_invalid_json(app, raw):
    assert_openai_error(post(app, "/v1/completions", content=raw), 400, code="invalid_json")


@pytest.mark.parametrize("path, raw", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\ud83d"], "max_tokens": 2}'),
    ("/v1/completions", b'{"model": "tiny", "prompt": "ok \\ud83d\\ude00 pair", "max_tokens": 2, "user": "\\udc00"}'),
])
def test_lone_surrogates_are_400(app, engine, path, raw):
    assert_openai_error(post(app, path, content=raw), 400)
    wait_idle(engine)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_400(app, engine, literal):
    raw = b'{"model": "tiny", "prompt": "x", "max_tokens": 2, "temperature": ' + literal + b"}"
    assert_openai_error(post(app, "/v1/completions", content=raw), 400)
    wait_idle(engine)


def test_prompt_longer_than_the_context_is_context_length_exceeded(app, engine):
    r = post(app, "/v1/completions", json_body={**COMP, "prompt": "z" * (CONTEXT + 10), "max_tokens": 1})
    assert_openai_error(r, 400, code="context_length_exceeded")
    r = post(app, "/v1/chat/completions", json_body={**CHAT, "messages": [{"role": "user", "content": "z" * (CONTEXT + 10)}]})
    assert_openai_error(r, 400, code="context_length_exceeded")
    wait_idle(engine)


def test_many_stops_and_odd_but_valid_input_still_answer(app, engine):
    # within limits, unusual input is served: 4 stop strings, unicode, a NUL byte, empty stop
    body = {**COMP, "prompt": "caf\u00e9 \u2603 \U0001f600 \x00 end", "stop": ["a", "bb", "\u2603", "\U0001f600"]}
    r = post(app, "/v1/completions", json_body=body)
    assert r.status_code == 200, r.text
    r = post(app, "/v1/chat/completions", json_body={**CHAT, "stop": "", "temperature": 0})
    assert r.status_code in (200, 400), r.text
    wait_idle(engine)
