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
