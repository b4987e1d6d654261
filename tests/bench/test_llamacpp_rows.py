"""The llama.cpp peer rows (`--peers llamacpp,llamacpp_pld`) on the bundled model's GGUF file,
through llama-cpp-python (`make llamacpp-install`, a prerequisite of `make test`)."""

import json

import pytest

from server.bench import cli
from server.bench.rows import LLAMACPP_PLD, Row, build_rows
from server.bench.runner import Skipped, run_row
from server.engine.model_files import bundled_gguf_path, model_gguf
from server.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.real_model

REPEAT = ("Repeat this sentence three times: the quick brown fox jumps over the lazy dog near the quiet river "
          "bank.")


def test_rows_and_gguf_lookup(tmp_path):
    rows = build_rows(["off"], [], ["llamacpp", "llamacpp_pld"])
    assert [(r.name, r.kind, r.drafts) for r in rows[1:]] == [("llamacpp", "llamacpp", False),
                                                               ("llamacpp_pld", "llamacpp", True)]
    assert rows[2].prompt_lookup == LLAMACPP_PLD
    assert model_gguf(None) == bundled_gguf_path() and model_gguf("SmolLM2-135M-Instruct") == bundled_gguf_path()
    assert model_gguf(str(tmp_path)) is None  # a folder without a GGUF
    (tmp_path / "m.gguf").write_bytes(b"")
    assert model_gguf(str(tmp_path)) == tmp_path / "m.gguf"
    (tmp_path / "n.gguf").write_bytes(b"")
    assert model_gguf(str(tmp_path)) is None  # two: no guess


def _job(real_model_dir, prompts: list[str], max_tokens: int, **kw) -> dict:
    tok = Tokenizer.from_folder(real_model_dir)
    ids = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    return {"model": str(real_model_dir), "gguf": str(bundled_gguf_path()), "max_tokens": max_tokens,
            "temperature": 0.0, "seed": 0, "threads": 2, "eos_token_ids": list(tok.eos_token_ids),
            "warmup_tokens": 4, "progress": False, "max_model_len": 512,
            "prompts": [{"question_id": i, "prompt_token_ids": p} for i, p in enumerate(ids)], **kw}


def test_llamacpp_rows_generate_with_their_counts(real_model_dir):
    job = _job(real_model_dir, [REPEAT, "Name three colors."], 40)
    plain = run_row(Row("llamacpp", "llamacpp"), job)
    pld = run_row(Row("llamacpp_pld", "llamacpp", prompt_lookup=dict(LLAMACPP_PLD)), job)
    assert not isinstance(plain, Skipped), plain
    assert not isinstance(pld, Skipped), pld
    assert plain["llama_cpp_version"] == "0.3.36"
    eos = set(job["eos_token_ids"])
    for res in (plain, pld):
        for o in res["outputs"]:
            assert 0 < len(o["token_ids"]) <= 40 and o["seconds"] > 0 and 0 < o["ttft"] <= o["seconds"]
            assert (o["finish_reason"] == "stop") == (o["token_ids"][-1] in eos)
            assert 1 <= o["steps"] <= len(o["token_ids"]) + 1
    # plain decoding: a pass a token (the prompt's pass gives the first); greedy repeats itself
    assert all(o["steps"] == len(o["token_ids"]) and o["accepted"] == 0 for o in plain["outputs"])
    assert [o["token_ids"] for o in run_row(Row("llamacpp", "llamacpp"), job)["outputs"]] == \
        [o["token_ids"] for o in plain["outputs"]]
    # prompt lookup copies the sentence to repeat: fewer passes than tokens
    rep = pld["outputs"][0]
    assert rep["accepted"] > 0 and rep["steps"] < len(rep["token_ids"])
    text = Tokenizer.from_folder(real_model_dir).decode(plain["outputs"][1]["token_ids"])
    assert any(c in text.lower() for c in ("red", "blue", "green", "yellow"))


def test_a_model_without_gguf_skips_the_row(real_model_dir):
    res = run_row(Row("llamacpp", "llamacpp"), _job(real_model_dir, ["Hi"], 4, gguf=None))
    assert isinstance(res, Skipped) and "GGUF" in res.reason


def test_bench_cli_runs_the_llamacpp_rows(real_model_dir, tmp_path):
    q = tmp_path / "question.jsonl"
    q.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": [REPEAT]}) + "\n")
    out = tmp_path / "r.json"
    assert cli.main(["--prompts", str(q), "--max-tokens", "16", "--modes", "off", "--peers", "llamacpp,llamacpp_pld",
                     "--threads", "2", "--no-progress", "--no-plots", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    runs = {r["name"]: r for r in rep["runs"]}
    assert set(runs) == {"off", "llamacpp", "llamacpp_pld"} and not rep["skipped"]
    assert runs["llamacpp"]["llama_cpp_version"] == "0.3.36" and runs["llamacpp_pld"]["prompt_lookup"] == LLAMACPP_PLD
    assert runs["llamacpp_pld"]["mean_accepted_tokens"] > 1.0
