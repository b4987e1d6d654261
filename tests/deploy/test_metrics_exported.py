"""Every metric the Grafana dashboard and the autoscaler's adapter rule query is one that a real
`via-sd serve` exports: the server runs in a subprocess on a tiny random model, answers one
completion, and its /metrics is scraped. The PromQL itself is parsed by `promtool` where the
Debian package `prometheus` is installed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import adapter_rules, dashboard_exprs, label_matchers, metric_names

START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def via_sd_command() -> list[str]:
    script = Path(sys.executable).parent / "via-sd"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> dict[str, set[frozenset]]:
    """sample name -> the label sets it was exported with, after one completion."""
    from server.engine.testing import write_tiny_model

    model = write_tiny_model(tmp_path_factory.mktemp("deploy") / "m", num_layers=4)
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", VIA_SD_CACHE=str(tmp_path_factory.mktemp("cache")))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            via_sd_command() + ["serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                                "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"via-sd serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"/health not 200 within {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "hello hello hello", "max_tokens": 8},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] > 0
        text = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    samples: dict[str, set[frozenset]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, set()).add(frozenset(s.labels.items()))
    return samples


def test_dashboard_metrics_are_exported(scraped):
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no via-sd metric in {expr!r}"
        missing = names - set(scraped)
        assert not missing, f"{sorted(missing)} in {expr!r} are not exported"


def test_dashboard_label_values_are_exported(scraped):
    for expr in dashboard_exprs():
        for metric, label, value in label_matchers(expr):
            assert any((label, value) in labels for labels in scraped[metric]), (
                f'{metric}{{{label}="{value}"}} in {expr!r} is not exported')


def test_dashboard_covers_the_issue():
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert {
        "via_sd_tier_decisions_total", "vllm:spec_decode_num_accepted_tokens_total", "vllm:spec_decode_num_drafts_total",
        "via_sd_verifier_passes_total", "via_sd_generation_tokens_total",
        "via_sd_time_to_first_token_seconds_bucket", "via_sd_time_per_output_token_seconds_bucket",
        "via_sd_requests_running", "via_sd_requests_waiting", "via_sd_kv_cache_usage_ratio",
    } <= used


def test_autoscaler_metric_is_exported(scraped):
    for rule in adapter_rules():
        for name in metric_names(rule["seriesQuery"]):
            assert name in scraped, f"adapter rule queries {name}, which is not exported"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (Debian package prometheus)")
def test_promtool_parses_every_query(tmp_path):
    """Each dashboard query, with Grafana's variables filled in, as a recording rule: `promtool
    check rules` parses the PromQL."""
    import yaml

    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        expr = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
        if expr.startswith("label_values("):  # a Grafana function, not PromQL
            continue
        rules.append({"record": f"via_sd:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
