"""Load on a real server (uvicorn on loopback, tiny model, embedded engine): 64 concurrent
streaming clients over a mix of modes, sampling and prompt lengths; every stream is correct and
the engine returns to idle. A full waiting queue answers 429 with Retry-After at once."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.reliability.conftest import MODEL, embedded_server, wait_idle
from tests.reliability.load_run import make_specs, run_load

pytestmark = pytest.mark.slow


def test_64_concurrent_streams_all_correct_and_engine_idle_after(tiny_model):
    with embedded_server(tiny_model, max_num_seqs=32, max_waiting=256) as (url, engine):
        specs = make_specs(128, seed=1, max_tokens=(2, 8), long_words=60)
        report = asyncio.run(asyncio.wait_for(run_load(url, specs, clients=64, model=MODEL), 420))
        print(report.summary())
        assert report.statuses == {200: len(specs)}, report.problems[:5]
        assert not report.problems, report.problems[:5]
        assert {s.mode for s in specs} == {"off", "binary", "three_tier"}
        s = wait_idle(engine)
        assert s.requests_running == s.requests_waiting == 0 and s.kv_cache_usage == 0
        # the gauges the gateway exports agree
        metrics = httpx.get(url + "/metrics", timeout=30).text
        for gauge in ("via_sd_requests_running", "via_sd_requests_waiting", "via_sd_kv_cache_usage_ratio"):
            assert f"{gauge} 0.0" in metrics, gauge


def test_full_waiting_queue_answers_429_with_retry_after_quickly(tiny_model):
    with embedded_server(tiny_model, max_num_seqs=2, max_waiting=4) as (url, engine):
        engine.fault_hook = lambda _engine: time.sleep(0.02)  # keep the batch busy while the burst lands
        try:
            # 24 at once: 2 run, 4 wait, the rest must be refused without waiting for a slot
            specs = make_specs(24, seed=2, max_tokens=(30, 30))
            report = asyncio.run(asyncio.wait_for(run_load(url, specs, clients=24, model=MODEL), 300))
        finally:
            engine.fault_hook = None
        print(report.summary())
        assert set(report.statuses) <= {200, 429}, report.statuses
        refused = [o for o in report.outcomes if o.status == 429]
        assert len(refused) >= 24 - 2 - 4 - 6, report.statuses  # a few may slip in as slots free up
        for o in refused:
            assert o.retry_after is not None and int(o.retry_after) >= 1
            assert o.latency_s < 10, o.latency_s
            assert '"rate_limit_exceeded"' in o.problem
        # refused well before the admitted ones finished: no hang in the queue
        slowest_refusal = max(o.latency_s for o in refused)
        admitted = [o for o in report.outcomes if o.status == 200]
        assert admitted and all(o.ok for o in admitted), report.problems[:5]
        assert slowest_refusal < max(o.latency_s for o in admitted), (slowest_refusal, report.summary())
        wait_idle(engine)
