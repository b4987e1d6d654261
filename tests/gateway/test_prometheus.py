"""A real Prometheus server scrapes the gateway and answers PromQL on its metrics.

Needs the `prometheus` binary (Debian package `prometheus`; `tests/gateway/ensure_prometheus.sh`
installs it). Skipped, with that reason, when it is not there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest

from server.gateway.app import create_app
from tests.gateway.conftest import free_port, running_server
from tests.gateway.fake_engine import FakeEngine

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, ValueError, KeyError) as e:
            last = e
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary; run tests/gateway/ensure_prometheus.sh")
def test_prometheus_scrapes_and_answers_promql(tmp_path):
    engine = FakeEngine()
    app = create_app(engine, api_key="secret", served_model_names=["fake"])
    with running_server(app) as url:
        for i in range(4):
            r = httpx.post(
                url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 20, "temperature": 0},
                headers={"Authorization": "Bearer secret"},
            )
            assert r.status_code == 200
        s = engine.stats()
        target = url.removeprefix("http://")
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: via-sd\n    metrics_path: /metrics\n"
            "    authorization:\n      type: Bearer\n      credentials: secret\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        try:
            api = f"http://127.0.0.1:{prom_port}/api/v1/query"

            def query(q: str):
                data = httpx.get(api, params={"query": q}, timeout=5).json()
                assert data["status"] == "success", data
                return data["data"]["result"]

            result = wait_for(lambda: query("via_sd_tier_decisions_total"), 40, "a scrape of via_sd_tier_decisions_total")
            by_tier = {r["metric"]["tier"]: float(r["value"][1]) for r in result}
            assert by_tier == {"accept": s.tier_accept, "slim": s.tier_slim, "full": s.tier_full}
            assert all(r["metric"]["job"] == "via-sd" for r in result)
            total = query("sum(via_sd_tier_decisions_total)")
            assert float(total[0]["value"][1]) == s.tier_accept + s.tier_slim + s.tier_full
            accepted = query("vllm:spec_decode_num_accepted_tokens_total")
            assert float(accepted[0]["value"][1]) == s.accepted_tokens
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
