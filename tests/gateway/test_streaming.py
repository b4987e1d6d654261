"""SSE framing byte for byte, usage placement, n > 1, and disconnects that abort the request."""

from __future__ import annotations

import asyncio
import json

import pytest

import server.gateway.serving as serving
from server.gateway.app import create_app
from tests.gateway.conftest import client_for
from tests.gateway.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}


@pytest.fixture
def frozen(monkeypatch):
    monkeypatch.setattr(serving, "now", lambda: 1700000000)
    monkeypatch.setattr(serving, "new_id", lambda prefix: f"{prefix}-test")


def frames(body: bytes) -> list[str]:
    """Split an SSE body into its `data:` payloads, checking the framing on the way."""
    text = body.decode()
    assert "\r" not in text
    assert text.endswith("data: [DONE]\n\n")
    parts = text.split("\n\n")
    assert parts[-1] == ""
    out = []
    for p in parts[:-1]:
        assert p.startswith("data: ") and "\n" not in p, p
        out.append(p[len("data: "):])
    return out


async def test_chat_sse_bytes_exact(engine, frozen):
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json={**HI, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    head = b'{"id":"chatcmpl-test","object":"chat.completion.chunk","created":1700000000,"model":"fake",'
    expected = (
        b"data: " + head + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        b"data: " + head + b'"choices":[{"index":0,"delta":{"content":"or"},"logprobs":null,"finish_reason":null}]}\n\n'
        b"data: " + head + b'"choices":[{"index":0,"delta":{"content":" q"},"logprobs":null,"finish_reason":null}]}\n\n'
        b"data: " + head + b'"choices":[{"index":0,"delta":{"content":"u"},"logprobs":null,"finish_reason":"length"}]}\n\n'
        b"data: " + head + b'"choices":[],"usage":{"prompt_tokens":21,"completion_tokens":5,"total_tokens":26,'
        b'"prompt_tokens_details":{"cached_tokens":0},"via_sd":{"draft_tokens":9,"accepted":4,"slim_regenerated":1,"full_verified":4,"slim_passes":3,"full_passes":2,"steps":3,"lenient_accepted":0}}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert r.content == expected


async def test_usage_only_in_final_chunk(engine):
    async with client_for(engine) as c:
        for endpoint, body in (("/v1/chat/completions", HI), ("/v1/completions", {"prompt": "hello", "max_tokens": 7})):
            r = await c.post(endpoint, json={**body, "stream": True, "stream_options": {"include_usage": True}})
            chunks = [json.loads(f) for f in frames(r.content)[:-1]]
            assert all("usage" not in ch for ch in chunks[:-1])
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == body["max_tokens"]
            for opts in (None, {"include_usage": False}):
                req = {**body, "stream": True} if opts is None else {**body, "stream": True, "stream_options": opts}
                r = await c.post(endpoint, json=req)
                chunks = [json.loads(f) for f in frames(r.content)[:-1]]
                assert all("usage" not in ch for ch in chunks)
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(engine):
    """vLLM's `stream_options.continuous_usage_stats`: with include_usage, every chunk carries the
    usage so far (the prompt from the first one, completion tokens growing), then the final one."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    async with client_for(engine) as c:
        for endpoint, body in (("/v1/chat/completions", HI), ("/v1/completions", {"prompt": "hello", "max_tokens": 7})):
            r = await c.post(endpoint, json={**body, "stream": True, "stream_options": opts})
            chunks = [json.loads(f) for f in frames(r.content)[:-1]]
            assert all("usage" in ch for ch in chunks) and chunks[-1]["choices"] == []
            done = [ch["usage"]["completion_tokens"] for ch in chunks]
            assert done == sorted(done) and done[-1] == body["max_tokens"] and done[-2] == done[-1]
            assert len({ch["usage"]["prompt_tokens"] for ch in chunks}) == 1
            assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in (ch["usage"] for ch in chunks))
            # without include_usage it does nothing, as in vLLM
            r = await c.post(endpoint, json={**body, "stream": True, "stream_options": {"continuous_usage_stats": True}})
            assert all("usage" not in json.loads(f) for f in frames(r.content)[:-1])


async def test_stream_joins_to_non_stream_text(engine):
    async with client_for(engine) as c:
        for stop in (None, "x", ["ump", "lazy"]):
            body = {**HI, "max_tokens": 60, "stop": stop, "logprobs": True, "top_logprobs": 2}
            full = (await c.post("/v1/chat/completions", json=body)).json()
            r = await c.post("/v1/chat/completions", json={**body, "stream": True})
            chunks = [json.loads(f) for f in frames(r.content)[:-1]]
            text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
            assert text == full["choices"][0]["message"]["content"]
            assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
            lps = [t for ch in chunks for t in (ch["choices"][0]["logprobs"] or {}).get("content", [])]
            assert lps == full["choices"][0]["logprobs"]["content"]
        # completions, with the legacy logprobs shape
        body = {"prompt": "The fox", "max_tokens": 30, "temperature": 0, "stop": "og", "logprobs": 2}
        full = (await c.post("/v1/completions", json=body)).json()
        r = await c.post("/v1/completions", json={**body, "stream": True})
        chunks = [json.loads(f) for f in frames(r.content)[:-1]]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == full["choices"][0]["text"]
        assert full["choices"][0]["finish_reason"] == "stop"
        lp = full["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        offsets = [o for ch in chunks for o in ch["choices"][0]["logprobs"]["text_offset"]]
        assert offsets == lp["text_offset"]


async def test_stop_string_not_in_output(engine):
    async with client_for(engine) as c:
        r = await c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 100, "temperature": 0, "stop": ["lazy"]})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and "lazy" not in choice["text"]


async def test_eos_finish_reason_stop():
    engine = FakeEngine(eos_after=4)
    async with client_for(engine) as c:
        r = await c.post("/v1/chat/completions", json={**HI, "max_tokens": 50})
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        assert r.json()["usage"]["completion_tokens"] == 5  # four tokens and the EOS


async def test_n_choices(engine):
    async with client_for(engine) as c:
        body = {**HI, "n": 3, "temperature": 0.8, "seed": 11, "max_tokens": 12}
        r = await c.post("/v1/chat/completions", json=body)
        data = r.json()
        assert [ch["index"] for ch in data["choices"]] == [0, 1, 2]
        assert data["usage"]["completion_tokens"] == 36
        assert data["usage"]["prompt_tokens"] == 21
        assert sorted(req.sampling.seed for req in engine.requests) == [11, 12, 13]
        texts = [ch["message"]["content"] for ch in data["choices"]]
        assert len(set(texts)) > 1  # different seeds, different samples
        again = (await c.post("/v1/chat/completions", json=body)).json()
        assert [ch["message"]["content"] for ch in again["choices"]] == texts  # seeded: reproducible

        r = await c.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
        chunks = [json.loads(f) for f in frames(r.content)[:-1]]
        roles = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["delta"].get("role")]
        assert sorted(ch["choices"][0]["index"] for ch in roles) == [0, 1, 2]
        joined = {i: "" for i in range(3)}
        for ch in chunks[:-1]:
            joined[ch["choices"][0]["index"]] += ch["choices"][0]["delta"].get("content", "")
        assert [joined[i] for i in range(3)] == texts
        assert chunks[-1]["usage"]["completion_tokens"] == 36
    assert engine.stats().kv_cache_usage == 0


# ----------------------------------------------------------------------------- disconnects


async def call_and_disconnect(app, path: str, body: dict, disconnect_when) -> list[dict]:
    """Drive the ASGI app directly: send the body, then report `http.disconnect` as soon as
    `disconnect_when(sent_messages)` is true."""
    sent: list[dict] = []
    gone = asyncio.Event()
    payload = json.dumps(body).encode()
    first = True

    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": payload, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if disconnect_when(sent):
            gone.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
    }
    return sent, gone, asyncio.create_task(app(scope, receive, send))


async def test_cancelled_stream_aborts_and_frees_blocks():
    engine = FakeEngine(step_delay_s=0.01)
    app = create_app(engine, api_key=None, served_model_names=["fake"])
    body = {**HI, "max_tokens": 400, "stream": True}

    def after_two_content_chunks(sent):
        return sum(1 for m in sent if m["type"] == "http.response.body" and b"content" in m.get("body", b"")) >= 3

    sent, _, task = await call_and_disconnect(app, "/v1/chat/completions", body, after_two_content_chunks)
    await asyncio.wait_for(task, timeout=10)
    assert engine.requests and engine.requests[0].request_id in engine.aborted
    s = engine.stats()
    assert s.kv_cache_usage == 0 and s.requests_running == 0 and s.requests_waiting == 0
    assert s.generation_tokens < 400


async def test_disconnect_while_waiting_non_stream_aborts():
    engine = FakeEngine(step_delay_s=0.01)
    app = create_app(engine, api_key=None, served_model_names=["fake"])
    sent, gone, task = await call_and_disconnect(app, "/v1/completions", {"prompt": "x", "max_tokens": 400}, lambda s: False)
    for _ in range(500):
        if engine.stats().generation_tokens > 5:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().requests_running == 1 and engine.stats().kv_cache_usage > 0
    gone.set()
    await asyncio.wait_for(task, timeout=10)
    s = engine.stats()
    assert s.kv_cache_usage == 0 and s.requests_running == 0
    assert engine.requests[0].request_id in engine.aborted


async def test_many_cancelled_streams_return_every_block():
    engine = FakeEngine(step_delay_s=0.002, max_num_seqs=3, max_waiting=20)
    app = create_app(engine, api_key=None, served_model_names=["fake"])
    tasks = []
    for k in range(8):
        body = {**HI, "max_tokens": 300, "stream": True, "n": 1 + k % 2}
        _, _, t = await call_and_disconnect(
            app, "/v1/chat/completions", body,
            lambda sent, k=k: sum(m["type"] == "http.response.body" for m in sent) > 1 + k,
        )
        tasks.append(t)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
    s = engine.stats()
    assert s.kv_cache_usage == 0 and s.requests_running == 0 and s.requests_waiting == 0


async def test_disconnect_while_queued_aborts_everything():
    engine = FakeEngine(step_delay_s=0.01, max_num_seqs=1, max_waiting=10)
    app = create_app(engine, api_key=None, served_model_names=["fake"])
    _, gone1, t1 = await call_and_disconnect(app, "/v1/completions", {"prompt": "x", "max_tokens": 400}, lambda s: False)
    for _ in range(300):
        if engine.stats().requests_running:
            break
        await asyncio.sleep(0.01)
    body = {"prompt": "y", "max_tokens": 5, "stream": True, "n": 2}
    _, gone2, t2 = await call_and_disconnect(app, "/v1/completions", body, lambda s: False)
    for _ in range(300):
        if engine.stats().requests_waiting == 2:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().requests_waiting == 2
    gone2.set()
    await asyncio.wait_for(t2, timeout=10)
    assert engine.stats().requests_waiting == 0
    gone1.set()
    await asyncio.wait_for(t1, timeout=10)
    s = engine.stats()
    assert s.kv_cache_usage == 0 and s.requests_running == 0 and s.requests_waiting == 0
