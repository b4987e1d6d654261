"""Shared fixtures: an in-process client over the gateway, and a real uvicorn server on a free
loopback port (in a thread, started and stopped within bounded time)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest

from server.gateway.app import create_app
from tests.gateway.fake_engine import FakeEngine


@pytest.fixture
def anyio_backend():
    return "asyncio"


def client_for(engine, **kw) -> httpx.AsyncClient:
    kw.setdefault("api_key", None)
    kw.setdefault("served_model_names", ["fake"])
    app = create_app(engine, **kw)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, start_timeout_s: float = 20.0):
    """Serve `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("uvicorn did not start in time")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
