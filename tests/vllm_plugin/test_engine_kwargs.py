"""What the vLLM backend asks of vLLM: the prefix cache follows `--enable-prefix-caching`, except
where three-tier steps would leave slim-only K/V in blocks vLLM could share."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.engine.config import EngineConfig, SpecConfig
from server.vllm_plugin.backend import engine_kwargs


@pytest.mark.parametrize("on", [True, False])
def test_prefix_caching_follows_the_config(on):
    cfg = EngineConfig(model="m", enable_prefix_caching=on, spec=SpecConfig(mode="off"))
    assert engine_kwargs(cfg, Path("/m"), 4096)["enable_prefix_caching"] is on
    assert EngineConfig().enable_prefix_caching  # on by default, as in vLLM


def test_three_tier_with_skipped_layers_never_shares_blocks():
    pytest.importorskip("vllm")
    cfg = EngineConfig(model="m", enable_prefix_caching=True, spec=SpecConfig(mode="three_tier", drafter="ngram"))
    assert engine_kwargs(cfg, Path("/m"), 4096, schedule="skip")["enable_prefix_caching"] is False
    assert engine_kwargs(cfg, Path("/m"), 4096, schedule="prune")["enable_prefix_caching"] is True


@pytest.mark.parametrize("mode", ["binary", "three_tier"])
def test_speculation_asks_for_synchronous_scheduling(mode):
    # the runner reads each request's output as of the last step; vLLM's async scheduling fills
    # it with placeholders, so the backend says it off rather than leave it to vLLM's default rule
    pytest.importorskip("vllm")
    cfg = EngineConfig(model="m", spec=SpecConfig(mode=mode, drafter="ngram"))
    assert engine_kwargs(cfg, Path("/m"), 4096)["async_scheduling"] is False
    off = EngineConfig(model="m", spec=SpecConfig(mode="off"))
    assert "async_scheduling" not in engine_kwargs(off, Path("/m"), 4096)


class _Sampler:
    def _sample(self, logits, spec_decode_metadata):
        return "vllm's sample"


def _runner(async_scheduling: bool):
    from types import SimpleNamespace

    from server.vllm_plugin.runner import ViaSDRunnerMixin

    class Runner(ViaSDRunnerMixin, _Sampler):
        def _lenient(self, logits, sd, skip):
            self.lenient_calls += 1
            return None

    r = Runner()
    r.vllm_config = SimpleNamespace(additional_config={"via_sd": {"mode": "three_tier"}})
    r.speculative_config = object()
    r.use_async_scheduling = async_scheduling
    r.lenient_calls = 0
    r._count_full_step = lambda *a, **k: None
    r._via_sd_init()
    return r


def test_async_scheduling_turns_the_runner_off():
    # under async scheduling the repetition guard and the gate would read placeholders: the
    # runner steps aside (vLLM's own sampler decides), in sync mode the rule is consulted
    r = _runner(True)
    assert r._vs_disabled == "async scheduling"
    assert r._sample("logits", object()) == "vllm's sample" and r.lenient_calls == 0
    r = _runner(False)
    assert r._vs_disabled is None
    assert r._sample("logits", object()) == "vllm's sample" and r.lenient_calls == 1
