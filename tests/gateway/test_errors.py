"""Every error case leaves in OpenAI's shape with the right status; auth; ignored fields."""

from __future__ import annotations

import logging

import pytest

from server.engine.api import EngineBusy, RequestRejected
from tests.gateway.conftest import client_for
from tests.gateway.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}


def assert_error(r, status: int, param: str | None = "__any__", code: str | None = "__any__"):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param != "__any__":
        assert err["param"] == param, err
    if code != "__any__":
        assert err["code"] == code, err
    return err


async def test_invalid_json_is_400(engine):
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert_error(r, 400, code="invalid_json")
        r = await c.post("/v1/completions", content=b"[1, 2]")
        assert_error(r, 400, code="invalid_json")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content.0.type"),
        ({**CHAT, "max_tokens": "many"}, "max_tokens"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": None, "max_completion_tokens": -1}, "max_completion_tokens"),
        ({**CHAT, "temperature": -1}, "temperature"),
        ({**CHAT, "top_p": 0}, "top_p"),
        ({**CHAT, "top_k": -5}, "top_k"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "n": 17}, "n"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
        ({**CHAT, "tools": [{"type": "function"}], "tool_choice": "required"}, "tools.0.function"),
        ({**CHAT, "tool_choice": "auto"}, "tool_choice"),
        ({**CHAT, "functions": [{"name": "f"}]}, "functions"),
        ({**CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
        ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
        ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({**CHAT, "presence_penalty": 2.5}, "presence_penalty"),
        ({**CHAT, "frequency_penalty": -2.5}, "frequency_penalty"),
        ({**CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({**CHAT, "logit_bias": {"5": 200}}, "logit_bias"),
        ({**CHAT, "repetition_penalty": 0}, "repetition_penalty"),
        ({**CHAT, "min_p": 1.5}, "min_p"),
        ({**CHAT, "min_tokens": 9}, "min_tokens"),
        ({**CHAT, "via_sd": {"mode": "fast"}}, "via_sd.mode"),
        ({**CHAT, "via_sd": {"accept_threshold": 1.5}}, "via_sd.accept_threshold"),
        ({**CHAT, "via_sd": {"full_accept_threshold": -0.5}}, "via_sd.full_accept_threshold"),
        ({**CHAT, "via_sd": {"accept_threshold": 0.3, "escalate_threshold": 0.6}}, "via_sd.escalate_threshold"),
        ({**CHAT, "via_sd": {"num_draft_tokens": 99}}, "via_sd.num_draft_tokens"),
    ],
)
async def test_chat_validation_400(engine, body, param):
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json=body)
        assert_error(r, 400, param=param)
    assert engine.requests == []  # nothing reached the engine


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": ["one", ""]}, "prompt.1"),
        ({"prompt": [[1, 2], [3, 999999]]}, "prompt.1"),
        ({"prompt": ["one", [1, 2], 3]}, "prompt"),
        ({"prompt": ["x"] * 65}, "prompt"),
        ({"prompt": ["x"] * 20, "n": 16}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 999999]}, "prompt"),
        ({"prompt": "x", "logprobs": 30}, "logprobs"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "echo": True, "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"max_tokens": 3}, "prompt"),
    ],
)
async def test_completion_validation_400(engine, body, param):
    async with client_for(engine) as c:
        r = await c.post("/v1/completions", json=body)
        assert_error(r, 400, param=param)


async def test_a_bad_prompt_in_a_batch_sends_none_of_them(engine):
    async with client_for(engine) as c:
        r = await c.post("/v1/completions", json={"prompt": ["a", "b" * 10_000], "max_tokens": 4})
        assert_error(r, 400, param="prompt.1", code="context_length_exceeded")
    assert engine.requests == []


async def test_tools_without_a_forcing_tool_choice_say_what_to_send(engine):
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]})
        message = r.json()["error"]["message"]
        assert '"auto"' in message and '"required"' in message and '"none"' in message


async def test_unknown_fields_are_ignored_and_logged(engine, caplog):
    caplog.set_level(logging.INFO, logger="via_sd.gateway")
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "frobnicate": {"x": 1}, "store": True})
        assert r.status_code == 200, r.text
    assert "frobnicate" in caplog.text and "store" in caplog.text
    assert "hello" not in caplog.text  # never the prompt


async def test_unknown_model_404(engine):
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "gpt-17"})
        assert_error(r, 404, param="model", code="model_not_found")
        r = await c.post("/v1/chat/completions", json={**CHAT, "model": "fake"})
        assert r.status_code == 200


async def test_context_length_exceeded(engine):
    engine.max_model_len = 64
    async with client_for(engine) as c:
        r = await c.post("/v1/completions", json={"prompt": "x" * 40, "max_tokens": 30})
        assert_error(r, 400, param="max_tokens", code="context_length_exceeded")
        r = await c.post("/v1/completions", json={"prompt": "x" * 64, "max_tokens": 1})
        assert_error(r, 400, param="prompt", code="context_length_exceeded")
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 40}], "max_completion_tokens": 40})
        assert_error(r, 400, param="max_completion_tokens", code="context_length_exceeded")
        # omitted max_tokens in chat: the remaining context
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 10}], "temperature": 0})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 64
        assert r.json()["choices"][0]["finish_reason"] == "length"
        # omitted max_tokens in completions: OpenAI's 16
        r = await c.post("/v1/completions", json={"prompt": "abc", "temperature": 0})
        assert r.json()["usage"]["completion_tokens"] == 16


async def test_body_too_large_413():
    engine = FakeEngine()
    async with client_for(engine, max_body_bytes=1000) as c:
        big = {"prompt": "x" * 2000}
        r = await c.post("/v1/completions", json=big)
        assert_error(r, 413, code="request_too_large")

        async def chunks():  # no Content-Length: the streamed size counts
            for _ in range(5):
                yield b" " * 400

        r = await c.post("/v1/completions", content=chunks())
        assert_error(r, 413, code="request_too_large")
        r = await c.post("/v1/completions", json={"prompt": "small", "max_tokens": 2})
        assert r.status_code == 200


async def test_busy_429_with_retry_after():
    engine = FakeEngine(reject_with=EngineBusy(retry_after_s=3))
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert_error(r, 429)
        assert r.headers["retry-after"] == "3"
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert_error(r, 429)


async def test_real_queue_full_429():
    engine = FakeEngine(max_num_seqs=1, max_waiting=0, step_delay_s=0.01)
    import asyncio

    async with client_for(engine) as c:
        slow = asyncio.create_task(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 40}))
        for _ in range(200):
            if engine.stats().requests_running:
                break
            await asyncio.sleep(0.005)
        r = await c.post("/v1/completions", json={"prompt": "b", "max_tokens": 4})
        assert_error(r, 429)
        assert int(r.headers["retry-after"]) >= 1
        assert (await slow).status_code == 200


async def test_not_ready_503_and_health():
    engine = FakeEngine(ready=False)
    async with client_for(engine) as c:
        assert (await c.get("/health")).status_code == 503
        assert_error(await c.post("/v1/chat/completions", json=CHAT), 503)
        await engine.start()
        assert (await c.get("/health")).status_code == 200


async def test_engine_rejection_400():
    engine = FakeEngine(reject_with=RequestRejected("too long for the cache", param="prompt", code="kv_cache_too_small"))
    async with client_for(engine) as c:
        assert_error(await c.post("/v1/completions", json={"prompt": "x"}), 400, param="prompt", code="kv_cache_too_small")


async def test_engine_failure_500():
    engine = FakeEngine(fail_after_steps=2)
    async with client_for(engine) as c:
        assert_error(await c.post("/v1/chat/completions", json=CHAT), 500)
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200  # the stream had started: the error is an event
        frames = r.text.split("\n\n")
        assert any('"error"' in f for f in frames) and frames[-2] == "data: [DONE]"
    assert engine.stats().kv_cache_usage == 0


async def test_auth():
    engine = FakeEngine()
    async with client_for(engine, api_key="s3cret") as c:
        assert_error(await c.post("/v1/chat/completions", json=CHAT), 401, code="invalid_api_key")
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong"})
        assert_error(r, 401)
        r = await c.get("/v1/models", headers={"Authorization": "Basic s3cret"})
        assert_error(r, 401)
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})).status_code == 200
        assert (await c.get("/health")).status_code == 200  # open
        # 401 comes before reading (or limiting) the body
        r = await c.post("/v1/completions", content=b"x" * (2 << 20))
        assert r.status_code == 401


async def test_models_and_unknown_route(engine):
    async with client_for(engine, served_model_names=["a", "b"]) as c:
        r = await c.get("/v1/models")
        assert [m["id"] for m in r.json()["data"]] == ["a", "b"]
        assert r.json()["object"] == "list"
        assert_error(await c.get("/v1/nothing"), 404)


async def test_request_timeout_504_and_abort():
    engine = FakeEngine(step_delay_s=0.02)
    async with client_for(engine, request_timeout_s=0.2) as c:
        assert_error(await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 400}), 504, code="timeout")
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 400, "stream": True})
        assert r.status_code == 200
        assert '"code":"timeout"' in r.text and r.text.endswith("data: [DONE]\n\n")
    s = engine.stats()
    assert s.kv_cache_usage == 0 and s.requests_running == 0
    assert len(engine.aborted) == 2


async def test_request_timeout_504_aborts_every_choice():
    engine = FakeEngine(step_delay_s=0.02)
    async with client_for(engine, request_timeout_s=0.2) as c:
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 400, "n": 2, "temperature": 0.5})
        assert_error(r, 504, code="timeout")
    s = engine.stats()
    assert s.kv_cache_usage == 0 and s.requests_running == 0
    assert len(engine.aborted) == 2
