"""Aggregation of per-prompt results into runs, and the table, Markdown and plot rendering."""

import pytest

from server.bench import report as R
from server.bench.sweep import pareto
from server.bench.prompts import BenchPrompt
from server.bench.rows import Row

PROMPTS = [BenchPrompt(1, "translation", "t", ("a b c",)), BenchPrompt(2, "qa", "q")]


def _out(qid, toks, seconds, **kw):
    base = {"question_id": qid, "token_ids": toks, "seconds": seconds, "ttft": 0.1, "steps": len(toks),
            "full_passes": len(toks), "slim_passes": 0, "draft_tokens": 0, "accepted": 0,
            "tier_accept": 0, "tier_slim": 0, "tier_full": 0, "slim_on": 0, "slim_off": 0}
    return {**base, **kw}


def _runs():
    off = {"outputs": [_out(1, [1, 2, 3, 4], 1.0), _out(2, [5, 6], 1.0)]}
    tt = {"outputs": [_out(1, [1, 2, 3, 4], 0.5, steps=2, full_passes=1, slim_passes=2, draft_tokens=6, accepted=2,
                           tier_accept=2, tier_slim=1, tier_full=1, slim_on=2, lenient=1),
                      _out(2, [5, 7], 0.5, steps=1, full_passes=1, draft_tokens=0, lenient=0)]}
    texts = {1: "a b c", 2: "x"}
    off_ids = {1: [1, 2, 3, 4], 2: [5, 6]}
    runs = [R.build_run(Row("off", "engine", mode="off"), off, PROMPTS, texts, off_ids),
            R.build_run(Row("three_tier", "engine", mode="three_tier", drafter="ngram"), tt, PROMPTS, texts, off_ids)]
    R.add_speedups(runs)
    return runs


def test_run_metrics_follow_their_definitions():
    off, tt = _runs()
    assert off["tokens"] == 6 and off["tokens_per_s"] == pytest.approx(3.0)
    assert off["mean_accepted_tokens"] == 1.0 and off["full_passes_per_token"] == 1.0 and off["tier_rates"] is None
    assert tt["speedup_vs_off"] == pytest.approx(2.0)
    assert tt["mean_accepted_tokens"] == pytest.approx(6 / 3)
    assert tt["full_passes_per_token"] == pytest.approx(2 / 6)
    assert tt["tier_rates"] == pytest.approx({"accept": 0.5, "slim": 0.25, "full": 0.25})
    assert tt["acceptance_rate"] == pytest.approx(2 / 6)
    assert tt["lenient_share"] == pytest.approx(1 / 6) and off["lenient_share"] is None  # off drafts nothing
    assert tt["quality"]["match_off"] == 0.5
    assert set(tt["per_category"]) == {"translation", "qa"}
    assert tt["per_category"]["translation"]["speedup_vs_off"] == pytest.approx(2.0)
    assert tt["per_category"]["qa"]["quality"]["prefix_agreement"] == pytest.approx(0.5)


def test_contract_keys_present():
    for run in _runs():
        for k in ("name", "tokens", "seconds", "tokens_per_s", "speedup_vs_off", "mean_accepted_tokens",
                  "tier_rates", "full_passes_per_token", "quality", "per_category"):
            assert k in run


def test_peers_that_draft_are_decided_by_the_full_model():
    res = {"outputs": [_out(1, [1, 2, 3], 1.0, steps=2, full_passes=2, draft_tokens=None, accepted=1, tier_full=None)]}
    run = R.build_run(Row("hf_pld", "hf", prompt_lookup_num_tokens=10), res, PROMPTS[:1], {1: "a"}, None)
    assert run["tier_rates"] == {"accept": 0.0, "slim": 0.0, "full": 1.0}
    assert run["speedup_vs_off"] is None and "match_off" not in run["quality"]
    assert run["mean_accepted_tokens"] == pytest.approx(1.5)


def test_render_table_and_markdown():
    runs = _runs()
    table = R.render_table(runs)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "tok/s", "speedup"]
    assert lines[2].startswith("off") and "2.00x" in lines[3]
    assert "0.50/0.25/0.25" in lines[3]
    report = {"runs": runs, "machine": {"cpu": "cpu", "cores": 2, "threads": 2, "memory_gb": 8.0},
              "model": "/m", "date": "2026-01-01T00:00:00+00:00", "command": "via-sd bench --prompts q.jsonl",
              "settings": {"prompts": 2, "max_tokens": 4, "temperature": 0.0},
              "skipped": [{"name": "vllm", "reason": "no env"}]}
    md = R.render_markdown(report, ["x_speedup.png"])
    assert "`via-sd bench --prompts q.jsonl`" in md
    assert "| three_tier | 2.0" in md.replace("  ", " ") or "| three_tier |" in md
    assert "| run | translation | qa |" in md
    assert "- `vllm`: no env" in md and "![x_speedup.png](x_speedup.png)" in md
    assert "- commit: not recorded" in md  # a report written before the commit was recorded
    report["git"] = {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": True}
    assert "- commit: `0123456789ab` (with local changes)\n" in R.render_markdown(report)
    assert R.describe_git({"commit": "f" * 40, "dirty": False}) == "- commit: `ffffffffffff`"
    assert "- environment" not in R.render_markdown({**report, "environment": {}})
    md = R.render_markdown({**report, "environment": {"VIA_SD_HEAD_WEIGHTS": "fp16", "VIA_SD_ONEDNN": "0"}})
    assert "(with local changes)\n- environment: `VIA_SD_HEAD_WEIGHTS=fp16` `VIA_SD_ONEDNN=0`\n" in md


def _timed(seconds: dict[int, float], tokens: int = 10) -> list[dict]:
    return [_out(q, list(range(tokens)), s) for q, s in seconds.items()]


def test_a_ratio_interval_is_paired_over_the_prompts():
    # every prompt twice as fast: whatever prompts a resample draws, the ratio is 2
    off = _timed({i: 1.0 + i for i in range(20)})
    fast = _timed({i: (1.0 + i) / 2 for i in range(20)})
    point, lo, hi = R.ratio_interval(fast, off)
    assert point == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    # half the prompts 1.5x, half 1.0x: the interval holds the point, excludes neither end's
    # extreme, and is the same on a second call (fixed seed)
    mixed = _timed({i: (1.0 + i) / (1.5 if i % 2 else 1.0) for i in range(20)})
    point, lo, hi = R.ratio_interval(mixed, off)
    assert 1.0 < lo < point < hi < 1.5
    assert R.ratio_interval(mixed, off) == (point, lo, hi)
    assert R.ratio_interval(mixed, off, seed=1) != (point, lo, hi)
    # only the prompts both ran count
    assert R.ratio_interval(fast[:5], off)[0] == pytest.approx(2.0)
    assert R.ratio_interval(fast, _timed({99: 1.0})) is None


def test_intervals_against_off_and_three_tier_against_binary():
    off = _timed({i: 1.0 for i in range(10)})
    outputs = {"off": off, "binary": _timed({i: 0.5 for i in range(10)}),
               "three_tier": _timed({i: 0.4 for i in range(10)}),
               "three_tier_hybrid": _timed({i: 0.5 for i in range(10)}),  # no binary_hybrid row
               "three_tier[f=0.2]": _timed({i: 0.25 for i in range(10)})}
    prompts = [BenchPrompt(i, "qa", "q") for i in range(10)]
    texts = {i: "x" for i in range(10)}
    rows = [Row("off", "engine", mode="off"), Row("binary", "engine", mode="binary", drafter="ngram"),
            Row("three_tier", "engine", mode="three_tier", drafter="ngram"),
            Row("three_tier_hybrid", "engine", mode="three_tier", drafter="hybrid"),
            Row("three_tier[f=0.2]", "engine", mode="three_tier", drafter="ngram")]
    runs = [R.build_run(row, {"outputs": outputs[row.name]}, prompts, texts, None) for row in rows]
    R.add_speedups(runs)
    pairs = R.add_intervals(runs, outputs)
    by = {r["name"]: r for r in runs}
    assert by["binary"]["speedup_interval"] == pytest.approx([2.0, 2.0])
    assert by["three_tier"]["speedup_interval"] == pytest.approx([2.5, 2.5])
    assert pairs == [{"three_tier": "three_tier", "binary": "binary", "ratio": pytest.approx(1.25),
                      "interval": pytest.approx([1.25, 1.25])}]
    lines = R.render_intervals(runs, pairs)
    assert "three_tier / binary: 1.250x [1.250, 1.250]" in lines
    report = {"runs": runs, "three_tier_vs_binary": pairs, "machine": {}, "model": "/m", "date": "d", "command": "c",
              "settings": {"prompts": 10, "max_tokens": 10, "temperature": 0.0}}
    assert R.render_intervals(runs, pairs)[0] == "binary: 2.000x off [2.000, 2.000]"
    md = R.render_markdown(report)
    assert "## Speed-ups with their 95% intervals" in md and "| three_tier / binary | 1.250x | 1.250 - 1.250 |" in md
    # without `off`, no interval against it
    runs2 = [{"name": "binary", "mode": "binary"}]
    assert R.add_intervals(runs2, {"binary": outputs["binary"]}) == [] and runs2[0]["speedup_interval"] is None
    bare = [{**r, "speedup_interval": None} for r in runs]
    assert "95% intervals" not in R.render_markdown({**report, "runs": bare, "three_tier_vs_binary": []})


def test_reports_record_the_via_sd_switches_set(monkeypatch):
    from server.bench import cli

    for k in [k for k in __import__("os").environ if k.startswith("VIA_SD_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("VIA_SD_ONEDNN", "0")
    monkeypatch.setenv("VIA_SD_HEAD_WEIGHTS", "fp16")
    monkeypatch.setenv("OTHER_SETTING", "1")
    assert cli.via_sd_environment() == {"VIA_SD_HEAD_WEIGHTS": "fp16", "VIA_SD_ONEDNN": "0"}


def test_machine_line_names_the_cpu_generation_and_its_vector_extensions():
    from server.bench import cli

    m = cli.machine_info(2)
    assert set(m["isa"]) <= set(cli.ISA_FLAGS)
    line = R.describe_cpu({"cpu": "AMD EPYC", "cpu_generation": "family 26 model 2", "isa": ["avx2", "avx512_bf16"]})
    assert line == "AMD EPYC (family 26 model 2; avx2 avx512_bf16)"
    assert R.describe_cpu({"cpu": "AMD EPYC"}) == "AMD EPYC"  # reports written before these were recorded
    assert R.describe_cpu({"cpu": "x", "isa": []}) == "x"


def test_pareto_marks_undominated_points():
    pts = [{"tokens_per_s": 10, "quality": {"q": 0.9}}, {"tokens_per_s": 12, "quality": {"q": 0.8}},
           {"tokens_per_s": 9, "quality": {"q": 0.85}}]
    pareto(pts, "q")
    assert [p["pareto"] for p in pts] == [True, True, False]


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from server.bench.plots import write_plots

    runs = _runs()
    report = {"runs": runs, "machine": {"cpu": "cpu", "threads": 2}, "model": "/m", "date": "2026-01-01",
              "sweep": {"quality_key": "match_off", "points": [dict(runs[1], pareto=True)]}}
    made = write_plots(report, tmp_path / "r")
    assert sorted(p.name for p in made) == ["r_speedup.png", "r_sweep.png", "r_tiers.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in made)


def test_merge_fastest_keeps_each_prompts_fastest_repeat():
    from server.bench.cli import merge_fastest

    a = {"outputs": [_out(1, [1], 2.0), _out(2, [2], 1.0)], "load_seconds": 1.0}
    b = {"outputs": [_out(1, [1], 1.5), _out(2, [2], 3.0)]}
    m = merge_fastest(a, b)
    assert [o["seconds"] for o in m["outputs"]] == [1.5, 1.0] and m["repeats"] == 2
