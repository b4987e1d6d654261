"""Helpers for engine tests: build engines, run Hugging Face greedy as the reference."""

from __future__ import annotations

import torch

from server.engine.api import GenerationRequest
from server.engine.config import EngineConfig, SamplingParams, SpecConfig, SpecParams
from server.engine.engine import LLMEngine


def make_engine(model_dir, **kw) -> LLMEngine:
    # speculate at every batch size: these tests check batched speculative steps, which the
    # engine's default (`spec_max_batch`) reserves for a single decoding sequence
    spec_kw = {"spec_max_batch": 10**6, **kw.pop("spec", {})}
    # without the prefix cache unless a test asks for it: a test that runs the same prompts twice
    # (alone, then batched) checks that both paths compute them, not that the second finds them
    kw.setdefault("enable_prefix_caching", False)
    return LLMEngine(EngineConfig(model=str(model_dir), spec=SpecConfig(**spec_kw), **kw))


def greedy_requests(prompts: list[list[int]], max_tokens: int, mode: str | None = None, prefix="r", **sp):
    return [
        GenerationRequest(f"{prefix}{i}", tuple(p), SamplingParams(max_tokens=max_tokens, temperature=0.0, **sp),
                          SpecParams(mode=mode))
        for i, p in enumerate(prompts)
    ]


def hf_greedy(model_dir, prompts: list[list[int]], max_tokens: int, eos: int | None = None) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    m.eval()
    out = []
    for p in prompts:
        kw = {} if eos is not None else {"eos_token_id": None}
        with torch.inference_mode():
            o = m.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, **kw)
        out.append(o[0, len(p):].tolist())
    return out


def assert_pool_full(engine: LLMEngine) -> None:
    pool = engine.cache.pool
    assert pool.num_free == pool.num_usable, f"{pool.num_usable - pool.num_free} blocks leaked"
    assert not engine.has_unfinished()


def generate_checked(engine: LLMEngine, reqs):
    """`engine.generate(reqs)`, then every KV block must be back in the pool."""
    res = engine.generate(reqs)
    assert_pool_full(engine)
    return res


def prefilled_two_tables(model):
    """A small KV cache with two sequences' prompts (37 and 11 tokens) already run through `model`."""
    import torch

    from server.engine.kv_cache import Chunk, KVCache, build_batch

    kv = KVCache(model.cfg, 32, 8, torch.float32)
    t1, t2 = kv.new_table(), kv.new_table()
    t1.ensure(kv.pool, 64)
    t2.ensure(kv.pool, 64)
    with torch.inference_mode():
        model.forward(build_batch([Chunk(t1, 0, list(range(3, 40)), 1), Chunk(t2, 0, list(range(50, 61)), 1)]),
                      kv.k, kv.v)
    return kv, t1, t2
