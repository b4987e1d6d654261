"""Speculative steps on a tiny random Llama: losslessness, tier routing, cache exactness."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.api import GenerationRequest
from server.engine.config import SamplingParams, SpecParams
from server.engine.kv_cache import Chunk
from tests.engine.helpers import assert_pool_full, generate_checked as outputs, greedy_requests, make_engine

# repetitive prompts so that prompt lookup finds matches
PROMPTS = [([random.Random(i).randrange(40, 120) for _ in range(6)] * (2 + i % 3))[: 10 + 4 * i] for i in range(6)]




@pytest.mark.parametrize("drafter", ["ngram", "self", "model"])
def test_binary_greedy_equals_off(tiny_model_dir, drafter):
    kw = {"draft_model": str(tiny_model_dir)} if drafter == "model" else {}
    if drafter != "ngram":  # a model drafter drafts what pays for its own forwards: here, every step
        kw["adaptive_draft"] = False
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": drafter, **kw})
    off = outputs(eng, greedy_requests(PROMPTS, 32, mode="off", ignore_eos=True, prefix="o"))
    alone = [outputs(eng, greedy_requests([p], 32, mode="binary", ignore_eos=True, prefix=f"a{i}"))[0]
             for i, p in enumerate(PROMPTS)]
    batched = outputs(eng, greedy_requests(PROMPTS, 32, mode="binary", ignore_eos=True, prefix="b"))
    assert [r.token_ids for r in alone] == [r.token_ids for r in off]
    assert [r.token_ids for r in batched] == [r.token_ids for r in off]
    drafted = sum(r.via_sd.draft_tokens for r in batched)
    assert drafted > 0
    for r in off:  # a plain request: one step and one full pass a token, nothing drafted
        u = r.via_sd
        assert u.steps == u.full_passes == len(r.token_ids) and u.draft_tokens == u.slim_passes == 0
    for r in batched:
        u = r.via_sd
        assert u.slim_passes == 0 and u.full_passes == u.steps
        assert u.accepted <= u.draft_tokens and u.full_verified <= u.draft_tokens


def test_self_drafts_do_not_run_the_draft_route_over_a_prompt(tiny_model_dir):
    """The step that ends a prompt is a plain step for the `self` drafter: the draft route would
    first have to read the whole prompt (a long first token); later steps draft as before."""
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "self", "adaptive_draft": False})
    seen = []
    real = eng.runner.forward

    def forward(chunks, route=None, **kw):
        if route is eng.spec.drafter.route:
            seen.extend(len(c.token_ids) for c in chunks)
        return real(chunks, route, **kw)

    eng.runner.forward = forward
    prompts = [list(range(3, 3 + 40)), [5, 6, 7], [9] * 30]
    off = outputs(eng, greedy_requests(prompts, 24, mode="off", ignore_eos=True, prefix="o"))
    res = outputs(eng, greedy_requests(prompts, 24, mode="binary", ignore_eos=True, prefix="b"))
    assert [r.token_ids for r in res] == [r.token_ids for r in off]
    assert seen and max(seen) < 30  # never a whole 30- or 40-token prompt
    assert sum(r.via_sd.draft_tokens for r in res) > 0
    assert_pool_full(eng)


def test_drafter_equal_to_target_is_always_accepted(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "model", "draft_model": str(tiny_model_dir),
                                            "adaptive_draft": False})  # the draft price (a whole pass) never pays
    eng.spec.drafter.min_confidence = 0.0  # never stop drafting early
    res = outputs(eng, greedy_requests(PROMPTS, 30, mode="binary", ignore_eos=True))
    for r in res:
        assert r.via_sd.draft_tokens > 0 and r.via_sd.accepted == r.via_sd.draft_tokens


def test_three_tier_with_every_position_escalated_equals_binary(tiny_model_dir):
    forced = {"mode": "three_tier", "escalate_threshold": 2.0, "accept_threshold": 2.0, "bonus_confidence": 2.0,
              "controller": False}
    eng = make_engine(tiny_model_dir, spec=forced)
    three = outputs(eng, greedy_requests(PROMPTS, 32, mode="three_tier", ignore_eos=True, prefix="t"))
    binary = outputs(eng, greedy_requests(PROMPTS, 32, mode="binary", ignore_eos=True, prefix="b"))
    assert [r.token_ids for r in three] == [r.token_ids for r in binary]
    s = eng.stats()
    assert s.tier_accept == 0 and s.tier_slim == 0 and s.tier_full > 0
    assert sum(r.via_sd.slim_passes for r in three) > 0


def test_three_tier_counts_add_up_and_skip_full_passes(tiny_model_dir):
    eng = make_engine(tiny_model_dir, spec={"mode": "three_tier", "accept_threshold": 0.3, "escalate_threshold": 0.1,
                                            "bonus_confidence": 0.0, "controller": False,
                                            "slim_confidence": 0.0})
    res = outputs(eng, greedy_requests(PROMPTS, 40, mode="three_tier", ignore_eos=True))
    s = eng.stats()
    assert s.tier_accept + s.tier_slim + s.tier_full <= s.draft_tokens
    assert s.slim_passes > 0 and s.full_passes < sum(r.via_sd.steps for r in res)
    for r in res:
        u = r.via_sd
        assert u.accepted + u.slim_regenerated <= len(r.token_ids)
        assert len(r.token_ids) == 40


def test_full_pass_makes_the_cache_exact(tiny_model_dir):
    """After a full pass over a slim backlog, the paged cache equals a plain prefill's."""
    eng = make_engine(tiny_model_dir, spec={"mode": "three_tier", "accept_threshold": 0.0, "escalate_threshold": 0.0,
                                            "bonus_confidence": 0.0, "controller": False, "max_slim_backlog": 6,
                                            "slim_confidence": 0.0})
    prompt = PROMPTS[3]
    eng.add_request(GenerationRequest("x", tuple(prompt), SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
                                      SpecParams(mode="three_tier")))
    seq = eng.seqs["x"]
    checked = 0
    while not seq.finished and checked < 3:
        before = seq.usage.full_passes
        eng.step()
        backlog_cleared = seq.usage.full_passes > before and seq.usage.slim_passes > 0
        if backlog_cleared and not seq.finished:
            n = seq.full_frontier
            ref = make_engine(tiny_model_dir, spec={"mode": "off"})
            table = ref.cache.new_table()
            table.ensure(ref.cache.pool, n)
            ref.runner.forward([Chunk(table, 0, seq.token_ids[:n], 1)])
            a, b = seq.table.slots(0, n), table.slots(0, n)
            for layer in range(eng.model.cfg.num_layers):
                torch.testing.assert_close(eng.cache.k[layer][a], ref.cache.k[layer][b], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(eng.cache.v[layer][a], ref.cache.v[layer][b], rtol=1e-5, atol=1e-5)
            table.release(ref.cache.pool)
            checked += 1
    assert checked > 0
    eng.abort("x")
    assert_pool_full(eng)


@pytest.mark.parametrize("mode", ["binary", "three_tier"])
def test_preemption_and_abort_leak_nothing_in_spec_modes(tiny_model_dir, mode):
    eng = make_engine(tiny_model_dir, spec={"mode": mode}, block_size=4, num_blocks=40, prefill_chunk=8,
                      max_num_batched_tokens=48)
    reqs = greedy_requests(PROMPTS, 40, mode=mode, ignore_eos=True)
    ref = make_engine(tiny_model_dir, spec={"mode": "off"})
    off = [r.token_ids for r in ref.generate(greedy_requests(PROMPTS, 40, mode="off", ignore_eos=True))]
    got = [r.token_ids for r in outputs(eng, reqs)]
    if mode == "binary":
        assert got == off
    assert eng.stats().preemptions > 0
    for r in greedy_requests(PROMPTS, 40, mode=mode, ignore_eos=True, prefix="z"):
        eng.add_request(r)
    for _ in range(4):
        eng.step()
    for r in list(eng.seqs):
        eng.abort(r)
    assert_pool_full(eng)


def test_sampled_binary_follows_the_target_distribution(tiny_model_dir):
    """Chi-square goodness of fit of the first two sampled tokens (16 cells, top-k 4) against
    the target's exact joint distribution; the `self` drafter proposes, so drafts get rejected
    and the residual path runs. Significance level 0.001 (critical value 37.70 for 15 d.o.f.)."""
    from transformers import AutoModelForCausalLM

    prompt = PROMPTS[0]
    temp, k = 1.5, 4
    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)

    def dist(ids):
        with torch.inference_mode():
            logits = m(torch.tensor([ids])).logits[0, -1] / temp
        top = logits.topk(k)
        return dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist()))

    p1 = dist(prompt)
    joint = {(a, b): pa * pb for a, pa in p1.items() for b, pb in dist(prompt + [a]).items()}
    # every draft verified: at 256 sequences a pass the draft-length choice, which weighs the
    # batch's drafts together, verifies none, and this test is about the sampling rule
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "self", "draft_token_budget": 10**6,
                                            "adaptive_draft": False}, max_num_seqs=256)
    eng.spec.drafter.min_confidence = 0.0
    n = 2000
    reqs = [GenerationRequest(f"s{i}", tuple(prompt), SamplingParams(max_tokens=2, temperature=temp, top_k=k, seed=i,
                                                                      ignore_eos=True), SpecParams(mode="binary"))
            for i in range(n)]
    res = outputs(eng, reqs)
    assert sum(r.via_sd.draft_tokens for r in res) > n // 2
    counts: dict = {}
    for r in res:
        key = tuple(r.token_ids)
        assert key in joint
        counts[key] = counts.get(key, 0) + 1
    chi2 = sum((counts.get(c, 0) - n * p) ** 2 / (n * p) for c, p in joint.items())
    assert chi2 < 37.70, chi2


def test_wide_batches_decode_plainly_with_the_same_output(tiny_model_dir):
    """Above `spec_max_batch` decoding sequences a step is plain decoding: no drafts, same tokens."""
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [4, 5, 4, 5, 4, 5], [7, 7, 7, 7], [9, 8, 9, 8, 9]]
    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "ngram", "spec_max_batch": 2})
    wide = eng.generate(greedy_requests(prompts, 16, "binary", prefix="w"))
    off = eng.generate(greedy_requests(prompts, 16, "off", prefix="o"))
    assert [r.token_ids for r in wide] == [r.token_ids for r in off]
    alone = eng.generate(greedy_requests(prompts[:1], 16, "binary", prefix="a"))[0]
    assert alone.token_ids == off[0].token_ids and alone.via_sd.draft_tokens > 0
    # four sequences decode together until the first ones finish: fewer drafts than alone
    assert wide[0].via_sd.draft_tokens < alone.via_sd.draft_tokens
    for r in wide + [alone]:  # a plain step of a speculative request is a step and a full pass too
        u = r.via_sd
        assert u.steps == u.full_passes == len(r.token_ids) - u.accepted
    assert_pool_full(eng)


def test_draft_slots_are_reserved_only_for_steps_that_speculate(tiny_model_dir):
    """The scheduler reserves draft slots (token budget and KV) for at most `spec_max_batch`
    decoding sequences, and none when more decode: a wide plain step keeps its budget for prefills."""
    from server.engine.api import GenerationRequest
    from server.engine.config import SamplingParams, SpecParams

    eng = make_engine(tiny_model_dir, spec={"mode": "binary", "drafter": "ngram", "spec_max_batch": 1})
    for i in range(3):
        eng.add_request(GenerationRequest(f"r{i}", (1, 2, 3, 1, 2, 3), SamplingParams(max_tokens=12, temperature=0.0),
                                          SpecParams(mode="binary")))
    eng.step()  # the three prefills
    plans = eng.scheduler.schedule()
    assert len(plans) == 3 and all(p.decode for p in plans)
    assert [p.lookahead for p in plans] == [0, 0, 0]  # three decode: the step will be plain
    eng.abort("r1")
    eng.abort("r2")
    plans = eng.scheduler.schedule()
    assert [p.lookahead for p in plans] == [eng.max_lookahead]  # one left: it may speculate
    eng.abort("r0")
    assert_pool_full(eng)
