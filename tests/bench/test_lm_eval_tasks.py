"""benchmarks/lm_eval/tasks.py writes task files lm-eval-harness can read (the harness itself is not
installed here): valid YAML naming existing data, and math answers that are the references' numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]


def test_task_files_name_their_data_and_the_reference_numbers(tmp_path):
    bench = tmp_path / "q.jsonl"
    rows = [
        {"question_id": 1, "category": "math_reasoning", "turns": ["2+3?"], "reference": ["2+3=5\n#### 5"]},
        {"question_id": 2, "category": "qa", "turns": ["who?"], "reference": ["me"]},
        {"question_id": 3, "category": "math_reasoning", "turns": ["big?"], "reference": ["so\n#### 1,250"]},
    ]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "tasks"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lm_eval" / "tasks.py"), "--out", str(out),
                    "--spec-bench", str(bench), "--max-tokens", "64"], check=True, capture_output=True)
    choices = yaml.safe_load((out / "via_sd_choices.yaml").read_text())
    math = yaml.safe_load((out / "via_sd_math.yaml").read_text())
    assert choices["output_type"] == "multiple_choice" and math["output_type"] == "generate_until"
    assert math["generation_kwargs"]["max_gen_toks"] == 64
    items = [json.loads(line) for line in open(choices["dataset_kwargs"]["data_files"]["test"])]
    assert len(items) == 20 and all(0 <= it["answer"] < len(it["choices"]) for it in items)
    qs = [json.loads(line) for line in open(math["dataset_kwargs"]["data_files"]["test"])]
    assert qs == [{"question": "2+3?", "answer": "5"}, {"question": "big?", "answer": "1250"}]
    assert "{{question}}" in math["doc_to_text"] and choices["doc_to_choice"] == "{{choices}}"
