"""The model's decode-sized forward on the CPU kernels against the same forward on torch's ops,
and the engine's outputs with and without the kernels."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from server.engine.kv_cache import Chunk, KVCache, build_batch
from server.engine.model import LlamaModel
from tests.engine.helpers import assert_pool_full, greedy_requests, make_engine, prefilled_two_tables
from via_sd_kernels import cpu

# a host with a C++ compiler must build the kernels: a failed build is a failure, not a skip
pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler for the CPU kernels")


def _two_passes(model: LlamaModel, route=None):
    kv, t1, t2 = prefilled_two_tables(model)
    with torch.inference_mode():
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


@pytest.mark.skipif(not cpu.dense_available(), reason="torch without oneDNN")
def test_wide_pass_multiplies_on_onednn_and_matches_torch(tiny_model_dir, monkeypatch):
    """A prompt-sized pass (48 tokens, over the skinny limit) takes every layer matrix and the LM
    head through oneDNN's GEMM, and its logits and K/V are torch's within fp32 rounding (the
    first pass of _two_passes; test_small_pass_matches_torch_ops compares the second)."""
    model = LlamaModel.from_folder(tiny_model_dir)
    calls = []
    real = cpu.dense_linear
    monkeypatch.setattr(cpu, "dense_linear", lambda x, p, b=None: calls.append(x.shape[0]) or real(x, p, b))
    kv = KVCache(model.cfg, 32, 8, torch.float32)
    t1 = kv.new_table()
    t1.ensure(kv.pool, 64)
    batch = build_batch([Chunk(t1, 0, list(range(3, 51)), 48)])
    with torch.inference_mode():
        fast = model.forward(batch, kv.k, kv.v)
    assert calls == [48] * (4 * model.cfg.num_layers) + [48]
    with cpu.disabled():
        kv_ref = KVCache(model.cfg, 32, 8, torch.float32)
        t2 = kv_ref.new_table()
        t2.ensure(kv_ref.pool, 64)
        with torch.inference_mode():
            ref = model.forward(build_batch([Chunk(t2, 0, list(range(3, 51)), 48)]), kv_ref.k, kv_ref.v)
    assert len(calls) == 4 * model.cfg.num_layers + 1
    torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(kv.k + kv.v, kv_ref.k + kv_ref.v):
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


@pytest.mark.parametrize("start_sublayer, save_at", [(0, None), (0, 5), (3, 8), (0, 100)])
def test_layers_in_one_call_are_bitwise_the_layer_by_layer_calls(tiny_model_dir, monkeypatch, start_sublayer,
                                                                  save_at):
    """`decoder_layers` runs the layers of a decode-sized pass in one kernel call: its logits,
    hidden states, saved prefix and cache are those of the loop over attn_block and mlp_block,
    bit for bit, with a route that skips sub-layers, resuming from a sub-layer and saving one."""
    from via_sd_kernels.routes import Route

    model = LlamaModel.from_folder(tiny_model_dir)
    n = model.cfg.num_layers
    route = Route(num_layers=n, attn=tuple(i % 2 == 0 for i in range(n)), mlp=tuple(i != 1 for i in range(n)))
    calls = []
    real = cpu.decoder_layers
    outs = []
    for one_call in (True, False):
        kv, t1, t2 = prefilled_two_tables(model)
        batch = build_batch([Chunk(t1, 37, [7, 8, 9, 10], 4), Chunk(t2, 11, [12], 1)])
        start = model.embed[batch.input_ids] * 1.5 if start_sublayer else None
        if not one_call:
            monkeypatch.setattr(model, "small_weights", lambda tokens: None)  # the loop in Python
        monkeypatch.setattr(cpu, "decoder_layers", lambda *a, **k: calls.append(one_call) or real(*a, **k))
        with torch.inference_mode():
            out = model.forward(batch, kv.k, kv.v, route, start_sublayer=start_sublayer, start_hidden=start,
                                save_at=save_at, want_hidden=True)
        outs.append((out, kv))
    assert calls == [True]
    (a, kv_a), (b, kv_b) = outs
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)
    assert (a.prefix_hidden is None) == (b.prefix_hidden is None) == (save_at is None)
    if save_at is not None:
        assert torch.equal(a.prefix_hidden, b.prefix_hidden)
    for x, y in zip(kv_a.k + kv_a.v, kv_b.k + kv_b.v):
        assert torch.equal(x, y)


def test_engine_greedy_output_is_the_same_without_the_kernels(tiny_model_dir):
    prompts = [[1, 5, 9, 4, 7], [2, 8, 8, 3], [6] * 12]
    eng = make_engine(tiny_model_dir)
    fast = [r.token_ids for r in eng.generate(greedy_requests(prompts, 24, "binary", prefix="f"))]
    with cpu.disabled():
        ref = [r.token_ids for r in eng.generate(greedy_requests(prompts, 24, "off", prefix="o"))]
    assert fast == ref
    assert_pool_full(eng)


def _wide_pass(model: LlamaModel, calls: list, n_seqs: int = 40):
    """Prefill n_seqs sequences of different lengths, then one pass of 1-3 new tokens each (more
    tokens than the small path takes): returns its output and the cache."""
    kv = KVCache(model.cfg, 8 * n_seqs + 1, 8, torch.float32)  # + the null block
    tables = [kv.new_table() for _ in range(n_seqs)]
    for t in tables:
        t.ensure(kv.pool, 64)
    lens = [5 + (7 * i) % 40 for i in range(n_seqs)]
    with torch.inference_mode():
        for t, n in zip(tables, lens):
            model.forward(build_batch([Chunk(t, 0, [(3 * n + j) % 200 for j in range(n)], 1)]), kv.k, kv.v)
        chunks = [Chunk(t, n, [(n + j) % 200 for j in range(1 + i % 3)], 1 + i % 3)
                  for i, (t, n) in enumerate(zip(tables, lens))]
        calls.clear()  # count the wide pass's kernel calls only
        out = model.forward(build_batch(chunks), kv.k, kv.v, want_hidden=True)
    return out, kv


def test_wide_decode_batch_takes_the_attention_kernel_and_matches_sdpa(tiny_model_dir, monkeypatch):
    import server.engine.model as model_module

    model = LlamaModel.from_folder(tiny_model_dir)
    calls = []
    real = cpu.paged_attention
    monkeypatch.setattr(cpu, "paged_attention", lambda *a: calls.append(1) or real(*a))
    kernel, kv_kernel = _wide_pass(model, calls)
    assert len(calls) == model.cfg.num_layers  # the wide pass ran on the kernel
    monkeypatch.setattr(model_module, "PAGED_MAX_QUERIES", 0)  # padded SDPA instead
    ref, kv_ref = _wide_pass(model, calls)
    assert not calls
    torch.testing.assert_close(kernel.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernel.hidden, ref.hidden, rtol=1e-4, atol=1e-4)
    for a, b in zip(kv_kernel.k + kv_kernel.v, kv_ref.k + kv_ref.v):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _mixed_pass(model: LlamaModel, calls: list):
    """Decode-sized steps of 1-3 tokens beside two prefill chunks wider than the kernel takes
    (one from position 0, one continuing a prompt), interleaved in the batch."""
    kv = KVCache(model.cfg, 8 * 12 + 1, 8, torch.float32)
    tables = [kv.new_table() for _ in range(12)]
    for t in tables:
        t.ensure(kv.pool, 64)
    lens = [4 + 3 * i for i in range(12)]
    with torch.inference_mode():
        for i, (t, n) in enumerate(zip(tables, lens)):
            if i != 3:  # sequence 3 starts its prompt in the mixed step
                model.forward(build_batch([Chunk(t, 0, [(5 * n + j) % 200 for j in range(n)], 1)]), kv.k, kv.v)
        chunks = []
        for i, (t, n) in enumerate(zip(tables, lens)):
            if i == 3:
                chunks.append(Chunk(t, 0, [(11 * j) % 200 for j in range(30)], 1))
            elif i == 7:
                chunks.append(Chunk(t, n, [(n + 2 * j) % 200 for j in range(24)], 2))
            else:
                chunks.append(Chunk(t, n, [(n + j) % 200 for j in range(1 + i % 3)], 1 + i % 3))
        calls.clear()
        out = model.forward(build_batch(chunks), kv.k, kv.v, want_hidden=True)
    return out, kv


def test_mixed_step_attends_on_the_kernel_and_matches_sdpa(tiny_model_dir, monkeypatch):
    """A step that carries prefill chunks beside decoding attends on the kernel, chunks and
    decodes in one call, with the same outputs and cache as every sequence by SDPA segments."""
    import server.engine.model as model_module

    model = LlamaModel.from_folder(tiny_model_dir)
    calls = []
    real = cpu.paged_attention
    monkeypatch.setattr(cpu, "paged_attention", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    mixed, kv_mixed = _mixed_pass(model, calls)
    # one call a layer, for every token of the step
    assert calls == [30 + 24 + sum(1 + i % 3 for i in range(12) if i not in (3, 7))] * model.cfg.num_layers
    monkeypatch.setattr(model_module, "PAGED_MAX_QUERIES", 0)  # every sequence by segments
    ref, kv_ref = _mixed_pass(model, calls)
    assert not calls
    torch.testing.assert_close(mixed.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed.hidden, ref.hidden, rtol=1e-4, atol=1e-4)
    for a, b in zip(kv_mixed.k + kv_mixed.v, kv_ref.k + kv_ref.v):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _prefill_chunks(model: LlamaModel, calls: list, kv_dtype=torch.float32):
    """One prompt of 150 tokens prefilled in two chunks (90 from position 0, 60 continuing it),
    each a single-sequence pass wider than the small path: the second chunk's logits and hidden
    states at every position, and the cache."""
    kv = KVCache(model.cfg, 24, 8, kv_dtype)
    t = kv.new_table()
    t.ensure(kv.pool, 150)
    ids = [(7 * j + 3) % 200 for j in range(150)]
    with torch.inference_mode():
        model.forward(build_batch([Chunk(t, 0, ids[:90], 1)]), kv.k, kv.v)
        out = model.forward(build_batch([Chunk(t, 90, ids[90:], 60)]), kv.k, kv.v, want_hidden=True)
    return out, kv


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_prefill_chunks_attend_on_the_kernel_and_match_sdpa(tiny_model_dir, monkeypatch, kv_dtype):
    """A prompt's chunks (one sequence, from 0 and continuing) run attention on the kernel, which
    reads only the keys each block of queries can see, with SDPA's outputs and cache."""
    import server.engine.model as model_module

    model = LlamaModel.from_folder(tiny_model_dir)
    calls = []
    real = cpu.paged_attention
    monkeypatch.setattr(cpu, "paged_attention", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    kernel, kv_kernel = _prefill_chunks(model, calls, kv_dtype)
    assert calls == [90] * model.cfg.num_layers + [60] * model.cfg.num_layers
    monkeypatch.setattr(model_module, "PAGED_MAX_QUERIES", 0)  # SDPA with the chunk's mask
    calls.clear()
    ref, kv_ref = _prefill_chunks(model, calls, kv_dtype)
    assert not calls
    torch.testing.assert_close(kernel.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernel.hidden, ref.hidden, rtol=1e-4, atol=1e-4)
    tol = 1e-5 if kv_dtype == torch.float32 else 2e-3  # fp16: one rounding of values a few ulp apart
    for a, b in zip(kv_kernel.k + kv_kernel.v, kv_ref.k + kv_ref.v):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_greedy_pass_reads_the_lm_head_in_fp16_and_keeps_the_argmax(tiny_model_dir):
    """`argmax_only` passes (greedy, no logprobs) take model.GreedyHead; their argmax is the full
    fp32 pass's and the engine's greedy text does not change."""
    model = LlamaModel.from_folder(tiny_model_dir)
    assert model.greedy_head is not None and model.greedy_head.w16.dtype == torch.float16
    kv = KVCache(model.cfg, 32, 8, torch.float32)
    t1 = kv.new_table()
    t1.ensure(kv.pool, 64)
    with torch.inference_mode():
        model.forward(build_batch([Chunk(t1, 0, list(range(3, 30)), 0)]), kv.k, kv.v)
        batch = build_batch([Chunk(t1, 27, [7, 8, 9, 10], 4)])
        full = model.forward(batch, kv.k, kv.v)
        fast = model.forward(batch, kv.k, kv.v, argmax_only=True)
    assert torch.equal(fast.logits.argmax(-1), full.logits.argmax(-1))
    assert not torch.equal(fast.logits, full.logits)  # the fp16 values where no argmax can be
    assert bool((fast.logits <= fast.logits.amax(-1, keepdim=True)).all())


def test_fp16_kv_cache_engine_is_close_to_fp32_and_lossless_between_modes(tiny_model_dir):
    """`kv_cache_dtype="fp16"`: twice the blocks in the same memory; prefill (torch's attention
    over the widened cache) and decode (the kernel) both read the rounded values, so the logits
    stay within fp16's rounding of the fp32 cache's, `binary` still equals `off`, and every block
    comes back. Without the kernels the same engine runs on torch's ops."""
    from server.engine.config import EngineConfig, SpecConfig
    from server.engine.engine import LLMEngine

    base = EngineConfig(model=str(tiny_model_dir), kv_cache_memory_gb=0.01, spec=SpecConfig(drafter="ngram"))
    e32 = LLMEngine(base)
    e16 = LLMEngine(replace(base, kv_cache_dtype="fp16"))
    assert e16.cache.k[0].dtype == torch.float16 and e32.cache.k[0].dtype == torch.float32
    assert e16.cache.num_blocks == 2 * e32.cache.num_blocks
    prompts = [[1, 5, 9, 4, 7, 1, 5, 9], [2, 8, 8, 3], [6] * 12, list(range(3, 60))]
    off16 = [r.token_ids for r in e16.generate(greedy_requests(prompts, 24, "off", prefix="o"))]
    bin16 = [r.token_ids for r in e16.generate(greedy_requests(prompts, 24, "binary", prefix="b"))]
    assert off16 == bin16
    with cpu.disabled():
        ref16 = [r.token_ids for r in e16.generate(greedy_requests(prompts, 24, "off", prefix="t"))]
    assert ref16 == off16
    assert_pool_full(e16)
    # the logits of one pass: fp16 K/V move them by about fp16's rounding, not more
    model = e32.model
    outs = {}
    for dt in (torch.float32, torch.float16):
        kv = KVCache(model.cfg, 16, 8, dt)
        t = kv.new_table()
        t.ensure(kv.pool, 64)
        with torch.inference_mode():
            model.forward(build_batch([Chunk(t, 0, list(range(3, 40)), 1)]), kv.k, kv.v)
            outs[dt] = model.forward(build_batch([Chunk(t, 37, [7, 8, 9], 3)]), kv.k, kv.v).logits
    diff = (outs[torch.float16] - outs[torch.float32]).abs().max().item()
    assert 0 < diff < 1e-2 * outs[torch.float32].abs().max().item()


def test_bf16_prefill_rounds_only_wide_passes_and_stays_lossless_between_modes(tiny_model_dir):
    """`prefill_dtype="bfloat16"`: passes wider than the decode kernels take (a 57-token prompt
    here) multiply bf16 copies of the layer matrices, made once per model (with the first engine
    that asks); decode-sized passes are
    the same fp32 kernels. So the wide pass's logits move by about bf16's rounding, `binary` still
    equals `off` on the same setting, engines sharing the model keep their own setting, and every
    block comes back."""
    from server.engine.config import ConfigError, EngineConfig, SpecConfig
    from server.engine.engine import LLMEngine

    base = EngineConfig(model=str(tiny_model_dir), kv_cache_memory_gb=0.01, spec=SpecConfig(drafter="ngram"))
    e32 = LLMEngine(base)
    ebf = LLMEngine(replace(base, prefill_dtype="bfloat16"), model=e32.model, tokenizer=e32.tokenizer)
    prompts = [[1, 5, 9, 4, 7, 1, 5, 9], list(range(3, 60)), [6] * 40]
    assert list(e32.model._wide) == [torch.bfloat16]  # made with the engine
    off_bf = [r.token_ids for r in ebf.generate(greedy_requests(prompts, 24, "off", prefix="o"))]
    bin_bf = [r.token_ids for r in ebf.generate(greedy_requests(prompts, 24, "binary", prefix="b"))]
    assert off_bf == bin_bf
    assert_pool_full(ebf)
    off_32 = [r.token_ids for r in e32.generate(greedy_requests(prompts, 24, "off", prefix="f"))]
    assert off_32[0] == off_bf[0]  # an 8-token prompt: no wide pass, the same arithmetic
    # one wide pass through both: the same layer matrices, rounded to bf16 on the way in
    model = e32.model
    outs = {}
    for wide in (None, torch.bfloat16):
        kv = KVCache(model.cfg, 16, 8, torch.float32)
        t = kv.new_table()
        t.ensure(kv.pool, 64)
        with torch.inference_mode():
            outs[wide] = model.forward(build_batch([Chunk(t, 0, list(range(3, 60)), 4)]), kv.k, kv.v,
                                       wide_dtype=wide).logits
    diff = (outs[torch.bfloat16] - outs[None]).abs().max().item()
    assert 0 < diff < 0.05 * outs[None].abs().max().item()
    with pytest.raises(ConfigError, match="prefill_dtype"):
        LLMEngine(replace(base, prefill_dtype="fp8"), model=e32.model, tokenizer=e32.tokenizer)
