"""Prometheus metrics of the gateway (DESIGN.md section 4).

Counters and gauges are read from `engine.stats()` at scrape time by a custom collector, so the
embedded engine and the vLLM backend expose the same series without the gateway counting twice.
Histograms are observed by the gateway, once per finished request.

Counters (the exposition appends `_total`):
    via_sd_tier_decisions_total{tier="accept|slim|full"}  draft positions decided by each tier
    via_sd_draft_tokens_total                           draft tokens proposed
    via_sd_verifier_passes_total{verifier="slim|full"}  verifier passes, per sequence (a plain decode
                                                        step, `off` requests' included, is a full pass)
    via_sd_generation_tokens_total, via_sd_prompt_tokens_total
    via_sd_controller_slim_steps_total{state="on|off"}  speculative steps with / without the slim tier
    via_sd_preemptions_total
    via_sd_prefix_cache_queries_total, via_sd_prefix_cache_hits_total  prompt tokens looked up / found
    vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total       (vLLM's names, same values)
    vllm:spec_decode_num_drafts_total, vllm:spec_decode_num_draft_tokens_total,
    vllm:spec_decode_num_accepted_tokens_total          vLLM's names, same values as ours
Gauges: via_sd_requests_running, via_sd_requests_waiting, via_sd_kv_cache_usage_ratio (0..1).
Histograms: via_sd_time_to_first_token_seconds, via_sd_time_per_output_token_seconds,
    via_sd_e2e_request_latency_seconds.

Rates (PromQL, over any window such as 1m):
    acceptance rate      = rate(vllm:spec_decode_num_accepted_tokens_total[1m])
                           / rate(vllm:spec_decode_num_draft_tokens_total[1m])
    mean acceptance len  = 1 + rate(vllm:spec_decode_num_accepted_tokens_total[1m])
                               / rate(vllm:spec_decode_num_drafts_total[1m])
    tier share of x      = rate(via_sd_tier_decisions_total{tier="x"}[1m])
                           / ignoring(tier) group_left sum(rate(via_sd_tier_decisions_total[1m]))
    full passes / token  = rate(via_sd_verifier_passes_total{verifier="full"}[1m])
                           / rate(via_sd_generation_tokens_total[1m])
    slim tier duty       = rate(via_sd_controller_slim_steps_total{state="on"}[1m])
                           / sum(rate(via_sd_controller_slim_steps_total[1m]))
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.api import EngineStats

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class EngineStatsCollector(Collector):
    """Turns one `EngineStats` snapshot into counter and gauge families at each scrape."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def collect(self):
        s = self._stats()

        def counter(name: str, doc: str, value: float | None = None, label: str | None = None, values=None):
            fam = CounterMetricFamily(name, doc, labels=[label] if label else None)
            if label:
                for lv, v in values:
                    fam.add_metric([lv], v)
            else:
                fam.add_metric([], value)
            return fam

        yield counter(
            "via_sd_tier_decisions", "Draft positions decided by each tier.",
            label="tier", values=[("accept", s.tier_accept), ("slim", s.tier_slim), ("full", s.tier_full)],
        )
        yield counter("via_sd_draft_tokens", "Draft tokens proposed.", s.draft_tokens)
        yield counter("via_sd_lenient_accepted_tokens",
                      "Accepted draft tokens the full model kept by full_accept_threshold though not its argmax.",
                      s.lenient_accepted)
        yield counter(
            "via_sd_verifier_passes", "Verifier passes, counted per sequence.",
            label="verifier", values=[("slim", s.slim_passes), ("full", s.full_passes)],
        )
        yield counter("via_sd_generation_tokens", "Generated tokens.", s.generation_tokens)
        yield counter("via_sd_prompt_tokens", "Prefilled prompt tokens.", s.prompt_tokens)
        yield counter(
            "via_sd_controller_slim_steps", "Speculative steps with the slim tier on or bypassed by the controller.",
            label="state", values=[("on", s.controller_slim_on), ("off", s.controller_slim_off)],
        )
        yield counter("via_sd_preemptions", "Sequences preempted for lack of KV blocks.", s.preemptions)
        yield counter("via_sd_prefix_cache_queries", "Tokens of admitted requests looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("via_sd_prefix_cache_hits", "Tokens found in the prefix cache (K/V not computed again).",
                      s.prefix_cache_hits)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", s.prefix_cache_hits)
        yield counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", s.num_drafts)
        yield counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", s.draft_tokens)
        yield counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", s.accepted_tokens)

        for name, doc, value in (
            ("via_sd_requests_running", "Requests in the running batch.", s.requests_running),
            ("via_sd_requests_waiting", "Requests waiting to be scheduled.", s.requests_waiting),
            ("via_sd_kv_cache_usage_ratio", "Used KV cache blocks / usable blocks (0..1).", s.kv_cache_usage),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g

    def describe(self):
        return []  # families are only known at scrape time; skip the registration-time collect


class GatewayMetrics:
    """One per app, in its own registry, so several apps in one process do not clash."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineStatsCollector(stats))
        self.ttft = Histogram(
            "via_sd_time_to_first_token_seconds", "Time from request arrival to its first token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.tpot = Histogram(
            "via_sd_time_per_output_token_seconds", "Mean time per output token after the first, per request.",
            buckets=_TPOT_BUCKETS, registry=self.registry,
        )
        self.e2e = Histogram(
            "via_sd_e2e_request_latency_seconds", "Time from request arrival to its last token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )

    def observe_request(self, ttft_s: float | None, e2e_s: float, completion_tokens: int) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if completion_tokens > 1:
                self.tpot.observe(max(0.0, e2e_s - ttft_s) / (completion_tokens - 1))
        self.e2e.observe(e2e_s)
