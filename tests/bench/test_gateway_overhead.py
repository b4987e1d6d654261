"""The gateway-overhead benchmark: a live server over the fake engine, loaded on loopback."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gateway_overhead  # noqa: E402


@pytest.mark.slow
def test_counts_every_streamed_chunk_and_skips_what_is_not_installed(tmp_path):
    out = tmp_path / "g.json"
    rc = gateway_overhead.main(["--loops", "asyncio,no_such_loop", "--requests", "6", "--concurrency", "3",
                                "--max-tokens", "5", "--repeats", "1", "--out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    (row,) = rep["rows"]
    assert (row["loop"], row["http"]) == ("asyncio", "h11")
    assert row["chunks"] == 6 * 5  # one content chunk a token: the fake engine emits one token a step in `off`
    assert row["server_cpu_s"] >= 0 and row["server_cpu_us_per_chunk"] == pytest.approx(
        row["server_cpu_s"] / 30 * 1e6, abs=0.1)
    assert rep["skipped"] == [{"loop": "no_such_loop", "http": "h11", "missing": ["no_such_loop"]}]
