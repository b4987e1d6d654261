"""The model's decode-sized forward on the CPU kernels against the same forward on torch's ops,
and the engine's outputs with and without the kernels."""

from __future__ import annotations

import shutil

import pytest
import torch

from server.engine.kv_cache import Chunk, KVCache, build_batch
from server.engine.model import LlamaModel
from tests.engine.helpers import greedy_requests, make_engine, assert_pool_full
from via_sd_kernels import cpu

# a host with a C++ compiler must build the kernels: a failed build is a failure, not a skip
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for the CPU kernels")


def _two_passes(model: LlamaModel, route=None):
    kv = KVCache(model.cfg, 32, 8, torch.float32)
    t1, t2 = kv.new_table(), kv.new_table()
    t1.ensure(kv.pool, 64)
    t2.ensure(kv.pool, 64)
    with torch.inference_mode():
        model.forward(build_batch([Chunk(t1, 0, list(range(3, 40)), 1), Chunk(t2, 0, list(range(50, 61)), 1)]),
                      kv.k, kv.v)
        out = model.forward(build_batch([Chunk(t1, 37, [7, 8, 9, 10], 4), Chunk(t2, 11, [12], 1)]), kv.k, kv.v,
                            route, want_hidden=True)
    return out, kv


def test_small_pass_matches_torch_ops(tiny_model_dir):
    model = LlamaModel.from_folder(tiny_model_dir)
    fast, kv_fast = _two_passes(model)
    with cpu.disabled():
        ref, kv_ref = _two_passes(model)
    torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.hidden, ref.hidden, rtol=1e-4, atol=1e-4)
    for a, b in zip(kv_fast.k + kv_fast.v, kv_ref.k + kv_ref.v):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_small_pass_with_a_route_writes_only_its_layers(tiny_model_dir):
    from via_sd_kernels.routes import Route

    model = LlamaModel.from_folder(tiny_model_dir)
    n = model.cfg.num_layers
    route = Route(num_layers=n, attn=tuple(i % 2 == 0 for i in range(n)), mlp=tuple(True for _ in range(n)))
    fast, kv_fast = _two_passes(model, route)
    with cpu.disabled():
        ref, kv_ref = _two_passes(model, route)
    torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(kv_fast.k, kv_ref.k):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_engine_greedy_output_is_the_same_without_the_kernels(tiny_model_dir):
    prompts = [[1, 5, 9, 4, 7], [2, 8, 8, 3], [6] * 12]
    eng = make_engine(tiny_model_dir)
    fast = [r.token_ids for r in eng.generate(greedy_requests(prompts, 24, "binary", prefix="f"))]
    with cpu.disabled():
        ref = [r.token_ids for r in eng.generate(greedy_requests(prompts, 24, "off", prefix="o"))]
    assert fast == ref
    assert_pool_full(eng)
