"""The engine's `device`: validation everywhere; on a CUDA machine, the same tokens as on the CPU.

The CUDA tests skip where torch sees no GPU (CI); `benchmarks/gpu_engine.py` runs them on one.
"""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.api import GenerationRequest
from server.engine.config import ConfigError, SamplingParams, SpecParams
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
