"""`via-sd bench` end to end on the tiny random model: the JSON contract of DESIGN.md section 4.

One module-scoped run (four rows: three engine rows interleaved in one worker process, a peer in its own; 3 prompts x 6 tokens); the tests
read its files. No timing is asserted, only shapes and the invariants that hold on any machine.
"""

import json

import pytest

from server.bench import cli
from server.bench.rows import Row
from server.bench.runner import Skipped, run_row, worker_command

QUESTIONS = [
    {"question_id": 161, "category": "translation", "turns": ["Translate German to English: Guten Tag"],
     "reference": ["Good day"]},
    {"question_id": 241, "category": "summarization", "turns": ["Summarize: the cat sat on the mat. The cat sat."],
     "reference": ["the cat sat on the mat"]},
    {"question_id": 401, "category": "math_reasoning", "turns": ["What is 2+3?"], "reference": ["2+3=5\n#### 5"]},
]


@pytest.fixture(scope="module")
def bench_run(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    q = d / "question.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in QUESTIONS))
    out = d / "results" / "r.json"
    argv = ["--prompts", str(q), "--model", str(tiny_model_dir), "--max-tokens", "6", "--modes", "off,binary,three_tier",
            "--peers", "hf_pld", "--threads", "1", "--no-progress", "--out", str(out)]
    rc = cli.main(argv)
    return rc, out


def test_exit_code_and_files(bench_run):
    rc, out = bench_run
    assert rc == 0
    assert out.is_file() and out.with_suffix(".md").is_file() and out.with_suffix(".outputs.jsonl").is_file()


def test_json_contract(bench_run):
    _, out = bench_run
    rep = json.loads(out.read_text())
    for k in ("machine", "model", "command", "date", "runs"):
        assert k in rep
    assert "others_running_start" in rep["machine"]  # the tasks beside the run when it started
    assert rep["command"].startswith("via-sd bench --prompts")
    # no --drafters: the engine's default drafter (hybrid; on a model without a head, lookup alone)
    assert [r["name"] for r in rep["runs"]] == ["off", "binary_hybrid", "three_tier_hybrid", "hf_pld"]
    for r in rep["runs"]:
        for k in ("name", "tokens", "seconds", "tokens_per_s", "speedup_vs_off", "mean_accepted_tokens",
                  "tier_rates", "full_passes_per_token", "quality", "per_category"):
            assert k in r, (r["name"], k)
        assert 0 < r["tokens"] <= 3 * 6
        assert set(r["per_category"]) == {"translation", "summarization", "math_reasoning"}
        assert {"match_off", "rouge_l", "math_accuracy"} <= set(r["quality"])
        if r["tier_rates"] is not None:
            assert set(r["tier_rates"]) == {"accept", "slim", "full"}
    runs = {r["name"]: r for r in rep["runs"]}
    assert runs["off"]["speedup_vs_off"] == pytest.approx(1.0)
    assert runs["off"]["tier_rates"] is None and runs["off"]["mean_accepted_tokens"] == 1.0
    # lossless modes reproduce off exactly in fp32 greedy
    assert runs["binary_hybrid"]["quality"]["match_off"] == 1.0
    assert runs["binary_hybrid"]["tier_rates"]["accept"] == 0.0 and runs["binary_hybrid"]["tier_rates"]["slim"] == 0.0
    t = runs["three_tier_hybrid"]["tier_rates"]
    assert sum(t.values()) == pytest.approx(1.0) or sum(t.values()) == 0.0
    assert "math_accuracy" in runs["off"]["per_category"]["math_reasoning"]["quality"]
    # each speed-up's interval holds it; three_tier is paired with binary of its drafter
    for r in rep["runs"]:
        lo, hi = r["speedup_interval"]
        assert lo <= r["speedup_vs_off"] * (1 + 1e-9) and r["speedup_vs_off"] <= hi * (1 + 1e-9)
    (pair,) = rep["three_tier_vs_binary"]
    assert pair["three_tier"] == "three_tier_hybrid" and pair["binary"] == "binary_hybrid"
    assert pair["ratio"] == pytest.approx(runs["three_tier_hybrid"]["tokens_per_s"] / runs["binary_hybrid"]["tokens_per_s"])


def test_outputs_file_has_every_run_and_prompt(bench_run):
    _, out = bench_run
    lines = [json.loads(x) for x in out.with_suffix(".outputs.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * 3
    assert {x["run"] for x in lines} == {"off", "binary_hybrid", "three_tier_hybrid", "hf_pld"}
    assert all(isinstance(x["text"], str) and x["token_ids"] for x in lines)


def test_markdown_names_command_and_runs(bench_run):
    _, out = bench_run
    md = out.with_suffix(".md").read_text()
    assert "via-sd bench --prompts" in md and "| three_tier_hybrid |" in md
    assert "the engine's rows interleaved prompt by prompt" in md


def test_vllm_rows_skip_without_the_environment(tmp_path):
    row = Row("vllm", "vllm")
    why = worker_command(row, tmp_path / "j", tmp_path / "r", None)
    assert isinstance(why, str) and "vLLM environment" in why
    res = run_row(row, {"prompts": []}, vllm_python=None)
    assert isinstance(res, Skipped) and res.name == "vllm"


@pytest.mark.parametrize("argv,msg", [
    ([], "--prompts is required"),
    (["--prompts", "/nonexistent.jsonl"], "does not exist"),
    (["--prompts", "PROMPTS", "--modes", "off,turbo"], "unknown turbo"),
    (["--prompts", "PROMPTS", "--categories", "poetry"], "unknown categories poetry"),
    (["--prompts", "PROMPTS", "--max-tokens", "0"], "--max-tokens"),
    (["--prompts", "PROMPTS", "--repeats", "2", "--peer-repeats", "3"], "--peer-repeats"),
])
def test_bad_arguments_exit_2_with_a_message(argv, msg, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps(QUESTIONS[0]) + "\n")
    argv = [str(q) if a == "PROMPTS" else a for a in argv]
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err


def test_peer_rows_run_peer_repeats_times(tiny_model_dir, tmp_path, capfd):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps(QUESTIONS[2]) + "\n")
    out = tmp_path / "r.json"
    argv = ["--prompts", str(q), "--model", str(tiny_model_dir), "--max-tokens", "4", "--modes", "off",
            "--peers", "hf", "--repeats", "2", "--peer-repeats", "1", "--threads", "1", "--no-progress",
            "--out", str(out)]
    assert cli.main(argv) == 0
    err = capfd.readouterr().err
    assert err.count("] off ...") == 2 and err.count("] hf ...") == 1
    report = json.loads(out.read_text())
    assert report["settings"]["repeats"] == 2 and report["settings"]["peer_repeats"] == 1
    assert {r["name"] for r in report["runs"]} == {"off", "hf"}


def _run(tiny_model_dir, tmp_path, extra, name="r"):
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in QUESTIONS))
    out = tmp_path / f"{name}.json"
    argv = ["--prompts", str(q), "--model", str(tiny_model_dir), "--max-tokens", "6", "--peers", "",
            "--threads", "1", "--no-progress", "--no-plots", "--out", str(out)] + extra
    rc = cli.main(argv)
    return rc, json.loads(out.read_text())


def test_interleaved_rows_generate_what_rows_in_their_own_processes_do(tiny_model_dir, tmp_path, capfd):
    rc, inter = _run(tiny_model_dir, tmp_path, ["--modes", "off,binary,three_tier", "--drafters", "ngram,self"], "inter")
    assert rc == 0
    err = capfd.readouterr().err
    assert "5 engine rows interleaved" in err
    rc, apart = _run(tiny_model_dir, tmp_path, ["--modes", "off,binary,three_tier", "--drafters", "ngram,self",
                                                "--no-interleave"], "apart")
    assert rc == 0 and "interleaved" not in capfd.readouterr().err
    assert inter["settings"]["interleaved"] is True and apart["settings"]["interleaved"] is False
    names = ["off", "binary", "binary_self", "three_tier", "three_tier_self"]
    assert [r["name"] for r in inter["runs"]] == [r["name"] for r in apart["runs"]] == names

    def ids(rep):
        lines = [json.loads(x) for x in (tmp_path / rep).with_suffix(".outputs.jsonl").read_text().splitlines()]
        return {(x["run"], x["question_id"]): x["token_ids"] for x in lines}

    # the draft length follows measured pass times, so steps (and three_tier's tiers) may differ
    # from run to run; the lossless rows' tokens may not
    a, b = ids("inter.json"), ids("apart.json")
    assert len(a) == len(b) == 5 * 3
    lossless = {k: v for k, v in a.items() if not k[0].startswith("three_tier")}
    assert len(lossless) == 9 and lossless == {k: b[k] for k in lossless}
    assert all(lossless[(run, q)] == lossless[("off", q)] for run, q in lossless)


def test_fp16_kv_cache_rows(tiny_model_dir, tmp_path):
    rc, rep = _run(tiny_model_dir, tmp_path, ["--modes", "off,binary", "--drafters", "ngram", "--kv-cache-dtype", "fp16"],
                   "kv16")
    assert rc == 0 and rep["settings"]["kv_cache_dtype"] == "fp16"
    assert "K/V cache in fp16" in (tmp_path / "kv16.md").read_text()
    lines = [json.loads(x) for x in (tmp_path / "kv16.outputs.jsonl").read_text().splitlines()]
    by = {(x["run"], x["question_id"]): x["token_ids"] for x in lines}
    assert all(by[("binary", q)] == by[("off", q)] for run, q in by)  # lossless against off on the same cache


def test_bf16_prefill_rows_beside_the_default_ones(tiny_model_dir, tmp_path):
    """`--prefill-dtype auto,bfloat16`: every engine row also as <row>+bf16, interleaved with the
    others; the bf16 rows are lossless among themselves and compared with the fp32 `off`."""
    rc, rep = _run(tiny_model_dir, tmp_path, ["--modes", "off,binary", "--drafters", "ngram",
                                              "--prefill-dtype", "auto,bfloat16"], "bf")
    assert rc == 0 and rep["settings"]["prefill_dtype"] == "auto+bfloat16"
    names = [r["name"] for r in rep["runs"]]
    assert names == ["off", "binary", "off+bf16", "binary+bf16"]
    assert [r.get("engine") for r in rep["runs"]] == [None, None] + [{"prefill_dtype": "bfloat16"}] * 2
    assert "rows named +bf16" in (tmp_path / "bf.md").read_text()
    lines = [json.loads(x) for x in (tmp_path / "bf.outputs.jsonl").read_text().splitlines()]
    by = {(x["run"], x["question_id"]): x["token_ids"] for x in lines}
    qs = {q for _, q in by}
    assert all(by[("binary+bf16", q)] == by[("off+bf16", q)] and by[("binary", q)] == by[("off", q)] for q in qs)
    assert cli.main(["--prompts", str(tmp_path / "q.jsonl"), "--modes", "off", "--prefill-dtype", "fp8"]) == 2


def test_interleaved_rows_take_turns_prompt_by_prompt(monkeypatch):
    from server.bench import worker

    calls = []
    monkeypatch.setattr(worker, "_engine", lambda job, row, model=None, tokenizer=None: _FakeEngine(row["name"]))
    monkeypatch.setattr(worker, "_generate_one",
                        lambda engine, job, row, i, p: calls.append((i, row["name"])) or {"question_id": p["question_id"]})
    job = {"prompts": [{"question_id": q, "prompt_token_ids": [1, 2]} for q in range(5)], "temperature": 0.0,
           "seed": 0, "warmup_tokens": 2, "max_tokens": 4, "progress": False,
           "rows": [{"name": n, "mode": "off", "kind": "engine"} for n in ("a", "b", "c")]}
    res = worker.run_engines(job)
    # every row gets prompt i before any row gets prompt i + 1, in the balanced orders
    orders = worker.balanced_orders(3)
    assert calls == [(i, "abc"[j]) for i in range(5) for j in orders[i % len(orders)]]
    assert [n for _, n in calls[:3]] != [n for _, n in calls[3:6]]
    assert all(res["rows"][n]["ok"] and len(res["rows"][n]["outputs"]) == 5 for n in "abc")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9])
def test_balanced_orders_put_each_row_in_each_place_and_after_each_other_row_equally_often(n):
    from collections import Counter

    from server.bench.worker import balanced_orders

    orders = balanced_orders(n)
    assert len(orders) == (2 * n if n % 2 and n > 1 else n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    places = Counter((x, k) for o in orders for k, x in enumerate(o))
    assert set(places.values()) == {len(orders) // n}
    after = Counter((a, b) for o in orders for a, b in zip(o, o[1:]))
    if n > 1:
        assert len(after) == n * (n - 1) and len(set(after.values())) == 1  # every ordered pair, as often


class _FakeEngine:
    def __init__(self, name):
        if name == "broken":
            raise FileNotFoundError("no weights for this drafter")
        self.model = self.tokenizer = object()

    def generate(self, requests):
        return []


def test_an_interleaved_row_that_cannot_be_built_is_skipped_and_the_others_run(monkeypatch):
    from server.bench import worker

    monkeypatch.setattr(worker, "_engine", lambda job, row, model=None, tokenizer=None: _FakeEngine(row["name"]))
    monkeypatch.setattr(worker, "_generate_one", lambda engine, job, row, i, p: {"question_id": p["question_id"]})
    job = {"prompts": [{"question_id": 7, "prompt_token_ids": [1]}], "temperature": 0.0, "seed": 0,
           "warmup_tokens": 2, "max_tokens": 4, "progress": False,
           "rows": [{"name": n, "mode": "off", "kind": "engine"} for n in ("a", "broken", "c")]}
    res = worker.run_engines(job)["rows"]
    assert not res["broken"]["ok"] and "no weights for this drafter" in res["broken"]["error"]
    assert res["a"]["ok"] and res["c"]["ok"] and len(res["a"]["outputs"]) == len(res["c"]["outputs"]) == 1


def test_interleaved_run_reports_a_failed_row_as_skipped(tiny_model_dir, tmp_path, capfd):
    # the tiny model has no trained draft head: the head rows cannot be built, off still runs
    rc, rep = _run(tiny_model_dir, tmp_path, ["--modes", "off,binary", "--drafters", "head"])
    assert rc == 0
    assert [r["name"] for r in rep["runs"]] == ["off"]
    assert [s["name"] for s in rep["skipped"]] == ["binary_head"]


def test_a_sweep_with_the_controller_off_runs_the_slim_tier_at_every_drafted_step(tiny_model_dir, tmp_path):
    rc, rep = _run(tiny_model_dir, tmp_path, ["--modes", "off,three_tier", "--drafters", "ngram",
                                              "--sweep", "ctl=0;a=0.5", "--sweep-mode", "full"], "sw")
    assert rc == 0
    pts = {p["name"]: p for p in rep["sweep"]["points"]}
    assert set(pts) == {"three_tier", "three_tier[a=0.5,ctl=0]"}
    forced = pts["three_tier[a=0.5,ctl=0]"]
    assert forced["params"] == {"controller": False, "accept_threshold": 0.5}
    assert forced["slim_tier_on"] == 1.0
    assert rep["sweep"]["grid"] == {"controller": [False], "accept_threshold": [0.5]}


def test_a_sweep_of_the_full_models_threshold(tiny_model_dir, tmp_path):
    """`f=0` keeps every draft the full model decides: tokens it did not choose show in the
    `lenient_share` column; `f=1` is the exact rule."""
    rc, rep = _run(tiny_model_dir, tmp_path, ["--modes", "off,three_tier", "--drafters", "ngram",
                                              "--sweep", "f=0,1", "--sweep-mode", "full"], "swf")
    assert rc == 0
    from server.engine.config import SpecConfig

    # a point is named by what it changes from the defaults
    pts = {p.get("params", {}).get("full_accept_threshold", SpecConfig.full_accept_threshold): p
           for p in rep["sweep"]["points"]}
    assert set(pts) == {0.0, 1.0} and pts[0.0]["name"] == "three_tier[f=0]"
    assert pts[0.0]["acceptance_rate"] == 1.0 and pts[0.0]["lenient_share"] > 0
    assert pts[1.0]["lenient_share"] == 0.0


def test_a_sweep_with_bf16_prompts_runs_each_point_both_ways(tiny_model_dir, tmp_path, capfd):
    """`--prefill-dtype auto,bfloat16` with `--sweep`: every point also as <point>+bf16 (its
    prompts in bf16), so a lossy point can be measured beside fp32 `off` with both knobs."""
    rc, rep = _run(tiny_model_dir, tmp_path, ["--modes", "off,three_tier", "--drafters", "ngram",
                                              "--prefill-dtype", "auto,bfloat16", "--sweep", "f=0", "--sweep-mode",
                                              "full"], "swbf")
    assert rc == 0
    pts = {p["name"]: p for p in rep["sweep"]["points"]}
    assert set(pts) == {"three_tier", "three_tier+bf16", "three_tier[f=0]", "three_tier[f=0]+bf16"}
    assert pts["three_tier[f=0]+bf16"]["engine"] == {"prefill_dtype": "bfloat16"}
    assert pts["three_tier[f=0]+bf16"]["params"] == {"full_accept_threshold": 0.0}
    assert pts["three_tier[f=0]"].get("engine") is None
    assert pts["three_tier[f=0]+bf16"]["acceptance_rate"] == 1.0
    lines = [json.loads(x) for x in (tmp_path / "swbf.outputs.jsonl").read_text().splitlines()]
    assert {x["run"] for x in lines} == {"off", "off+bf16"} | set(pts)
    # each point's speed-up has its interval, in the JSON, the Markdown table and the printed lines
    printed = capfd.readouterr().out
    md = (tmp_path / "swbf.md").read_text().split("## Threshold sweep")[1]
    for name, p in pts.items():
        lo, hi = p["speedup_interval"]
        assert lo <= p["speedup_vs_off"] * (1 + 1e-9) and p["speedup_vs_off"] <= hi * (1 + 1e-9)
        assert f"{name}: {p['speedup_vs_off']:.3f}x off [{lo:.3f}, {hi:.3f}]" in printed
        assert f"| {name} | {p['tokens_per_s']:.1f} | {p['speedup_vs_off']:.2f} | {lo:.2f} - {hi:.2f} |" in md


def test_draft_head_flag_reaches_the_head_rows(tiny_model_dir, tmp_path):
    """`--draft-head`: the head rows draft with the given head (the tiny model has none of its
    own, so without the flag its head row cannot be built and is skipped)."""
    import torch

    from server.engine.drafters.head import DraftHead

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    torch.manual_seed(0)
    head = DraftHead(cfg["hidden_size"], 32, torch.arange(64), heads=4, window=6)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    path = tmp_path / "mine.head.safetensors"
    head.save(path, {"threshold": 0.0, "min_tokens": 1})
    rc, rep = _run(tiny_model_dir, tmp_path, ["--modes", "off,binary", "--drafters", "head"], "nohead")
    assert rc == 0 and [s["name"] for s in rep["skipped"]] == ["binary_head"]
    rc, rep = _run(tiny_model_dir, tmp_path, ["--modes", "off,binary", "--drafters", "head", "--draft-head", str(path)],
                   "head")
    assert rc == 0 and rep["settings"]["draft_head"] == str(path) and not rep["skipped"]
    assert [r["name"] for r in rep["runs"]] == ["off", "binary_head"]
    lines = [json.loads(x) for x in (tmp_path / "head.outputs.jsonl").read_text().splitlines()]
    by = {(x["run"], x["question_id"]): x["token_ids"] for x in lines}
    assert all(by[("binary_head", q)] == by[("off", q)] for _, q in by)
    assert cli.main(["--prompts", str(tmp_path / "q.jsonl"), "--modes", "off", "--draft-head",
                     str(tmp_path / "missing.safetensors")]) == 2


def _random_head(tiny_model_dir, path, seed):
    import torch

    from server.engine.drafters.head import DraftHead

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    torch.manual_seed(seed)
    head = DraftHead(cfg["hidden_size"], 32, torch.arange(64), heads=4, window=6)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    head.save(path, {"threshold": 0.0, "min_tokens": 1})
    return path


def test_two_draft_heads_run_the_head_rows_once_each_on_the_same_prompts(tiny_model_dir, tmp_path):
    """`--draft-head A,B`: the head and hybrid rows run with A under their own names and again
    with B as `<row>@<B's name>`; rows without a head (off, ngram) run once. Each row's engine
    drafts with its own head, and every one of them is lossless."""
    from server.bench import worker

    a = _random_head(tiny_model_dir, tmp_path / "a.head.safetensors", 0)
    b = _random_head(tiny_model_dir, tmp_path / "b.head.safetensors", 1)
    rc, rep = _run(tiny_model_dir, tmp_path, ["--modes", "off,binary", "--drafters", "ngram,head",
                                              "--draft-head", f"{a},{b}"], "two")
    assert rc == 0 and not rep["skipped"]
    names = [r["name"] for r in rep["runs"]]
    assert names == ["off", "binary", "binary_head", "binary_head@b"]
    row = next(r for r in rep["runs"] if r["name"] == "binary_head@b")
    assert row["params"] == {"head_path": str(b)}
    lines = [json.loads(x) for x in (tmp_path / "two.outputs.jsonl").read_text().splitlines()]
    by = {(x["run"], x["question_id"]): x["token_ids"] for x in lines}
    assert {r for r, _ in by} == set(names)
    assert all(by[(r, q)] == by[("off", q)] for r, q in by)
    job = {"model": str(tiny_model_dir), "threads": 1, "head_path": str(a), "max_model_len": 256}
    assert worker._engine(job, {"mode": "binary", "drafter": "head"}).config.spec.head_path == str(a)
    assert worker._engine(job, {"mode": "binary", "drafter": "head", "params": {"head_path": str(b)}}
                          ).config.spec.head_path == str(b)
    assert cli.main(["--prompts", str(tmp_path / "q.jsonl"), "--modes", "off", "--draft-head",
                     f"{a},{tmp_path / 'missing.safetensors'}"]) == 2


def test_head_labels_are_distinct():
    from server.bench.rows import Row, head_labels, with_draft_heads

    assert head_labels(["/x/new.head.safetensors", "/y/new.head.safetensors", "/z/old.safetensors"]) == [
        "new", "new1", "old"]
    rows = [Row("off", "engine", mode="off"), Row("binary_hybrid", "engine", mode="binary", drafter="hybrid"),
            Row("hf", "hf")]
    assert with_draft_heads(rows, ["a.safetensors"]) == rows
    assert [r.name for r in with_draft_heads(rows, ["a.safetensors", "b.safetensors"])] == [
        "off", "binary_hybrid", "binary_hybrid@b", "hf"]


def test_the_busy_warning_reads_tasks_running_now_not_the_lagging_load_average(tmp_path, monkeypatch):
    """Right after a benchmark ends the 1-minute load average still reads ~2 on an idle 2-core
    machine: the warning goes by the tasks running now (/proc/loadavg's running count, less the
    reader), and by the load average only where that count cannot be read."""
    f = tmp_path / "loadavg"
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (1.9, 1.9, 1.2))
    f.write_text("1.90 1.90 1.20 1/180 4242\n")  # only the reader runs
    assert cli.runnable_others(samples=3, interval_s=0.0, path=str(f)) == 0.0
    assert cli.busy_warning(2, cli.runnable_others(samples=3, interval_s=0.0, path=str(f))) is None
    f.write_text("1.90 1.90 1.20 3/180 4242\n")  # two others beside the reader
    others = cli.runnable_others(samples=3, interval_s=0.0, path=str(f))
    assert others == 2.0
    msg = cli.busy_warning(2, others)
    assert msg is not None and "other tasks running 2.0 on 2 cores" in msg
    assert cli.busy_warning(1, others) is None  # one thread per row: no barrier to wait on
    # no such file: the load average stands in
    assert cli.runnable_others(samples=2, interval_s=0.0, path=str(tmp_path / "missing")) is None
    monkeypatch.setattr(cli, "runnable_others", lambda: None)
    msg = cli.busy_warning(2)
    assert msg is not None and "load average 1.9" in msg
