"""The official `openai` SDK against a real uvicorn server on a loopback port."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.gateway.app import create_app
from tests.gateway.conftest import running_server
from tests.gateway.fake_engine import FakeEngine

KEY = "test-key"


@pytest.fixture(scope="module")
def fake_server():
    engine = FakeEngine(step_delay_s=0.001)
    app = create_app(engine, api_key=KEY, served_model_names=["fake"], lifespan_start=True)
    with running_server(app) as url:
        yield url, engine


def sdk(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=20, max_retries=0)


def check_chat_and_completions(
    client: openai.OpenAI, model: str, max_tokens: int = 24, extra_body=None, logprobs: bool = True
):
    """Chat and completions, streamed and not, greedy (with logprobs unless told otherwise): the
    streamed deltas join to exactly the non-streamed text."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    lp = {"logprobs": True, "top_logprobs": 2} if logprobs else {}
    clp = {"logprobs": 2} if logprobs else {}
    full = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=max_tokens, temperature=0, extra_body=extra_body, **lp
    )
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert "via_sd" in full.usage.model_extra
    if logprobs:
        assert len(choice.logprobs.content) == full.usage.completion_tokens or choice.finish_reason == "stop"
        assert all(len(t.top_logprobs) <= 2 for t in choice.logprobs.content)

    stream = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra_body, **lp
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [choice.finish_reason]
    if logprobs:
        streamed_lp = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
        assert [t.token for t in streamed_lp] == [t.token for t in choice.logprobs.content]

    comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=max_tokens, temperature=0,
                                  extra_body=extra_body, **clp)
    c0 = comp.choices[0]
    if logprobs:
        assert len(c0.logprobs.tokens) == len(c0.logprobs.token_logprobs) == len(c0.logprobs.text_offset)
    pieces = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=max_tokens, temperature=0,
                                          stream=True, extra_body=extra_body))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == c0.text
    assert pieces[-1].choices[0].finish_reason == c0.finish_reason


def test_sdk_against_fake_engine(fake_server):
    url, engine = fake_server
    client = sdk(url)
    assert [m.id for m in client.models.list()] == ["fake"]
    assert client.models.retrieve("fake").id == "fake"
    check_chat_and_completions(client, "fake")
    assert engine.stats().kv_cache_usage == 0


def test_sdk_errors(fake_server):
    url, _ = fake_server
    with pytest.raises(openai.AuthenticationError):
        sdk(url, "nope").chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        sdk(url).chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        sdk(url).chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert e.value.body["param"] == "tool_choice"  # "auto": this server has no tool-call parser
    assert httpx.get(url + "/health").status_code == 200


def test_client_closing_stream_aborts_over_http():
    engine = FakeEngine(step_delay_s=0.02)  # 450 tokens take seconds: the close comes first
    app = create_app(engine, api_key=KEY, served_model_names=["fake"])
    with running_server(app) as url:
        _close_stream_early(url, engine)


def _close_stream_early(url: str, engine: FakeEngine) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "go"}], "max_tokens": 450, "stream": True}
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and engine.stats().requests_running:
        time.sleep(0.02)
    s = engine.stats()
    assert s.requests_running == 0 and s.kv_cache_usage == 0
    assert engine.requests[-1].request_id in engine.aborted
