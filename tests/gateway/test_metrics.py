"""/metrics: the names of DESIGN.md section 4, parseable, and counters that add up."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import client_for
from tests.gateway.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

COUNTERS = [
    "via_sd_tier_decisions", "via_sd_draft_tokens", "via_sd_lenient_accepted_tokens", "via_sd_verifier_passes", "via_sd_generation_tokens",
    "via_sd_prompt_tokens", "via_sd_controller_slim_steps", "via_sd_preemptions",
    "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens",
]
GAUGES = ["via_sd_requests_running", "via_sd_requests_waiting", "via_sd_kv_cache_usage_ratio"]
HISTOGRAMS = [
    "via_sd_time_to_first_token_seconds", "via_sd_time_per_output_token_seconds", "via_sd_e2e_request_latency_seconds",
]


def scrape(text: str) -> tuple[dict, dict]:
    """(families by name, samples by (name, frozen labels))."""
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    return fams, samples


async def run_some_requests(c) -> list[dict]:
    usages = []
    chat = {"messages": [{"role": "user", "content": "count"}], "temperature": 0}
    for i, mode in enumerate(["three_tier", "binary", "off", "three_tier", None]):
        body = {**chat, "max_tokens": 10 + 7 * i}
        if mode:
            body["via_sd"] = {"mode": mode}
        r = await c.post("/v1/chat/completions", json=body)
        usages.append(r.json()["usage"])
    r = await c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 33, "n": 2, "temperature": 0.5})
    usages.append(r.json()["usage"])
    return usages


async def test_metrics_names_types_and_sums():
    engine = FakeEngine()
    async with client_for(engine) as c:
        usages = await run_some_requests(c)
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams, samples = scrape(r.text)
    for name in COUNTERS:
        assert fams[name].type == "counter", name
        assert any(s.name == name + "_total" for s in fams[name].samples)
    for name in GAUGES:
        assert fams[name].type == "gauge", name
    for name in HISTOGRAMS:
        assert fams[name].type == "histogram", name

    def v(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    tiers = {t: v("via_sd_tier_decisions_total", tier=t) for t in ("accept", "slim", "full")}
    draft = v("via_sd_draft_tokens_total")
    accepted = v("vllm:spec_decode_num_accepted_tokens_total")
    assert sum(tiers.values()) > 0
    # every decided position is counted by exactly one tier; tier B ends a block early
    assert sum(tiers.values()) <= draft
    assert tiers["accept"] <= accepted <= tiers["accept"] + tiers["full"]
    # vLLM's names carry our values
    assert v("vllm:spec_decode_num_draft_tokens_total") == draft
    s = engine.stats()
    assert accepted == s.accepted_tokens and v("vllm:spec_decode_num_drafts_total") == s.num_drafts
    assert (tiers["accept"], tiers["slim"], tiers["full"]) == (s.tier_accept, s.tier_slim, s.tier_full)
    # per-request usage adds up to the engine's counters
    assert sum(u["completion_tokens"] for u in usages) == v("via_sd_generation_tokens_total")
    assert sum(u["via_sd"]["draft_tokens"] for u in usages) == draft
    assert sum(u["via_sd"]["accepted"] for u in usages) == accepted
    assert sum(u["via_sd"]["full_passes"] for u in usages) == v("via_sd_verifier_passes_total", verifier="full")
    assert sum(u["via_sd"]["slim_passes"] for u in usages) == v("via_sd_verifier_passes_total", verifier="slim")
    # the n = 2 completion counts its prompt twice in the engine, once in usage (as OpenAI does)
    assert v("via_sd_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages) + 3
    # one latency observation per engine request (7 of them)
    assert v("via_sd_e2e_request_latency_seconds_count") == 7
    assert v("via_sd_time_to_first_token_seconds_count") == 7
    assert v("via_sd_kv_cache_usage_ratio") == 0 and v("via_sd_requests_running") == 0


async def test_two_apps_in_one_process_do_not_clash():
    e1, e2 = FakeEngine(), FakeEngine()
    async with client_for(e1) as c1, client_for(e2) as c2:
        await c1.post("/v1/completions", json={"prompt": "a", "max_tokens": 4})
        _, s1 = scrape((await c1.get("/metrics")).text)
        _, s2 = scrape((await c2.get("/metrics")).text)
    assert s1[("via_sd_generation_tokens_total", ())] == 4
    assert s2[("via_sd_generation_tokens_total", ())] == 0


async def test_metrics_needs_the_api_key_unless_public_and_health_is_open():
    async with client_for(FakeEngine(), api_key="k") as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers={"Authorization": "Bearer k"})).status_code == 200
        assert (await c.get("/health")).status_code == 200
    async with client_for(FakeEngine(), api_key="k", metrics_public=True) as c:
        assert (await c.get("/metrics")).status_code == 200
