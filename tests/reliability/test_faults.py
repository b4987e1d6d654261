"""Faults on a real server (tiny model, embedded engine): clients leaving mid-stream, a failure
injected into one request's step, KV exhaustion with preemption, and a `via-sd serve` process
killed with SIGKILL, restarted on the same port, then stopped with SIGTERM mid-stream. After
each, nothing is left behind: no running or waiting sequence, no used KV block, no listener."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from server.engine.async_engine import RequestFault
from tests.gateway.conftest import free_port
from tests.reliability.conftest import MODEL, embedded_server, start_serve, stop_serve, wait_idle

pytestmark = pytest.mark.slow


def slow_steps(delay_s: float):
    return lambda _engine: time.sleep(delay_s)


def stream_body(prompt: str, max_tokens: int, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, **kw}


def test_100_clients_leaving_mid_stream_leak_nothing(tiny_model):
    with embedded_server(tiny_model, max_num_seqs=32, max_waiting=256, num_blocks=512) as (url, engine):
        before = wait_idle(engine).generation_tokens
        engine.fault_hook = slow_steps(0.005)  # streams outlive the clients
        rng = random.Random(0)

        async def leave_early(i: int, client: httpx.AsyncClient) -> str:
            body = stream_body(f"client {i} " * rng.randint(1, 6), 200, temperature=rng.choice([0, 0.9]),
                               via_sd={"mode": ("off", "binary", "three_tier")[i % 3]})
            if i % 5 == 0:  # leaves before the response starts (queued, or in prefill)
                try:
                    async with asyncio.timeout(rng.uniform(0.01, 0.3)):
                        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                            await r.aread()
                except TimeoutError:
                    return "left before headers"
                return "finished"
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                frames = 0
                async for line in r.aiter_lines():
                    frames += line.startswith("data: ")
                    if frames >= rng.randint(1, 6):
                        return "left mid-stream"  # closing the context drops the connection
            return "finished"

        async def main():
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                return await asyncio.wait_for(
                    asyncio.gather(*(leave_early(i, client) for i in range(100))), 300)

        try:
            results = asyncio.run(main())
        finally:
            engine.fault_hook = None
        assert results.count("left mid-stream") >= 70, results
        s = wait_idle(engine)
        assert s.generation_tokens - before < 100 * 200  # aborted, not run to the end
        r = httpx.post(url + "/v1/completions", timeout=60, json={"model": MODEL, "prompt": "after", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        wait_idle(engine)


def fault_for(marker: bytes, after_tokens: int, fired: list[str]):
    """A step hook that raises `RequestFault` once for the running sequence whose prompt holds
    `marker`, after it has `after_tokens` output tokens; other steps are slowed a little."""

    def hook(eng) -> None:
        if not fired:
            for seq in eng.scheduler.running:
                prompt = bytes(t for t in seq.request.prompt_token_ids if t < 256)
                if marker in prompt and seq.num_output >= after_tokens:
                    fired.append(seq.request_id)
                    raise RequestFault(seq.request_id)
        time.sleep(0.003)

    return hook


@pytest.mark.parametrize("stream", [False, True])
def test_fault_in_one_request_fails_only_that_request(tiny_model, stream):
    with embedded_server(tiny_model, max_num_seqs=8) as (url, engine):
        fired: list[str] = []
        engine.fault_hook = fault_for(b"FAULT-ME", 2 if stream else 0, fired)

        async def one(client, prompt: str) -> httpx.Response:
            body = stream_body(prompt, 24, temperature=0, stream=stream)
            return await client.post(url + "/v1/chat/completions", json=body)

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                others = [asyncio.create_task(one(client, f"bystander {i} " * (i + 1))) for i in range(4)]
                await asyncio.sleep(0.2)
                victim = await one(client, "please FAULT-ME now")
                return victim, await asyncio.gather(*others)

        try:
            victim, others = asyncio.run(asyncio.wait_for(main(), 240))
        finally:
            engine.fault_hook = None
        assert len(fired) == 1
        if stream:
            assert victim.status_code == 200
            frames = [f for f in victim.text.split("\n\n") if f]
            assert frames[-1] == "data: [DONE]"
            error = json.loads(frames[-2][len("data: "):])["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
        else:
            assert victim.status_code == 500, victim.text
            error = victim.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
        for r in others:
            assert r.status_code == 200, r.text
            if stream:
                frames = [f for f in r.text.split("\n\n") if f]
                assert frames[-1] == "data: [DONE]" and '"error"' not in r.text
                assert json.loads(frames[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
            else:
                assert r.json()["usage"]["completion_tokens"] == 24
        wait_idle(engine)


def test_kv_exhaustion_preempts_and_every_request_finishes(tiny_model):
    # 12 blocks of 16 slots (one is the null block): each request needs ~5, eight at once need ~40
    with embedded_server(tiny_model, num_blocks=12, max_num_seqs=8) as (url, engine):
        before = wait_idle(engine)

        async def one(client, i: int) -> httpx.Response:
            return await client.post(url + "/v1/completions", json={
                "model": MODEL, "prompt": f"request {i} " + "words " * 3, "max_tokens": 48, "ignore_eos": True,
                "temperature": 0 if i % 2 else 0.7, "seed": i, "via_sd": {"mode": ("off", "binary", "three_tier")[i % 3]},
            })

        async def main():
            async with httpx.AsyncClient(timeout=240) as client:
                return await asyncio.gather(*(one(client, i) for i in range(8)))

        responses = asyncio.run(asyncio.wait_for(main(), 300))
        for r in responses:
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 48
            assert r.json()["choices"][0]["finish_reason"] == "length"
        s = wait_idle(engine)
        assert s.preemptions > before.preemptions, "the pool was big enough: no preemption was exercised"


def listening_addresses(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on `port` (from /proc/net/tcp{,6})."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, state = fields[1], fields[3]
            host, hexport = addr.rsplit(":", 1)
            if int(hexport, 16) == port and state == "0A":  # LISTEN
                found.append(host)
    return found


def test_kill9_restart_on_same_port_then_sigterm_mid_stream(tiny_model, tmp_path):
    key, secret_prompt = "k-7f3a9c-restart", "zebra-quokka-prompt-1234"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    model_files = sorted(p.name for p in tiny_model.iterdir())
    port = free_port()
    args = ["--spec-mode", "three_tier", "--max-num-seqs", "4", "--shutdown-grace-s", "60"]
    env = {"VIA_SD_API_KEY": key}
    auth = {"Authorization": f"Bearer {key}"}

    first = start_serve(tiny_model, args, port=port, cwd=workdir, env=env, log_path=tmp_path / "first.log")
    try:
        assert listening_addresses(port) == ["0100007F"]  # 127.0.0.1 only, by default
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
            first.proc.wait(timeout=30)

    second = start_serve(tiny_model, args, port=port, cwd=workdir, env=env, log_path=tmp_path / "second.log")
    try:
        r = httpx.post(second.url + "/v1/completions", headers=auth, timeout=120,
                       json={"model": MODEL, "prompt": secret_prompt, "max_tokens": 4})
        assert r.status_code == 200, r.text

        body = {"model": MODEL, "prompt": secret_prompt, "max_tokens": 300, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "via_sd": {"mode": "off"}}
        with httpx.Client(timeout=120) as c, c.stream("POST", second.url + "/v1/completions", json=body, headers=auth) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            first_frame = next(line for line in lines if line)
            gauges = httpx.get(second.url + "/metrics", headers=auth, timeout=30).text
            assert "via_sd_requests_running 1.0" in gauges  # surely in flight when the signal lands
            second.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:  # new work is refused: 503 while the listener lives, or no connection at all
                late = httpx.post(second.url + "/v1/completions", headers=auth, timeout=10,
                                  json={"model": MODEL, "prompt": "late", "max_tokens": 2})
                assert late.status_code == 503, late.text
            except httpx.TransportError:
                pass
            rest = [first_frame] + [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: "):]) for line in rest[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == 300
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert second.proc.wait(timeout=90) == 0
    finally:
        stop_serve(second)

    # nothing left behind: no listener, the port binds again, no files in the working folder or
    # the model folder, and neither the key nor the prompt in either log (default level: info)
    assert listening_addresses(port) == []
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    assert list(workdir.iterdir()) == []
    assert sorted(p.name for p in tiny_model.iterdir()) == model_files
    for log in (first.log(), second.log()):
        assert key not in log and secret_prompt not in log, log[-2000:]
    assert "Application startup complete" in second.log()  # the logs were captured at all
