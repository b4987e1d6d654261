"""`via-sd bench` end to end on the tiny random model: the JSON contract of DESIGN.md section 4.

One module-scoped run (four rows, each in its own worker process, 3 prompts x 6 tokens); the tests
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
