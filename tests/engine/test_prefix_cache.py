"""The prefix cache: exact keys, eviction, reuse across requests, and K/V that never changes while cached."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.api import GenerationRequest
from server.engine.block_pool import BlockPool
from server.engine.config import SamplingParams, SpecParams
from tests.engine.helpers import assert_pool_full, generate_checked as run, greedy_requests, hf_greedy, make_engine

BS = 4
_rng = random.Random(99)
SYSTEM = [_rng.randrange(40, 120) for _ in range(13)]  # a shared "system prompt"
# repetitive tails, so that lookup drafts find matches; every prompt starts with SYSTEM
PROMPTS = [SYSTEM + ([_rng.randrange(40, 120) for _ in range(5)] * 4)[: 6 + 5 * i] for i in range(5)]
SLIM_TIER = {"accept_threshold": 0.0, "escalate_threshold": 0.0, "bonus_confidence": 0.0, "controller": False,
             "max_slim_backlog": 6, "slim_confidence": 0.0}


# ---------------------------------------------------------------------------- the pool
def test_a_hit_needs_the_same_tokens_after_the_same_block():
    pool = BlockPool(8)
    a, b = pool.allocate(2)
    sa = pool.register(a, pool.ROOT, (1, 2))
    sb = pool.register(b, sa, (3, 4))
    assert pool.lookup(pool.ROOT, (1, 2)) == (a, sa) and pool.lookup(sa, (3, 4)) == (b, sb)
    assert pool.lookup(pool.ROOT, (3, 4)) is None  # same tokens, other position in the chain
    assert pool.lookup(sa, (3, 5)) is None
    # the same content computed again by another sequence keeps the first block's serial
    (c,) = pool.allocate(1)
    assert pool.register(c, pool.ROOT, (1, 2)) == sa and pool.num_cached == 2
    pool.free([c])
    assert pool.num_free == 5 and pool.num_cached == 2  # c was never cached: plainly free again


def test_cached_blocks_count_as_free_and_are_evicted_last_and_oldest_first():
    pool = BlockPool(5)  # 4 usable
    a, b, c = pool.allocate(3)
    sa = pool.register(a, pool.ROOT, (1,))
    sb = pool.register(b, pool.ROOT, (2,))
    pool.free([b, a, c])  # b released first, so evicted first
    assert pool.num_free == 4 and pool.num_cached == 2
    # never-cached blocks go first
    got = pool.allocate(2)
    assert a not in got and b not in got and pool.num_cached == 2
    (d,) = pool.allocate(1)
    assert d == b and pool.lookup(pool.ROOT, (2,)) is None and pool.num_cached == 1
    # a hit takes an evictable block back into use: it is no longer free
    pool.take(a)
    assert pool.num_free == 0 and pool.lookup(pool.ROOT, (1,)) == (a, sa)
    pool.free([a])
    assert pool.num_free == 1
    with pytest.raises(ValueError):
        pool.take(c)  # not cached
    assert sb != sa


def test_an_evicted_block_written_again_is_not_the_parent_of_its_old_children():
    pool = BlockPool(4)  # 3 usable
    a, b = pool.allocate(2)
    sa = pool.register(a, pool.ROOT, (1,))
    pool.register(b, sa, (2,))
    pool.free([a])  # a evictable; b (its child) still held
    (x,) = pool.allocate(1)
    (y,) = pool.allocate(1)  # no never-cached block left: evicts a
    assert y == a and pool.lookup(pool.ROOT, (1,)) is None
    s_new = pool.register(y, pool.ROOT, (1,))  # new contents for the same block id and tokens
    assert s_new != sa
    assert pool.lookup(s_new, (2,)) is None  # b was computed after the old contents
    pool.free([b, x, y])
    assert pool.num_free == pool.num_usable
    assert pool.reset_prefix_cache() == 2 and pool.num_cached == 0 and pool.num_free == pool.num_usable


# ---------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return hf_greedy(tiny_model_dir, PROMPTS, 24)


def test_a_repeated_prompt_is_read_from_the_cache_and_decodes_the_same(tiny_model_dir, reference):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"}, block_size=BS, enable_prefix_caching=True)
    first = [run(eng, greedy_requests([p], 24, ignore_eos=True, prefix=f"a{i}"))[0] for i, p in enumerate(PROMPTS)]
    again = run(eng, greedy_requests(PROMPTS, 24, ignore_eos=True, prefix="b"))
    assert [r.token_ids for r in first] == reference and [r.token_ids for r in again] == reference
    # the first request found nothing; the others the blocks of SYSTEM (13 tokens: 3 whole blocks)
    assert [r.cached_tokens for r in first] == [0] + [12] * (len(PROMPTS) - 1)
    # the second time, every whole block but the one holding the last prompt token
    assert [r.cached_tokens for r in again] == [(len(p) - 1) // BS * BS for p in PROMPTS]
    s = eng.stats()
    assert s.prefix_cache_hits == sum(r.cached_tokens for r in first + again)
    assert s.prefix_cache_queries == 2 * sum(map(len, PROMPTS))


def test_the_next_turn_finds_the_answer_before_it(tiny_model_dir):
    """Blocks of generated tokens are cached too: a chat's next turn resends them."""
    eng = make_engine(tiny_model_dir, spec={"mode": "off"}, block_size=BS, enable_prefix_caching=True)
    (r1,) = run(eng, greedy_requests([PROMPTS[0]], 20, ignore_eos=True, prefix="t1"))
    turn2 = PROMPTS[0] + r1.token_ids + [7, 8, 9]
    (r2,) = run(eng, greedy_requests([turn2], 8, ignore_eos=True, prefix="t2"))
    # the last token of turn 1 was never fed to the model: its block is not whole in the cache
    assert r2.cached_tokens == (len(PROMPTS[0]) + 20 - 1) // BS * BS
    ref = make_engine(tiny_model_dir, spec={"mode": "off"}, block_size=BS)
    (r3,) = run(ref, greedy_requests([turn2], 8, ignore_eos=True, prefix="t3"))
    assert r3.cached_tokens == 0 and r2.token_ids == r3.token_ids


@pytest.mark.parametrize("mode,drafter", [("binary", "ngram"), ("binary", "self"), ("three_tier", "ngram"),
                                          ("three_tier", "self")])
def test_cached_blocks_never_change_while_cached(tiny_model_dir, reference, mode, drafter):
    """Speculative steps write K/V past a sequence's full frontier only (slim passes, drafts that
    are rejected later); a block is cached only below it. So a cached block's K/V stays exactly as
    registered while other sequences share it and keep decoding. Greedy `binary` output stays exact
    (`three_tier` with every position accepted by the slim tier is lossy by design)."""
    eng = make_engine(tiny_model_dir, spec={"mode": mode, "drafter": drafter, **SLIM_TIER}, block_size=BS,
                      enable_prefix_caching=True)
    pool, cache = eng.cache.pool, eng.cache
    seen: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def kv(block):
        sl = slice(block * BS, (block + 1) * BS)
        return torch.stack([k[sl] for k in cache.k]).clone(), torch.stack([v[sl] for v in cache.v]).clone()

    def check():
        for block, key in pool._key.items():
            k, v = kv(block)
            if (block, key) in seen:
                k0, v0 = seen[(block, key)]
                assert torch.equal(k, k0) and torch.equal(v, v0), f"cached block {block} changed"
            else:
                seen[(block, key)] = (k, v)

    reqs = [GenerationRequest(f"{rep}-{i}", tuple(p), SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                              SpecParams(mode=mode))
            for rep in range(2) for i, p in enumerate(PROMPTS)]
    out: dict[str, list[int]] = {}
    for r in reqs[:3]:  # some finish before the rest arrive, some share their steps
        eng.add_request(r)
    pending = reqs[3:]
    while eng.has_unfinished() or pending:
        if pending and len(eng.scheduler.running) < 3:
            eng.add_request(pending.pop(0))
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
        check()
    assert_pool_full(eng)
    assert len(seen) > len(PROMPTS)
    s = eng.stats()
    assert s.prefix_cache_hits > 0 and s.draft_tokens > 0
    if mode == "three_tier":
        assert s.slim_passes > 0 and s.tier_accept > 0
        assert all(len(out[r.request_id]) == 24 for r in reqs)
    else:
        for r in reqs:
            assert out[r.request_id] == reference[int(r.request_id.split("-")[1])], r.request_id


def test_preemption_and_eviction_under_a_small_pool_stay_exact(tiny_model_dir, reference):
    # 23 usable blocks of 4 slots: not all five sequences fit; cached blocks are evicted to make room
    eng = make_engine(tiny_model_dir, spec={"mode": "binary"}, block_size=BS, num_blocks=24, prefill_chunk=8,
                      max_num_batched_tokens=32, enable_prefix_caching=True)
    for rep in range(2):
        res = run(eng, greedy_requests(PROMPTS, 24, mode="binary", ignore_eos=True, prefix=f"p{rep}"))
        assert [r.token_ids for r in res] == reference
    assert eng.stats().preemptions > 0 and eng.stats().prefix_cache_hits > 0


def test_off_by_config(tiny_model_dir, reference):
    eng = make_engine(tiny_model_dir, spec={"mode": "off"}, block_size=BS, enable_prefix_caching=False)
    for rep in range(2):
        res = run(eng, greedy_requests(PROMPTS, 24, ignore_eos=True, prefix=f"n{rep}"))
        assert [r.token_ids for r in res] == reference and all(r.cached_tokens == 0 for r in res)
    assert eng.cache.pool.num_cached == 0 and eng.stats().prefix_cache_hits == 0
