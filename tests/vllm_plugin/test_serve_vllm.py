"""`via-sd serve --backend vllm` as an operator runs it: the console script of the vLLM
environment, on a free loopback port, answers /health and one completion, and exits 0 on SIGTERM.
Every wait is bounded; the server's process group is killed if it outlives the test.

Skipped, with the reason, where vllm is not importable (the main venv).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vLLM environment (.venv-vllm, `make vllm-env`)")

from tests.gateway.conftest import free_port  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.real_model]

START_TIMEOUT_S = 420


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_serve_backend_vllm_answers_a_request(tmp_path):
    from server.engine.model_files import prepare_model

    folder = os.environ.get("VIA_SD_TEST_MODEL") or str(prepare_model(progress=False))
    script = Path(sys.executable).with_name("via-sd")
    assert script.exists(), f"{script} missing: the vLLM venv has no via-sd console script"
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(script), "serve", "--backend", "vllm", "--model", folder, "--host", "127.0.0.1",
             "--port", str(port), "--max-model-len", "512", "--kv-cache-memory-gb", "1", "--max-num-seqs", "2",
             "--shutdown-grace-s", "5"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"via-sd serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not healthy in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
            try:
                if _get(base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1.0)

        body = {"model": Path(folder).name, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
            res = json.loads(r.read())
        assert res["object"] == "text_completion" and res["choices"][0]["text"]
        assert res["usage"]["completion_tokens"] > 0 and "via_sd" in res["usage"]
        status, metrics = _get(base + "/metrics")
        assert status == 200 and b"via_sd_tier_decisions_total" in metrics

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
