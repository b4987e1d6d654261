"""The engine's `device`: validation everywhere; on a CUDA machine, the same tokens as on the CPU.

The CUDA tests skip where torch sees no GPU (CI); `benchmarks/gpu_engine.py` runs them on one.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from server.engine.api import GenerationRequest
from server.engine.config import ConfigError, SamplingParams, SpecParams
from tests.bench import BENCHMARKS, load_script
from tests.engine.helpers import assert_pool_full, greedy_requests, make_engine

PROMPTS = [[random.Random(50 + i).randrange(256) for _ in range(6 + 9 * i)] for i in range(6)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:0", "", "mps"])
def test_unknown_device_is_a_config_error(tiny_model_dir, name):
    with pytest.raises(ConfigError) as e:
        make_engine(tiny_model_dir, device=name)
    assert e.value.param == "device"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_a_gpu_is_a_config_error(tiny_model_dir):
    with pytest.raises(ConfigError, match="no CUDA device"):
        make_engine(tiny_model_dir, device="cuda")


def _run(eng, reqs):
    res = eng.generate(reqs)
    assert_pool_full(eng)
    return [r.token_ids for r in res]


@needs_cuda
@pytest.mark.parametrize("mode", ["off", "binary", "three_tier"])
def test_cuda_greedy_equals_cpu(tiny_model_dir, mode):
    cpu = make_engine(tiny_model_dir, spec={"mode": mode, "drafter": "ngram"})
    gpu = make_engine(tiny_model_dir, spec={"mode": mode, "drafter": "ngram"}, device="cuda")
    assert gpu.cache.k[0].is_cuda and gpu.model.embed.is_cuda
    ref = _run(cpu, greedy_requests(PROMPTS, 24, ignore_eos=True))
    assert _run(gpu, greedy_requests(PROMPTS, 24, ignore_eos=True)) == ref
    # alone as well as batched: one sequence takes the speculative path at the engine's default batch cap
    assert [_run(gpu, greedy_requests([p], 24, ignore_eos=True, prefix=f"a{i}"))[0] for i, p in enumerate(PROMPTS)] == ref


@needs_cuda
@pytest.mark.parametrize("mode", ["off", "binary", "three_tier"])
def test_cuda_seeded_sampling_is_reproducible(tiny_model_dir, mode):
    gpu = make_engine(tiny_model_dir, spec={"mode": mode, "drafter": "ngram"}, device="cuda")

    def reqs():
        return [GenerationRequest(f"s{i}", tuple(p), SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9,
                                                                    seed=7 + i, ignore_eos=True), SpecParams())
                for i, p in enumerate(PROMPTS)]

    a, b = _run(gpu, reqs()), _run(gpu, reqs())
    assert a == b
    assert all(len(t) == 20 for t in a)


@pytest.mark.parametrize("mode", ["off", "binary", "three_tier"])
def test_padded_graph_layout_gives_the_eager_tokens(tiny_model_dir, mode):
    """The CUDA-graph runner's padded layout (buckets, in-graph slots and mask, start/save of the
    slim prefix), run eagerly on the CPU: the same greedy tokens as the ragged eager batch."""
    from server.engine.cuda_graphs import CudaGraphRunner

    ref = _run(make_engine(tiny_model_dir, spec={"mode": mode, "drafter": "ngram"}),
               greedy_requests(PROMPTS, 24, ignore_eos=True))
    eng = make_engine(tiny_model_dir, spec={"mode": mode, "drafter": "ngram"})
    eng.runner.graphs = CudaGraphRunner(eng.model, eng.cache, capture=False)
    assert _run(eng, greedy_requests(PROMPTS, 24, ignore_eos=True)) == ref
    assert [_run(eng, greedy_requests([p], 24, ignore_eos=True, prefix=f"a{i}"))[0] for i, p in enumerate(PROMPTS)] == ref
    assert eng.runner.graphs.num_replays > 0


@needs_cuda
def test_cuda_graphs_replay_and_match_eager(tiny_model_dir):
    eager = make_engine(tiny_model_dir, spec={"mode": "three_tier", "drafter": "ngram"}, device="cuda", cuda_graphs=False)
    graphs = make_engine(tiny_model_dir, spec={"mode": "three_tier", "drafter": "ngram"}, device="cuda")
    assert eager.runner.graphs is None and graphs.runner.graphs is not None
    ref = _run(eager, greedy_requests(PROMPTS, 24, ignore_eos=True))
    assert _run(graphs, greedy_requests(PROMPTS, 24, ignore_eos=True)) == ref
    assert graphs.runner.graphs.num_captures > 0
    assert graphs.runner.graphs.num_replays > graphs.runner.graphs.num_captures


@needs_cuda
def test_train_head_on_cuda_collects_the_cpu_answers_and_saves_a_host_head(tiny_model_dir, tmp_path):
    """`via-sd train-head --device cuda`: the greedy answers are the CPU's tokens, the features
    land on the host, training runs on the GPU, and the saved head drafts on the host as it does
    on the GPU."""
    from pathlib import Path

    from server.engine.drafters.head import DraftHead, draft, pack_windows
    from server.engine.drafters.train_head import main
    from server.engine.model import LlamaModel

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "category": "t", "prompt": f"say {w}"}) + "\n"
                               for i, w in enumerate(["a", "bb", "ccc", "dddd", "e", "ff"])))
    common = ["--model", str(tiny_model_dir), "--prompts", str(prompts), "--max-tokens", "12", "--sampled", "1",
              "--vocab", "64", "--ffn", "32", "--heads", "4", "--window", "8", "--epochs", "2", "--batch-size", "4",
              "--heldout", "0.34", "--bf16"]
    assert main(common + ["--data", str(tmp_path / "cpu.pt"), "--collect-only"]) == 0
    out = tmp_path / "gpu.head"
    assert main(common + ["--data", str(tmp_path / "gpu.pt"), "--device", "cuda", "--out", str(out)]) == 0
    cpu, gpu = torch.load(tmp_path / "cpu.pt")["seqs"], torch.load(tmp_path / "gpu.pt")["seqs"]
    assert all(s["hidden"].device.type == "cpu" for s in gpu)
    greedy = {s["prompt_id"]: s for s in cpu if s["kind"] == "greedy"}
    for s in gpu:
        if s["kind"] == "greedy":
            assert torch.equal(s["tokens"], greedy[s["prompt_id"]]["tokens"])
            assert torch.allclose(s["hidden"].float(), greedy[s["prompt_id"]]["hidden"].float(), atol=2e-2)
    rec = json.loads(Path(str(out) + ".json").read_text())
    assert rec["training"]["device"] == "cuda" and 0.0 <= rec["heldout"]["top1"] <= 1.0
    head, _ = DraftHead.load(Path(str(out) + ".safetensors"))
    model = LlamaModel.from_folder(tiny_model_dir)
    head.attach(model.embed, model.lm_head)
    s = gpu[0]
    n = min(6, len(s["hidden"]))
    h, tok, pos, valid = pack_windows([(s["hidden"][:n].float(), s["tokens"][1:n + 1], n - 1)], 8)
    ids_cpu, p_cpu = draft(head, h, tok, pos, valid, 4)
    head.to_device("cuda")
    ids_gpu, p_gpu = draft(head, *(t.cuda() for t in (h, tok, pos, valid)), 4)
    assert torch.equal(ids_gpu.cpu(), ids_cpu) and torch.allclose(p_gpu.cpu(), p_cpu, atol=1e-4)


def test_gpu_head_benchmark_runs_on_the_cpu(tmp_path):
    """`benchmarks/gpu_head.py --device cpu --presets tiny`: the GPU script's smoke test, every
    stage measured and scaled to the shipped recipe."""
    mod = load_script("gpu_head")
    out = tmp_path / "gh.json"
    assert mod.main(["--device", "cpu", "--presets", "tiny", "--prompts", "6", "--batches", "8", "--train-steps", "3",
                     "--max-tokens", "12", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    tiny = res["models"]["tiny"]
    assert tiny["collect"][0]["answers"] == 24 and tiny["collect"][0]["positions"] > 24
    assert tiny["train"]["ms_per_step"] > 0 and tiny["draft"]["host_ms"] > 0 and tiny["draft"]["decode_ms"] > 0
    # the shipped head's cost sums every step of its making (a continued head keeps its init's record)
    rec = json.loads((BENCHMARKS.parent / "server/engine/assets/SmolLM2-135M-Instruct.head.json").read_text())
    steps = mod.recipe_steps(rec)
    assert steps[-1] is rec and res["shipped_recipe_on_cpu"]["steps"] == len(steps)
    assert res["shipped_recipe_on_cpu"]["answers"] == sum(r["data"]["answers"] for r in steps)
    assert res["shipped_recipe_on_cpu"]["position_epochs"] >= rec["data"]["train_positions"] * rec["training"]["epochs"]
    assert tiny["scaled"]["shipped_train_minutes"] > 0
    assert mod.recipe_steps({"data": {}, "init": {"record": {"data": {"x": 1}}}})[0] == {"data": {"x": 1}}


def test_gpu_engine_benchmark_runs_on_the_cpu(tmp_path):
    """`benchmarks/gpu_engine.py --device cpu --preset tiny`: the GPU script's smoke test; each
    end-to-end row is the median of its timed runs, with the passes and the slim-tier choices
    of a run beside it."""
    import statistics

    mod = load_script("gpu_engine")
    out = tmp_path / "ge.json"
    assert mod.main(["--device", "cpu", "--preset", "tiny", "--dtype", "float32", "--batches", "1,4", "--gammas", "0,2",
                     "--iters", "2", "--max-tokens", "16", "--repeats", "3", "--copy-gib", "0.05", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {(r["batch"], r["route"], r["gamma"]) for r in res["forward"]} == {
        (b, route, g) for b in (1, 4) for route in ("full", "slim") for g in (0, 2)}
    rows = {(r["mode"], r["concurrency"]): r for r in res["engine"]}
    assert set(rows) == {(m, b) for m in ("off", "binary", "three_tier") for b in (1, 4)}
    for (mode, b), r in rows.items():
        assert r["tokens"] == 16 * b and len(r["tok_s_runs"]) == 3
        assert r["tok_s"] == statistics.median(r["tok_s_runs"])
        assert r["captures_timed"] is None  # no graphs on the CPU
        if mode == "off":
            # every token of a plain request is one full pass (the first one's included)
            assert r["full_passes"] == r["tokens"] and r["slim_passes"] == r["controller_slim_on"] == 0
        else:
            assert r["full_passes"] + r["slim_passes"] > 0
            three = r["controller_slim_on"] + r["controller_slim_off"]
            assert (three > 0) == (mode == "three_tier")
