"""benchmarks/early_exit.py: its teacher-forced counts per exit layer and its costs, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.model import ModelConfig
from server.engine.tokenizer import Tokenizer
from tests.bench import load_script


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    tok = Tokenizer.from_folder(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    questions = {i: {"turns": [t]} for i, t in enumerate(["say a", "count to nine", "hello there"])}
    answers = [{"question_id": i, "token_ids": torch.randint(3, 200, (12,), generator=g).tolist()} for i in questions]
    return load_script("early_exit"), model, tok, questions, answers


def test_the_last_exit_over_the_whole_vocabulary_is_the_full_model(setup, tiny_model_dir):
    ee, model, tok, questions, answers = setup
    L = model.config.num_hidden_layers
    every = torch.arange(model.config.vocab_size)
    stats, n_in = ee.measure(model, tok, answers, questions, every, list(range(1, L + 1)), 0.0)
    assert stats[L]["n"] == n_in == 3 * 12  # one position per answer token
    assert stats[L]["agree"] == stats[L]["n"] == stats[L]["conf"] == stats[L]["conf_ok"]
    for s in stats.values():  # a readout over every token is the whole one
        assert (s["agree_red"], s["conf_red"], s["conf_red_ok"]) == (s["agree"], s["conf"], s["conf_ok"])
    rows = ee.table(stats, ModelConfig.from_folder(Path(tiny_model_dir)), model.config.vocab_size)
    costs = [r["cost"] for r in rows]
    assert costs == sorted(costs) and costs[-1] == 1.0 and costs[0] < 1.0
    assert all(r["cost_reduced_readout"] == r["cost"] for r in rows)


def test_a_reduced_readout_is_cheaper_and_can_only_miss(setup, tiny_model_dir):
    ee, model, tok, questions, answers = setup
    L = model.config.num_hidden_layers
    few = torch.arange(0, model.config.vocab_size, 3)
    stats, n_in = ee.measure(model, tok, answers, questions, few, [L], 0.5)
    s = stats[L]
    assert s["agree_red"] == n_in <= s["n"]  # the full argmax is found exactly where it is in the readout
    assert s["conf_red_ok"] <= s["conf_red"]
    rows = ee.table(stats, ModelConfig.from_folder(Path(tiny_model_dir)), len(few))
    assert rows[0]["cost_reduced_readout"] < rows[0]["cost"] == 1.0
