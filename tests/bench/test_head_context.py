"""benchmarks/head_context.py: the prompt positions' features it records, and its teacher-forced
chained evaluation against the drafting loop's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.engine.drafters import train_head as th
from server.engine.drafters.head import DraftHead
from tests.bench import load_script


@pytest.fixture(scope="module")
def hc():
    return load_script("head_context")


@pytest.fixture(scope="module")
def answers(hc, tiny_model_dir):
    prompts = [{"id": i, "category": "t", "prompt": p} for i, p in
               enumerate(["say a", "count to nine, then back", "x" * 40, "hello there, tiny model"])]
    return hc.collect(str(tiny_model_dir), prompts, max_tokens=10, batch=2)


def test_every_position_is_recorded_as_a_full_forward_computes_it(answers, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    assert len(answers) == 4
    for a in answers:
        T = len(a["hidden"])
        assert a["tokens"].shape == (T + 1,) and a["greedy"].shape == (T,)
        assert 0 < a["answer_start"] < T - 2
        with torch.inference_mode():
            out = m(a["tokens"][None, :T], output_hidden_states=True)
        ref = out.hidden_states[-1][0]  # after the final norm
        # fp16 storage of the engine's states, prompt positions and answer positions alike
        torch.testing.assert_close(a["hidden"].float(), ref, atol=2e-2, rtol=2e-2)
        assert torch.equal(a["greedy"], out.logits[0].argmax(-1))
        # greedy answers: the target's argmax at each answer position is the next token
        s = a["answer_start"]
        assert torch.equal(a["greedy"][s:], a["tokens"][s + 1:])


def test_recording_does_not_change_what_the_engine_generates(answers, tiny_model_dir):
    from server.engine.api import GenerationRequest
    from server.engine.config import EngineConfig, SamplingParams, SpecConfig
    from server.engine.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir), spec=SpecConfig(mode="off"), enable_prefix_caching=False))
    for a in answers:
        prompt = tuple(a["tokens"][: a["answer_start"] + 1].tolist())
        res = eng.generate([GenerationRequest("q", prompt, SamplingParams(max_tokens=10, temperature=0.0))])[0]
        assert list(prompt) + res.token_ids == a["tokens"].tolist()


def _head(tiny_model_dir, window: int) -> DraftHead:
    from server.engine.model import LlamaModel

    m = LlamaModel.from_folder(tiny_model_dir)
    torch.manual_seed(1)
    head = DraftHead(m.cfg.hidden_size, 32, torch.arange(m.cfg.vocab_size), heads=4, window=window)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(std=0.3)
    return head.attach(m.embed, m.lm_head).eval()


def test_teacher_forced_chain_equals_the_drafting_loop(hc, answers, tiny_model_dir):
    # on answer-only pairs with a windowed head, the leading matches from every start position
    # must be what the drafter's own loop (`draft`, in train_head.evaluate) finds
    from server.engine.model import LlamaModel

    view = [hc.answer_only(a) for a in answers]
    model = LlamaModel.from_folder(tiny_model_dir)
    # fitted to these answers, so that drafts are often right several tokens deep
    head, _ = hc.train(model, view, torch.arange(model.cfg.vocab_size), 4, epochs=60, seed=0, lr=1e-2,
                       ffn=64, heads=4)
    mine = hc.evaluate(head, view, head.reduced_ids, gamma=3)
    ref = th.evaluate(head, view, head.reduced_ids, gamma=3, thresholds=())
    assert mine["top1"] == pytest.approx(ref["top1"], abs=1e-4)
    assert mine["tokens_per_step"] == pytest.approx(ref["tokens_per_step"], abs=1e-4)
    assert mine["positions"] == ref["positions"]
    assert mine["tokens_per_step"] > 1.5, mine  # the chain's deeper levels are exercised


def test_full_context_sees_the_prompt_and_scores_only_the_answer(hc, answers, tiny_model_dir):
    head = _head(tiny_model_dir, window=1 << 30)
    full = hc.evaluate(head, answers, head.reduced_ids, gamma=3)
    only = hc.evaluate(head, [hc.answer_only(a) for a in answers], head.reduced_ids, gamma=3)
    assert full["positions"] == only["positions"] == sum(len(a["greedy"]) - 1 - a["answer_start"] for a in answers)
    d = hc.pad(answers)
    assert not d["loss"][0, : answers[0]["answer_start"]].any() and d["loss"][0, answers[0]["answer_start"]]
    # the prompt's pairs change the head's predictions at answer positions
    a = answers[2]
    outs_full = th.unrolled_outputs(head, th.pad_answers([a])["h"].float(), th.pad_answers([a])["x"],
                                    th.pad_answers([a])["valid"], 1)[0][0, a["answer_start"]:]
    b = hc.answer_only(a)
    outs_only = th.unrolled_outputs(head, th.pad_answers([b])["h"].float(), th.pad_answers([b])["x"],
                                    th.pad_answers([b])["valid"], 1)[0][0]
    assert not torch.allclose(outs_full, outs_only)
    json.dumps(full)


def test_the_loss_scores_only_marked_positions(hc, answers, tiny_model_dir):
    head = _head(tiny_model_dir, window=1 << 30)
    d = hc.pad(answers)
    d["scale"] = torch.tensor(1.0)
    idx = torch.arange(len(answers))
    scored, _ = th.unrolled_loss(head, d, idx, 2, 1.0)
    everything, _ = th.unrolled_loss(head, {k: v for k, v in d.items() if k != "loss"}, idx, 2, 1.0)
    assert not torch.isclose(scored, everything)  # the prompt positions are left out
    d["loss"] = d["valid"].clone()
    assert torch.isclose(th.unrolled_loss(head, d, idx, 2, 1.0)[0], everything)


def test_a_saved_head_is_evaluated_per_task_as_a_trained_one(hc, answers, tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    bench = [{**a, "category": hc.CATEGORIES[i % 2]} for i, a in enumerate(answers)]
    _head(tiny_model_dir, window=8).save(tmp_path / "h.safetensors", {"threshold": 0.3})
    out = tmp_path / "eval.json"
    args = SimpleNamespace(head=[str(tmp_path / "h.safetensors")], gamma=3, out=str(out))
    assert hc.evaluate_saved(args, Path(tiny_model_dir), bench) == 0
    got = json.loads(out.read_text())["heads"]["h.safetensors"]
    assert got["record"]["threshold"] == 0.3 and got["record"]["window"] == 8
    from server.engine.model import LlamaModel

    m = LlamaModel.from_folder(tiny_model_dir)
    loaded, _ = DraftHead.load(tmp_path / "h.safetensors")
    loaded.attach(m.embed, m.lm_head)
    # the same numbers as evaluating the loaded head directly, per task and overall
    assert got["spec_bench"]["all"] == hc.evaluate(loaded, [hc.answer_only(a) for a in bench], loaded.reduced_ids, 3)
    first = hc.CATEGORIES[0]
    assert got["spec_bench"][first] == hc.evaluate(
        loaded, [hc.answer_only(a) for a in bench if a["category"] == first], loaded.reduced_ids, 3)
    assert got["spec_bench"][first]["answers"] == 2 and got["spec_bench"]["all"]["answers"] == 4


def test_a_one_layer_multi_layer_head_is_the_draft_head(hc):
    """`multi_outputs` computes `th.unrolled_outputs` for a one-layer head, and a two-layer head's
    second layer changes the predictions; its training loss is the recipe's with those outputs."""
    torch.manual_seed(0)
    V, H = 300, 64
    ids = torch.randperm(V)[:128].sort().values
    emb = torch.randn(V, H)
    h, x = torch.randn(2, 10, H), torch.randint(0, V, (2, 10))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False
    one = hc.MultiLayerHead(H, 96, ids, heads=4, window=6, layers=1).attach(emb, emb).eval()
    two = hc.MultiLayerHead(H, 96, ids, heads=4, window=6, layers=2).attach(emb, emb).eval()
    with torch.no_grad():
        for head in (one, two):
            for p in head.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.3)
        a, b = hc.multi_outputs(one, h, x, valid, 3), th.unrolled_outputs(one, h, x, valid, 3)
        plain = DraftHead(H, 96, ids, heads=4, window=6).attach(emb, emb).eval()
        plain.load_state_dict(one.state_dict())
        c = hc.multi_outputs(plain, h, x, valid, 3)
        two.load_state_dict(one.state_dict(), strict=False)  # the same first layer
        d2 = hc.multi_outputs(two, h, x, valid, 3)
    assert len(a) == 3 and all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a, b))
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(c, b))
    assert all(not torch.allclose(p, q, atol=1e-3) for p, q in zip(d2, b))
    assert sum(p.numel() for p in two.parameters()) > sum(p.numel() for p in one.parameters())
    data = th.pad_answers([{"tokens": torch.randint(0, V, (9,)), "hidden": torch.randn(8, H),
                            "greedy": torch.randint(0, V, (8,))}])
    data["scale"] = torch.tensor(1.0)
    loss, _ = th.unrolled_loss(two, data, torch.tensor([0]), 2, 1.0, outputs=hc.multi_outputs)
    loss.backward()
    assert two.extra[0].down.weight.grad is not None and two.extra[0].down.weight.grad.abs().sum() > 0


def test_segments_cover_every_pair_once_as_a_target_with_a_window_of_context(hc):
    T, H = 300, 8
    s = {"tokens": torch.arange(T + 1), "hidden": torch.randn(T, 2 * H), "greedy": torch.arange(T) + 1000,
         "answer_start": 57, "prompt_id": 1, "kind": "greedy"}
    segs = hc.segments(s, H, length=128, context=32)
    assert [len(p["hidden"]) for p in segs] == [128, 128, 108]
    targets = []
    for p in segs:
        first = int(p["tokens"][0])  # the absolute position of the piece's first pair
        assert p["hidden"].shape[1] == H and torch.equal(p["hidden"], s["hidden"][first:first + len(p["hidden"]), -H:])
        assert torch.equal(p["tokens"], s["tokens"][first:first + len(p["hidden"]) + 1])
        assert torch.equal(p["greedy"], s["greedy"][first:first + len(p["hidden"])])
        d = hc.pad([p])
        targets += [first + j for j in range(1, len(p["hidden"])) if d["loss"][0, j]]
    assert targets == list(range(1, T))  # the prompt's pairs too, each once
    assert [p["answer_start"] for p in segs] == [0, 32, 32]
    assert len(hc.segments({**s, "hidden": s["hidden"][:50], "tokens": s["tokens"][:51], "greedy": s["greedy"][:50]},
                           H)) == 1
