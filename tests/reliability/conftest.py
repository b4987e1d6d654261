"""Shared pieces of the reliability tests: the tiny 4-layer model, a real server over the embedded
engine (uvicorn in a thread, or `via-sd serve` as a subprocess), and a bounded wait for the
engine to go idle. All traffic is on 127.0.0.1; every wait has a deadline."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import free_port, running_server

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"


def pytest_collection_modifyitems(items):
    """schemathesis names each operation's test `test[POST /v1/completions]`, but under pytest 9
    (whose node ids live in `_id`, not the `_nodeid` schemathesis sets) all nine share the
    function's node id. pytest-xdist (`make test` runs two processes) keys tests by node id, so it
    ran one operation of the nine: each gets the id its name has."""
    from _pytest.nodeid import coerce_node_id

    for item in items:
        if type(item).__name__ == "SchemathesisFunction" and "[" in item.name and not item.nodeid.endswith("]"):
            item._id = coerce_node_id(item.nodeid + item.name[item.name.index("["):])


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from server.engine.testing import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("reliability-model") / MODEL, num_layers=4)


def engine_config(folder: Path, **kw):
    from server.engine.config import EngineConfig, SpecConfig

    kw.setdefault("num_blocks", 256)
    kw.setdefault("max_num_seqs", 16)
    mode = kw.pop("spec_mode", "three_tier")
    return EngineConfig(model=str(folder), spec=SpecConfig(mode=mode), **kw)


def new_engine(folder: Path, **kw):
    from server.engine.async_engine import EmbeddedAsyncEngine

    engine = EmbeddedAsyncEngine(engine_config(folder, **kw))
    # compile the engine modules and the chat template in this thread first (CPython 3.11 before
    # 3.11.8 can fail when two threads compile at once)
    import server.engine.engine  # noqa: F401

    engine.tokenizer.apply_chat_template([{"role": "user", "content": "warm up"}])
    return engine


@contextlib.contextmanager
def embedded_server(folder: Path, *, api_key: str | None = None, app_kw: dict | None = None, **engine_kw):
    """uvicorn on a free loopback port over a fresh embedded engine; yields (url, engine)."""
    from server.gateway.app import create_app

    engine = new_engine(folder, **engine_kw)
    app = create_app(engine, api_key=api_key, served_model_names=[MODEL], lifespan_start=True,
                     shutdown_grace_s=5, **(app_kw or {}))
    with running_server(app, start_timeout_s=120) as url:
        yield url, engine


def wait_idle(engine, timeout_s: float = 60.0):
    """The engine's stats once nothing runs, nothing waits and the KV pool is full again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.requests_running == 0 and s.requests_waiting == 0 and s.kv_cache_usage == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"the engine did not go idle within {timeout_s} s: {engine.stats()}")


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_serve(folder: Path, args: list[str], *, port: int | None = None, cwd: Path | None = None,
                env: dict | None = None, log_path: Path, start_timeout_s: float = 180.0) -> ServeProcess:
    """`via-sd serve --model folder` as a subprocess, healthy on 127.0.0.1:port within the
    deadline (else killed and failed)."""
    port = port or free_port()
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(folder), "--port", str(port), *args],
        cwd=cwd or REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    srv = ServeProcess(proc, port, log_path)
    deadline = time.monotonic() + start_timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"via-sd serve exited with {proc.returncode}:\n{srv.log()[-3000:]}")
        try:
            if httpx.get(srv.url + "/health", timeout=2).status_code == 200:
                return srv
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_serve(srv)
            raise AssertionError(f"via-sd serve was not healthy within {start_timeout_s} s:\n{srv.log()[-3000:]}")
        time.sleep(0.2)


def stop_serve(srv: ServeProcess, timeout_s: float = 60.0) -> int:
    """SIGTERM, then SIGKILL past the deadline; the exit code."""
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(timeout=30)
    return srv.proc.returncode


@contextlib.contextmanager
def serve_subprocess(folder: Path, args: list[str], **kw):
    """`start_serve` with its log in a temporary file, stopped on the way out."""
    with tempfile.TemporaryDirectory() as logs:
        srv = start_serve(folder, args, log_path=Path(logs) / "serve.log", **kw)
        try:
            yield srv
        finally:
            stop_serve(srv)
