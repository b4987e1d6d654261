"""Security at the edge: the API key on every route but /health (/metrics too, unless
`metrics_public`), compared in constant time; neither keys nor prompt text in the logs at the
default level; loopback by default; body, header and time limits; and no route that reads a
file named by request input."""

from __future__ import annotations

import argparse
import asyncio
import builtins
import hmac
import logging
import os
import time

import httpx
import pytest
from fastapi.routing import APIRoute

from server.gateway import serve
from server.gateway.app import create_app
from tests.gateway.conftest import running_server
from tests.gateway.fake_engine import FakeEngine
from tests.reliability.conftest import MODEL, embedded_server, new_engine, wait_idle

KEY = "sk-test-5f1e0c2b9d"


def routes(app) -> list[tuple[str, str]]:
    return sorted((r.path_format, m) for r in app.routes if isinstance(r, APIRoute) for m in r.methods)


async def call(c: httpx.AsyncClient, method: str, path: str, **kw) -> httpx.Response:
    body = {"model": "fake", "prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            "tokens": [120]}
    if path == "/tokenize":  # a prompt or messages, not both
        del body["messages"]
    return await c.request(method, path.replace("{model}", "fake"), json=body if method == "POST" else None, **kw)


@pytest.mark.anyio
async def test_every_route_but_health_needs_the_key():
    app = create_app(FakeEngine(), api_key=KEY, served_model_names=["fake"])
    found = routes(app)
    # the document lists the same routes, so a new route cannot slip past this test
    assert sorted((p, m.upper()) for p, ops in app.openapi()["paths"].items() for m in ops) == found
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
        for path, method in found:
            if path == "/health":
                assert (await call(c, method, path)).status_code == 200
                continue
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                            {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer"}):
                r = await call(c, method, path, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            r = await call(c, method, path, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200, (path, r.text)
        # unknown /v1 routes do not tell an unauthenticated caller whether they exist
        assert (await c.get("/v1/secret-route")).status_code == 401


@pytest.mark.anyio
async def test_metrics_public_opens_only_metrics():
    app = create_app(FakeEngine(), api_key=KEY, served_model_names=["fake"], metrics_public=True)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/v1/models")).status_code == 401
    parser = argparse.ArgumentParser()
    serve.add_serve_arguments(parser)
    assert serve.resolve_settings(parser.parse_args(["--metrics-public"])).metrics_public
    assert not serve.resolve_settings(parser.parse_args([])).metrics_public


@pytest.mark.anyio
async def test_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    app = create_app(FakeEngine(), api_key=KEY, served_model_names=["fake"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
    assert calls == [(b"nope", KEY.encode()), (KEY.encode(), KEY.encode())]


@pytest.mark.slow
def test_keys_and_prompts_never_reach_the_logs(tiny_model, caplog):
    from server.engine.async_engine import RequestFault

    prompt = "PLATYPUS-SECRET-PROMPT-42"
    wrong = "sk-wrong-0b8d7e"
    caplog.set_level(logging.INFO)  # `via-sd serve`'s default level
    with embedded_server(tiny_model, api_key=KEY) as (url, engine):
        auth = {"Authorization": f"Bearer {KEY}"}

        def fault(eng):
            # Waiting requests too: sampled at temperature 1, the tiny model can end a request
            # at its first token, in the step that admits it, before it is ever seen running.
            for seq in [*eng.scheduler.waiting, *eng.scheduler.running]:
                if b"FAIL" in bytes(t for t in seq.request.prompt_token_ids if t < 256):
                    raise RequestFault(seq.request_id)

        with httpx.Client(base_url=url, timeout=60) as c:
            chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}
            assert c.post("/v1/chat/completions", json=chat, headers=auth).status_code == 200
            assert c.post("/v1/chat/completions", json={**chat, "stream": True}, headers=auth).status_code == 200
            assert c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                                   "unknown_field": prompt}, headers=auth).status_code == 200
            assert c.post("/v1/chat/completions", json={**chat, "temperature": -1}, headers=auth).status_code == 400
            assert c.post("/v1/completions", json={"model": prompt, "prompt": prompt}, headers=auth).status_code == 404
            assert c.post("/v1/chat/completions", json=chat,
                          headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
            engine.fault_hook = fault
            try:
                r = c.post("/v1/completions", json={"model": MODEL, "prompt": "FAIL " + prompt, "max_tokens": 4},
                           headers=auth)
                assert r.status_code == 500
            finally:
                engine.fault_hook = None
        wait_idle(engine)
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "unknown_field" in text  # the capture works: the ignored field's name is logged
    for secret in (KEY, wrong, prompt):
        assert secret not in text, secret


def test_binds_loopback_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("VIA_SD_HOST", raising=False)
    parser = argparse.ArgumentParser()
    serve.add_serve_arguments(parser)
    s = serve.resolve_settings(parser.parse_args([]))
    app = create_app(FakeEngine(), api_key=None, served_model_names=["fake"])
    server = serve._make_server(app, s)
    assert server.config.host == "127.0.0.1"
    assert server.config.h11_max_incomplete_event_size <= 64 << 10  # request heads are bounded
    assert 0 < s.request_timeout_s <= 3600 and s.max_body_bytes <= 16 << 20
    assert serve._make_server(app, serve.resolve_settings(parser.parse_args(["--host", "0.0.0.0"]))).config.host == "0.0.0.0"


@pytest.mark.slow
def test_body_and_header_limits_on_a_live_server():
    app = create_app(FakeEngine(), api_key=None, served_model_names=["fake"])
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        big = b'{"prompt": "' + b"x" * (8 << 20) + b'"}'
        r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = c.post("/v1/completions", content=iter([big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)]))
        assert r.status_code == 413  # streamed without a Content-Length
        for size in (20 << 10, 256 << 10):  # past the gateway's limit, and past the HTTP parser's buffer
            try:
                r = c.get("/v1/models", headers={"X-Padding": "p" * size})
                assert r.status_code in (400, 431), r.text
            except httpx.RemoteProtocolError:
                pass  # the parser dropped the connection: refused just the same
        assert c.get("/v1/models").status_code == 200  # and the server is fine


@pytest.mark.anyio
async def test_header_limit_is_431_in_the_gateway():
    app = create_app(FakeEngine(), api_key=None, served_model_names=["fake"], max_header_bytes=4096)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as c:
        r = await c.get("/v1/models", headers={"X-Padding": "p" * 5000})
        assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
        assert (await c.get("/v1/models", headers={"X-Padding": "p" * 1000})).status_code == 200


@pytest.mark.slow
def test_per_request_time_limit_on_the_real_engine(tiny_model):
    with embedded_server(tiny_model, app_kw={"request_timeout_s": 1.0}) as (url, engine):
        engine.fault_hook = lambda _engine: time.sleep(0.05)
        try:
            t0 = time.monotonic()
            r = httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": MODEL, "prompt": "slow", "max_tokens": 300, "ignore_eos": True})
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
            assert time.monotonic() - t0 < 15
        finally:
            engine.fault_hook = None
        wait_idle(engine)


PATHS = ["/etc/passwd", "../../etc/passwd", "file:///etc/passwd", "tiny/../../../etc/passwd", "~/.ssh/id_rsa",
         "\\\\server\\share", "/proc/self/environ"]


@pytest.mark.slow
def test_no_route_reads_files_named_by_request_input(tiny_model, monkeypatch):
    engine = new_engine(tiny_model, max_model_len=128)
    asyncio.run(engine.start())
    app = create_app(engine, api_key=None, served_model_names=[MODEL])
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)

    def spy_os_open(path, *a, **kw):
        opened.append(str(path))
        return real_os_open(path, *a, **kw)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60) as c:
            for p in PATHS + [str(tiny_model), str(tiny_model / "config.json")]:
                for route, body in (("/v1/completions", {"prompt": "x"}),
                                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
                    r = await c.post(route, json={**body, "model": p, "max_tokens": 2})
                    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
                # as text, a path is only text
                r = await c.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 4, "user": p,
                                                          "stop": [p], "suffix": None})
                assert r.status_code == 200 and "root:" not in r.text
            assert (await c.get("/v1/models/..%2F..%2Fetc%2Fpasswd")).status_code in (401, 404)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    try:
        asyncio.run(go())
    finally:
        monkeypatch.undo()
        wait_idle(engine)
        asyncio.run(engine.shutdown(2))
    touched = [f for f in opened if any(p.strip("~/\\.") in f for p in PATHS) or str(tiny_model) in f]
    assert touched == [], touched
