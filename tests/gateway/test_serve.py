"""`via-sd serve` settings, and a graceful SIGTERM: in-flight requests finish, exit code 0."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.gateway import serve
from tests.gateway.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    serve.add_serve_arguments(p)
    return p.parse_args(argv)


def test_defaults_env_fallbacks_and_flags_win(monkeypatch):
    for k in ("VIA_SD_API_KEY", "VIA_SD_HOST", "VIA_SD_PORT", "VIA_SD_MODEL", "VIA_SD_SPEC_MODE", "VIA_SD_DRAFTER"):
        monkeypatch.delenv(k, raising=False)
    s = serve.resolve_settings(parse([]))
    assert (s.host, s.port, s.spec_mode, s.drafter, s.api_key, s.model) == (
        "127.0.0.1", 8000, "three_tier", "hybrid", None, "SmolLM2-135M-Instruct"
    )
    assert serve.resolve_settings(parse(["--backend", "vllm"])).drafter == "ngram"  # the plugin drafts by lookup
    monkeypatch.setenv("VIA_SD_PORT", "9123")
    monkeypatch.setenv("VIA_SD_SPEC_MODE", "binary")
    monkeypatch.setenv("VIA_SD_API_KEY", "from-env")
    monkeypatch.setenv("VIA_SD_DRAFTER", "self")
    s = serve.resolve_settings(parse([]))
    assert (s.port, s.spec_mode, s.api_key, s.drafter) == (9123, "binary", "from-env", "self")
    s = serve.resolve_settings(parse(["--port", "7000", "--spec-mode", "off", "--api-key", "flag"]))
    assert (s.port, s.spec_mode, s.api_key) == (7000, "off", "flag")
    monkeypatch.setenv("VIA_SD_SPEC_MODE", "turbo")
    with pytest.raises(ValueError, match="VIA_SD_SPEC_MODE"):
        serve.resolve_settings(parse([]))


def test_engine_config_from_flags(tmp_path):
    s = serve.resolve_settings(parse(["--spec-mode", "binary", "--drafter", "self", "--max-num-seqs", "3",
                                      "--max-waiting", "5", "--kv-cache-memory-gb", "0.25", "--dtype", "bfloat16"]))
    cfg = serve.engine_config(s, tmp_path)
    assert cfg.model == str(tmp_path) and cfg.dtype == "bfloat16"
    assert (cfg.max_num_seqs, cfg.max_waiting, cfg.kv_cache_memory_gb) == (3, 5, 0.25)
    assert (cfg.spec.mode, cfg.spec.drafter, cfg.spec.num_draft_tokens) == ("binary", "self", 5)
    assert cfg.device == "cpu" and cfg.enable_prefix_caching and cfg.kv_cache_dtype == "auto"
    assert serve.engine_config(serve.resolve_settings(parse(["--kv-cache-dtype", "fp16"])), tmp_path).kv_cache_dtype == "fp16"
    assert cfg.prefill_dtype == "auto"
    assert serve.engine_config(serve.resolve_settings(parse(["--prefill-dtype", "bfloat16"])), tmp_path).prefill_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parse(["--kv-cache-dtype", "fp8"])


def test_draft_head_from_flag_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("VIA_SD_DRAFT_HEAD", raising=False)
    head = tmp_path / "mine.head.safetensors"
    head.write_bytes(b"x")
    cfg = lambda argv: serve.engine_config(serve.resolve_settings(parse(argv)), tmp_path)  # noqa: E731
    assert cfg([]).spec.head_path is None  # the one shipped for the model
    assert cfg(["--draft-head", str(head)]).spec.head_path == str(head)
    monkeypatch.setenv("VIA_SD_DRAFT_HEAD", str(head))
    assert cfg([]).spec.head_path == str(head)
    with pytest.raises(ValueError, match="--draft-head: no such file"):
        serve.resolve_settings(parse(["--draft-head", str(tmp_path / "missing.safetensors")]))


def test_full_accept_threshold_from_flag_and_environment(tmp_path, monkeypatch):
    from server.engine.config import SpecConfig

    monkeypatch.delenv("VIA_SD_FULL_ACCEPT_THRESHOLD", raising=False)
    cfg = lambda argv: serve.engine_config(serve.resolve_settings(parse(argv)), tmp_path)  # noqa: E731
    assert cfg([]).spec.full_accept_threshold == SpecConfig.full_accept_threshold
    assert cfg(["--backend", "vllm"]).spec.full_accept_threshold == 1.0
    assert cfg(["--full-accept-threshold", "0.25"]).spec.full_accept_threshold == 0.25
    monkeypatch.setenv("VIA_SD_FULL_ACCEPT_THRESHOLD", "0.5")
    assert cfg([]).spec.full_accept_threshold == 0.5
    assert cfg(["--full-accept-threshold", "1"]).spec.full_accept_threshold == 1.0
    with pytest.raises(ValueError, match="--full-accept-threshold must be in"):
        serve.resolve_settings(parse(["--full-accept-threshold", "1.5"]))


def test_prefix_caching_flag_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("VIA_SD_PREFIX_CACHING", raising=False)
    cfg = lambda argv: serve.engine_config(serve.resolve_settings(parse(argv)), tmp_path)  # noqa: E731
    assert cfg([]).enable_prefix_caching and not cfg(["--no-enable-prefix-caching"]).enable_prefix_caching
    monkeypatch.setenv("VIA_SD_PREFIX_CACHING", "0")
    assert not cfg([]).enable_prefix_caching and cfg(["--enable-prefix-caching"]).enable_prefix_caching


def test_device_from_flag_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VIA_SD_DEVICE", "cuda:1")
    assert serve.engine_config(serve.resolve_settings(parse([])), tmp_path).device == "cuda:1"
    assert serve.engine_config(serve.resolve_settings(parse(["--device", "cpu"])), tmp_path).device == "cpu"
    assert serve.served_name(serve.resolve_settings(parse(["--model", str(tmp_path)]))) == tmp_path.name
    assert serve.served_name(serve.resolve_settings(parse(["--served-model-name", "x"]))) == "x"


def test_missing_vllm_backend_is_a_clear_exit(tmp_path, monkeypatch):
    from server.engine.testing import write_tiny_model

    folder = write_tiny_model(tmp_path / "tiny")
    monkeypatch.setitem(sys.modules, "server.vllm_plugin.backend", None)  # as if not installed
    s = serve.resolve_settings(parse(["--model", str(folder), "--backend", "vllm"]))
    with pytest.raises(SystemExit, match="--backend vllm needs vLLM"):
        serve.build_engine(s)
    s = serve.resolve_settings(parse(["--model", str(folder), "--backend", "vllm", "--kv-cache-dtype", "fp16"]))
    with pytest.raises(SystemExit, match="kv-cache-dtype fp16 is the embedded engine's"):
        serve.build_engine(s)
    s = serve.resolve_settings(parse(["--model", str(folder), "--backend", "vllm", "--prefill-dtype", "bfloat16"]))
    with pytest.raises(SystemExit, match="prefill-dtype bfloat16 is the embedded engine's"):
        serve.build_engine(s)
    head = tmp_path / "h.safetensors"
    head.write_bytes(b"x")
    s = serve.resolve_settings(parse(["--model", str(folder), "--backend", "vllm", "--draft-head", str(head)]))
    with pytest.raises(SystemExit, match="--draft-head is for the embedded engine"):
        serve.build_engine(s)
    # the full model's threshold is the plugin's too: it reaches the plugin's settings
    s = serve.resolve_settings(parse(["--model", str(folder), "--backend", "vllm", "--full-accept-threshold", "0.3"]))
    with pytest.raises(SystemExit, match="--backend vllm needs vLLM"):
        serve.build_engine(s)
    monkeypatch.delitem(sys.modules, "server.vllm_plugin.backend")
    from server.vllm_plugin.backend import plugin_settings
    from server.vllm_plugin.settings import PluginSettings

    plugin = PluginSettings.from_dict(plugin_settings(serve.engine_config(s, folder)))
    assert plugin.full_accept_threshold == 0.3 and plugin.lenient_no_repeat == 4
    with pytest.raises(ValueError, match="full_accept_threshold must be in"):
        PluginSettings.from_dict({"full_accept_threshold": 1.5})


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 180.0) -> None:
    """Until `url`/health answers 200; fails with the server's output if it exits first. Generous:
    a box busy with other work starts a server (imports, the kernels' load) slowly."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not become healthy"
        time.sleep(0.05)


def test_sigterm_drains_and_exits_zero():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gateway.serve_fake_main", "--port", str(port), "--shutdown-grace-s", "20",
         "--log-level", "warning"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)

        # a streamed request is surely in flight once its first chunk has arrived
        body = {"prompt": "abc", "max_tokens": 120, "temperature": 0, "stream": True}  # ~2 s of fake steps
        with httpx.Client(timeout=30) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            try:  # new work is refused: 503 on a live connection, or no connection at all
                assert httpx.get(url + "/health", timeout=2).status_code == 503
            except httpx.TransportError:
                pass
            rest = [first] + [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: "):]) for line in rest[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(ch["choices"][0]["text"].encode()) for ch in chunks) == 120  # byte-level fake tokens
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.slow
def test_run_serve_with_embedded_engine_end_to_end(tmp_path):
    pytest.importorskip("server.engine.async_engine")
    from server.engine.testing import write_tiny_model

    folder = write_tiny_model(tmp_path / "tiny")
    port = free_port()
    code = (
        "import argparse, sys; from server.gateway import serve; p = argparse.ArgumentParser(); "
        "serve.add_serve_arguments(p); sys.exit(serve.run_serve(p.parse_args(sys.argv[1:])))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--model", str(folder), "--port", str(port), "--spec-mode", "binary",
         "--max-num-seqs", "2", "--log-level", "warning"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "VIA_SD_API_KEY": "k"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}, timeout=5)
        assert [m["id"] for m in r.json()["data"]] == ["tiny"]
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=30,
                       json={"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
