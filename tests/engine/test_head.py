"""The `head` drafter: the layer's shapes, the reduced vocabulary, the chained drafting loop and its
agreement with the chained training forward, losslessness of `binary` with it, the training
command end to end (tiny model), and the shipped head on the real model (marked `real_model`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.bench.prompts import SPEC_BENCH_FILE
from server.engine.api import GenerationRequest
from server.engine.config import EngineConfig, SamplingParams, SpecConfig, SpecParams
import server.engine.drafters.head as head_mod
from server.engine.drafters.head import (DraftHead, HeadDrafter, accepted_lengths, draft, kernel_draft, kernel_ready,
                                         shipped_head_path)
from server.engine.drafters.train_head import reduced_vocabulary, to_reduced, unrolled_outputs, walk
from server.engine.engine import LLMEngine
from via_sd_kernels import cpu as cpu_kernels

ASSETS = Path(__file__).resolve().parents[2] / "server" / "engine" / "assets"
RECORD = ASSETS / "SmolLM2-135M-Instruct.head.json"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from server.engine.testing import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tinyhead") / "tiny-llama", num_layers=4)


def random_head(hidden: int, vocab: int, seed: int = 0, ffn: int = 96, reduced: int = 128, window: int = 6) -> DraftHead:
    torch.manual_seed(seed)
    ids = torch.randperm(vocab)[:reduced].sort().values
    head = DraftHead(hidden, ffn, ids, heads=4, window=window)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return head.eval()


@pytest.fixture(scope="module")
def tiny_head_path(tiny_dir, tmp_path_factory):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    head = random_head(cfg["hidden_size"], cfg["vocab_size"])
    path = tmp_path_factory.mktemp("heads") / "tiny.head.safetensors"
    head.save(path, {"threshold": 0.0, "min_tokens": 1})
    return path


def engine_with_head(model_dir, head_path, mode="binary", **kw) -> LLMEngine:
    # every draft verified: the random tiny head's drafts are too unlikely to pay for their place
    # (draft_length), and these tests are about drafting
    kw.setdefault("adaptive_draft", False)
    kw.setdefault("spec_max_batch", 10**6)
    spec = SpecConfig(mode=mode, drafter="head", head_path=str(head_path), **kw)
    return LLMEngine(EngineConfig(model=str(model_dir), spec=spec, num_blocks=128))


def run_greedy(engine: LLMEngine, prompts, max_tokens: int, mode: str):
    reqs = [GenerationRequest(f"{mode}{i}", tuple(p), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                              SpecParams(mode=mode)) for i, p in enumerate(prompts)]
    return engine.generate(reqs)


# ------------------------------------------------------------------ the block
def window_of(h, x, t, W):
    """The drafter's inputs for committed position t of one answer: the last W pairs, left padded."""
    lo = max(0, t - W + 1)
    n = t + 1 - lo
    hh = torch.zeros(1, W, h.shape[-1])
    xx = torch.zeros(1, W, dtype=torch.int64)
    valid = torch.zeros(1, W, dtype=torch.bool)
    hh[0, W - n:], xx[0, W - n:], valid[0, W - n:] = h[lo:t + 1], x[lo:t + 1], True
    return hh, xx, torch.arange(t - W + 1, t + 1)[None], valid


def test_head_forward_shapes_and_determinism():
    V, H = 300, 64
    embed = torch.randn(V, H)
    a = random_head(H, V, seed=1).attach(embed, embed)
    b = random_head(H, V, seed=1).attach(embed, embed)
    h = torch.randn(3, 6, H)
    tok = torch.randint(0, V, (3, 6))
    pos = torch.arange(10, 16).expand(3, 6)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, :4] = False  # a shorter history, left padded
    with torch.no_grad():
        z = a.fuse(h, tok)
        q, k, v = a.project(z, pos)
        assert z.shape == (3, 6, H) and q.shape == k.shape == v.shape == (3, 4, 6, H // 4)
        ids, probs = draft(a, h, tok, pos, valid, 4)
        ids_b, probs_b = draft(b, h, tok, pos, valid, 4)
    assert ids.shape == probs.shape == (3, 4)
    assert torch.equal(ids, ids_b) and torch.equal(probs, probs_b)  # same seed, same weights
    assert set(ids.flatten().tolist()) <= set(a.reduced_ids.tolist())  # drafts come from the reduced vocabulary
    assert ((probs > 0) & (probs <= 1)).all()
    with torch.no_grad():  # padding is invisible: row 1 alone, without its padded slots, drafts the same
        alone, _ = draft(a, h[1:2, 4:], tok[1:2, 4:], pos[1:2, 4:], valid[1:2, 4:], 4)
    assert torch.equal(alone[0], ids[1])


def test_drafting_matches_the_chained_training_forward():
    """Level u of the training forward at position t+u is the u-th draft from committed position
    t, when the drafted tokens are fed as the true ones: training sees what drafting computes."""
    V, H, W, T = 200, 64, 6, 14
    embed = torch.randn(V, H)
    head = random_head(H, V, seed=3, window=W).attach(embed, embed)
    torch.manual_seed(4)
    h, x = torch.randn(T, H), torch.randint(0, V, (T,))
    t, steps = 8, 3
    with torch.no_grad():
        ids, _ = draft(head, *window_of(h, x, t, W), steps)
        x2 = x.clone()
        x2[t + 1:t + steps] = ids[0, :steps - 1]  # the drafts become the pairs' tokens
        outs = unrolled_outputs(head, h[None], x2[None], torch.ones(1, T, dtype=torch.bool), steps)
    for u in range(steps):
        pred = head.reduced_ids[head.logits(outs[u][0, t + u]).argmax()]
        assert int(pred) == int(ids[0, u]), u


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels not built on this host")


def torch_draft(head, *args, **kw):
    """`draft` on torch ops alone (the reference the kernel reproduces)."""
    was, head_mod.HEAD_KERNEL = head_mod.HEAD_KERNEL, False
    try:
        return draft(head, *args, **kw)
    finally:
        head_mod.HEAD_KERNEL = was


@needs_kernels
@pytest.mark.parametrize("fmt", ["fp32", "fp16", "q8_0"])
def test_kernel_drafting_matches_torch_ops(fmt):
    """The one-call kernel drafts the torch ops' tokens with their probabilities, for ragged,
    left-padded batches, early stops, fp16 matrices (widened exactly, as `_matmul` does) and Q8_0
    blocks (against the torch ops over the fp32 matrices they encode)."""
    from via_sd_kernels.cpu.blocks import quantize_q8_0, unpack_q8_0

    V, H, W = 300, 64, 6
    embed = torch.randn(V, H)
    head = random_head(H, V, seed=5, window=W).attach(embed, embed)
    ref = random_head(H, V, seed=5, window=W).attach(embed, embed)
    mods = ("fc", "qkv", "o", "gate_up", "down")
    if fmt == "fp16":
        for m in mods:
            getattr(head, m).weight.data = getattr(head, m).weight.data.half()
        head.out_embed = head.out_embed.half()
        ref = head
    elif fmt == "q8_0":
        for m in mods:
            q = quantize_q8_0(getattr(head, m).weight.data)
            getattr(head, m).weight = torch.nn.Parameter(q, requires_grad=False)
            getattr(ref, m).weight.data = unpack_q8_0(q, getattr(ref, m).weight.shape[1])
        head.out_embed = quantize_q8_0(head.out_embed)
        ref.out_embed = unpack_q8_0(head.out_embed, H)
        assert not torch.equal(ref.fc.weight, random_head(H, V, seed=5, window=W).fc.weight)  # rounded
    else:
        ref = head
    with torch.no_grad():
        assert kernel_ready(head, torch.zeros(1, 1, H))
    assert head.kernel_mats()[0].dtype == {"fp32": torch.float32, "fp16": torch.float16, "q8_0": torch.int8}[fmt]
    g = torch.Generator().manual_seed(6)
    for B, T, steps, stop in [(1, 6, 5, None), (3, 6, 4, None), (4, 3, 6, 0.05), (5, 6, 8, 0.02), (2, 1, 3, None)]:
        h = torch.randn(B, T, H, generator=g)
        tok = torch.randint(0, V, (B, T), generator=g)
        pos = torch.arange(20, 20 + T).expand(B, T).clone()
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[0, : T // 2] = False  # a shorter history, left padded
        with torch.no_grad():
            ids, probs = draft(head, h, tok, pos, valid, steps, stop, 1)
            ref_ids, ref_probs = torch_draft(ref, h, tok, pos, valid, steps, stop, 1)
        assert torch.equal(ids, ref_ids), (B, T, steps, stop)
        assert torch.allclose(probs, ref_probs, atol=2e-5, rtol=1e-4)
        if stop is None:
            assert ids.shape == (B, steps)


@needs_kernels
def test_kernel_drafting_reuses_the_keys_and_values_it_returned():
    """Keys and values returned for the earlier pairs, passed back as `old`, give the drafts of
    the whole window recomputed: what the drafter keeps between steps."""
    V, H, W, T = 300, 64, 8, 7
    embed = torch.randn(V, H)
    head = random_head(H, V, seed=7, window=W).attach(embed, embed)
    g = torch.Generator().manual_seed(8)
    B = 3
    h = torch.randn(B, T, H, generator=g)
    tok = torch.randint(0, V, (B, T), generator=g)
    pos = torch.arange(40, 40 + T).expand(B, T).clone()
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[2, :3] = False
    none = torch.zeros(B, 0, dtype=torch.int64)
    with torch.no_grad():
        ids, probs, kv = kernel_draft(head, (torch.zeros(B, 0, 2, H), none, none.bool()), (h, tok, pos, valid), 4)
        assert kv.shape == (B, T, 2, H)
        c = 4  # the first c pairs from `kv`, the rest computed
        ids2, probs2, kv2 = kernel_draft(head, (kv[:, :c], pos[:, :c], valid[:, :c]),
                                         (h[:, c:], tok[:, c:], pos[:, c:], valid[:, c:]), 4)
    assert torch.equal(ids, ids2) and torch.equal(probs, probs2)
    assert torch.equal(kv2, kv[:, c:])


def cost_lines():
    """Relative pass costs r(1) .. r(9): straight lines of several slopes and a measured-looking table."""
    lines = [[1.0 + a * (n - 1) for n in range(1, 10)] for a in (0.02, 0.12, 0.3, 0.7)]
    lines.append([1.0, 1.11, 1.23, 1.40, 1.66, 1.87, 2.4, 2.6, 2.9])
    return lines


@pytest.mark.parametrize("kernel", [False, True])
def test_drafting_stops_where_no_longer_draft_would_be_kept(kernel):
    """Given the cost line verification trims by, the head stops drafting a row where no longer
    draft could be kept (`best_length`), even were every later token certain: the drafts it makes
    are a prefix of the unpriced ones, verification keeps the same number of them, and on some
    lines it drafts fewer. The kernel stops where the torch ops do."""
    from server.engine.draft_length import best_length

    if kernel and not cpu_kernels.available():
        pytest.skip("CPU kernels not built on this host")
    V, H, W, T, steps = 300, 64, 6, 5, 8
    embed = torch.randn(V, H) * 3  # sharper distributions: probabilities over the whole range
    head = random_head(H, V, seed=11, window=W).attach(embed, embed)
    run = draft if kernel else torch_draft
    g = torch.Generator().manual_seed(12)
    shorter = 0
    for trial in range(12):
        B = 1 if trial % 3 else 3
        h = torch.randn(B, T, H, generator=g)
        tok = torch.randint(0, V, (B, T), generator=g)
        pos = torch.arange(10, 10 + T).expand(B, T).clone()
        valid = torch.ones(B, T, dtype=torch.bool)
        with torch.no_grad():
            full_ids, full_p = run(head, h, tok, pos, valid, steps, None, 1)
        for costs in cost_lines():
            line = costs.__getitem__
            with torch.no_grad():
                ids, p = run(head, h, tok, pos, valid, steps, None, 1, costs)
            S = ids.shape[1]
            assert 1 <= S <= steps and torch.equal(ids, full_ids[:, :S]) and torch.equal(p, full_p[:, :S])
            for b in range(B):
                keep = best_length(full_p[b].tolist(), lambda n: line(n - 1))
                assert best_length(p[b].tolist(), lambda n: line(n - 1)) == keep <= S, (trial, costs, b)
            if kernel:
                with torch.no_grad():
                    assert torch.equal(torch_draft(head, h, tok, pos, valid, steps, None, 1, costs)[0], ids)
            shorter += S < steps
    assert shorter > 10  # the rule cuts drafting short on many of the 60 (draft, line) pairs


def test_engine_prices_a_lone_sequences_head_drafts_and_keeps_the_same_ones(tiny_dir, tiny_head_path):
    """In the engine, a lone speculating sequence's head drafts stop at the line its verification
    trims by: the same drafts verified and the same text as drafting every token, in fewer head
    steps."""
    prompts = [[1, 2, 3, 4, 5], [10, 20, 30], list(range(40, 70))]
    runs = {}
    for priced in (True, False):
        eng = engine_with_head(tiny_dir, tiny_head_path, adaptive_draft=True, spec_max_batch=1, head_min_gain=0.0)
        # one line for both, not timings; flat, so that the random head's unlikely drafts pay at times
        eng.pass_costs.relative = lambda n: 1.0 + 0.004 * (n - 1)
        if not priced:
            eng.spec._trim_line = lambda scheduled: None
        steps = []

        def counting(fn):
            def wrapped(*a, **k):
                out = fn(*a, **k)
                steps.append(out[0].shape[1])
                return out
            return wrapped

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(head_mod, "kernel_draft", counting(head_mod.kernel_draft))
            mp.setattr(head_mod, "draft", counting(head_mod.draft))
            outs = [run_greedy(eng, [p], 24, "binary")[0] for p in prompts]  # one at a time: alone
        runs[priced] = ([o.token_ids for o in outs], [o.via_sd.draft_tokens for o in outs],
                        [o.via_sd.accepted for o in outs], sum(steps))
        pool = eng.cache.pool
        assert pool.num_free == pool.num_usable
    assert runs[True][:3] == runs[False][:3]
    assert sum(runs[True][1]) > 0  # drafts were verified
    assert runs[True][3] < runs[False][3]  # in fewer head steps


def test_save_load_roundtrip(tmp_path):
    V, H = 300, 64
    head = random_head(H, V, seed=2)
    head.save(tmp_path / "h.safetensors", {"threshold": 0.35})
    back, info = DraftHead.load(tmp_path / "h.safetensors")
    assert info["threshold"] == 0.35 and info["hidden"] == H
    assert torch.equal(back.reduced_ids, head.reduced_ids)
    for (k, v), (k2, v2) in zip(head.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.allclose(v.half().float(), v2)  # stored in fp16


def test_accepted_lengths_threshold_and_cap():
    probs = torch.tensor([[0.9, 0.8, 0.2, 0.9],
                          [0.1, 0.9, 0.9, 0.9],
                          [0.9, 0.9, 0.9, 0.9]])
    assert accepted_lengths(probs, torch.tensor([4, 4, 2]), 0.5, 0).tolist() == [2, 0, 2]
    assert accepted_lengths(probs, torch.tensor([4, 4, 2]), 0.5, 1).tolist() == [2, 1, 2]  # first token always
    # compared in fp32, as torch and the kernel's stop compare: 0.7's nearest fp32 value lies below
    # 0.7, and passes a threshold of 0.7
    p = torch.tensor([[0.7, 0.8]], dtype=torch.float32)
    assert float(p[0, 0]) < 0.7 and bool(p[0, 0] >= 0.7)
    assert accepted_lengths(p, torch.tensor([2]), 0.7, 0).tolist() == [2]
    assert accepted_lengths(torch.tensor([[0.6999, 0.9]]), torch.tensor([2]), 0.7, 0).tolist() == [0]


# ------------------------------------------------------------------ reduced vocabulary
def test_reduced_vocabulary_is_most_frequent_with_eos():
    seqs = [{"greedy": torch.tensor([5, 5, 5, 9, 9, 1, 7])}, {"greedy": torch.tensor([9, 5, 2])}]
    red = reduced_vocabulary(seqs, 3, always=(100,))
    assert red.tolist() == [5, 9, 100]  # 5 (x4), 9 (x3), and EOS
    idx = to_reduced(torch.tensor([5, 9, 100, 7]), red, 128)
    assert idx.tolist() == [0, 1, 2, -100]
    assert red[idx[:3]].tolist() == [5, 9, 100]  # reduced -> full is the inverse


# ------------------------------------------------------------------ the drafter in the engine
@needs_kernels
@pytest.mark.parametrize("fmt,dtype", [("q8_0", torch.int8), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_drafter_keeps_its_matrices_in_the_chosen_form(tiny_dir, tiny_head_path, monkeypatch, fmt, dtype):
    """Q8_0 blocks by default (VIA_SD_HEAD_WEIGHTS), each form drafting in one kernel call."""
    if fmt == "q8_0":
        assert head_mod.HEAD_WEIGHTS == "q8_0"  # the default
    monkeypatch.setattr(head_mod, "HEAD_WEIGHTS", fmt)
    eng = engine_with_head(tiny_dir, tiny_head_path, head_min_gain=0.0)
    mats = eng.spec.drafter.head.kernel_mats()
    assert mats is not None and {m.dtype for m in mats} == {dtype}
    seq = eng.add_request(GenerationRequest("a", (1, 2, 3, 4), SamplingParams(max_tokens=12, temperature=0.0,
                                                                               ignore_eos=True)))
    while eng.has_unfinished():
        eng.step()
    assert seq.num_tokens == 16 and seq.usage.draft_tokens > 0


def test_drafter_proposes_after_observe_only(tiny_dir, tiny_head_path):
    eng = engine_with_head(tiny_dir, tiny_head_path, head_min_gain=0.0)  # pacing: its own test
    drafter = eng.spec.drafter
    assert isinstance(drafter, HeadDrafter) and drafter.wants_hidden
    seq = eng.add_request(GenerationRequest("a", (1, 2, 3, 4), SamplingParams(max_tokens=8, temperature=0.0)))
    assert drafter.propose([seq], [4]).tokens == [[]]  # no hidden state yet: nothing to propose
    H = eng.model.cfg.hidden_size
    drafter.observe(seq, torch.randn(1, H), [5])
    assert drafter.propose([seq], [4]).tokens == [[]]  # the step's tokens are not committed yet
    seq.token_ids.append(5)
    d1 = drafter.propose([seq], [4]).tokens[0]
    d2 = drafter.propose([seq], [4]).tokens[0]
    assert 1 <= len(d1) <= 4 and d1 == d2  # deterministic
    assert all(0 <= t < eng.model.cfg.vocab_size for t in d1)
    assert drafter.propose([seq], [0]).tokens == [[]]
    # a step committing three tokens appends three pairs; the window keeps the newest
    drafter.observe(seq, torch.randn(3, H), [6, 7, 8])
    seq.token_ids.extend([6, 7, 8])
    st = seq.drafter_state
    assert st.tokens.tolist() == [5, 6, 7, 8] and st.hidden.shape == (4, H) and st.end == seq.num_tokens
    for t in range(9, 20):
        drafter.observe(seq, torch.randn(1, H), [t])
        seq.token_ids.append(t)
    assert seq.drafter_state.tokens.tolist() == list(range(20 - drafter.head.window, 20))
    assert len(drafter.propose([seq], [4]).tokens[0]) >= 1
    drafter.release(seq)
    assert drafter.propose([seq], [4]).tokens == [[]]
    eng.abort("a")


def test_drafting_sits_out_a_sequence_whose_drafts_are_not_kept(tiny_dir, tiny_head_path):
    """Drafts never kept: the head sits the sequence out for 1, 2, 4 ... steps; kept again: it
    drafts every step."""
    eng = engine_with_head(tiny_dir, tiny_head_path)
    drafter = eng.spec.drafter
    assert drafter.min_gain == pytest.approx(0.3)
    H = eng.model.cfg.hidden_size
    seq = eng.add_request(GenerationRequest("p", (1, 2, 3, 4), SamplingParams(max_tokens=200, temperature=0.0)))

    def step(keep: bool) -> bool:
        d = drafter.propose([seq], [4]).tokens[0]
        toks = (d[:1] if keep and d else []) + [(d[0] + 1) % 200 if d and not keep else 7]
        drafter.observe(seq, torch.randn(len(toks), H), toks)
        seq.token_ids.extend(toks)
        return bool(d)

    drafter.observe(seq, torch.randn(1, H), [5])
    seq.token_ids.append(5)
    drafted = [step(keep=False) for _ in range(16)]
    # drafted, then sits out 1, drafts, sits out 2, drafts, sits out 4, ...
    assert drafted[:9] == [True, False, True, False, False, True, False, False, False]
    assert sum(drafted) <= 5
    while seq.drafter_state.pace.skip:
        step(keep=True)
    kept = [step(keep=True) for _ in range(12)]
    assert sum(kept) >= 9  # the gain recovers above the floor and drafting resumes every step
    assert all(kept[-4:])
    eng.abort("p")


def test_binary_with_head_equals_off(tiny_dir, tiny_head_path):
    prompts = [[1, 2, 3, 4, 5], [10, 20, 30], list(range(40, 70))]
    eng = engine_with_head(tiny_dir, tiny_head_path)
    off = run_greedy(eng, prompts, 16, "off")
    binary = run_greedy(eng, prompts, 16, "binary")
    assert [o.token_ids for o in off] == [b.token_ids for b in binary]
    assert sum(b.via_sd.draft_tokens for b in binary) > 0  # the head drafted
    three = run_greedy(eng, prompts, 16, "three_tier")
    assert all(len(t.token_ids) == 16 for t in three)
    pool = eng.cache.pool
    assert pool.num_free == pool.num_usable


@needs_kernels
@pytest.mark.parametrize("priced", [False, True])
def test_drafter_with_kept_keys_and_values_drafts_as_the_torch_ops(tiny_dir, tiny_head_path, monkeypatch, priced):
    """Over a whole generation (windows that fill, slide and take several tokens at once), the
    drafter's kernel path with its kept keys and values proposes what the torch ops propose from
    the full window; priced: one sequence at a time, drafts stopped by the trimming line."""
    prompts = [[1, 2, 3, 4, 5], [10, 20, 30], list(range(40, 70))]
    eng = engine_with_head(tiny_dir, tiny_head_path, **(dict(adaptive_draft=True, spec_max_batch=1, head_min_gain=0.0)
                                                        if priced else {}))
    if priced:
        eng.pass_costs.relative = lambda n: 1.0 + 0.004 * (n - 1)
    drafter = eng.spec.drafter
    seen: list[tuple[list[int], list[int]]] = []
    propose = drafter.propose

    def both(seqs, max_tokens, pass_cost=None):
        states = [s.drafter_state for s in seqs]
        ref = [[] for _ in seqs]
        rows = [i for i, (s, k) in enumerate(zip(seqs, max_tokens)) if k > 0 and isinstance(s.drafter_state, head_mod._HeadState)
                and s.drafter_state.end == s.num_tokens and s.drafter_state.pace.skip == 0]
        if rows:
            st = [states[i] for i in rows]
            h, tok, pos, valid = head_mod.pack_windows([(x.hidden, x.tokens, x.end - 2) for x in st],
                                                       max(len(x.tokens) for x in st))
            ks = torch.tensor([max_tokens[i] for i in rows])
            steps = int(ks.max())
            costs = [pass_cost(n) for n in range(1, steps + 2)] if pass_cost is not None else None
            ids, probs = torch_draft(drafter.head, h, tok, pos, valid, steps, drafter.threshold, drafter.min_tokens,
                                     costs)
            n = accepted_lengths(probs, ks, drafter.threshold, drafter.min_tokens)
            for r, i in enumerate(rows):
                ref[i] = ids[r, : int(n[r])].tolist()
        out = propose(seqs, max_tokens, pass_cost)
        seen.extend(zip(out.tokens, ref))
        return out

    monkeypatch.setattr(drafter, "propose", both)
    if priced:
        for p in prompts:
            run_greedy(eng, [p], 40, "binary")
    else:
        run_greedy(eng, prompts, 40, "binary")
    assert len(seen) > 20 and sum(1 for a, _ in seen if a) > 10
    assert all(a == b for a, b in seen)


def test_hybrid_drafts_by_lookup_where_the_context_repeats_and_by_the_head_elsewhere(tiny_dir, tiny_head_path):
    from server.engine.drafters.hybrid import HybridDrafter

    spec = SpecConfig(mode="binary", drafter="hybrid", head_path=str(tiny_head_path), spec_max_batch=10**6)
    eng = LLMEngine(EngineConfig(model=str(tiny_dir), spec=spec, num_blocks=128))
    hyb = eng.spec.drafter
    assert isinstance(hyb, HybridDrafter) and hyb.wants_hidden and hyb.n_min == 2
    H = eng.model.cfg.hidden_size
    rep = eng.add_request(GenerationRequest("rep", (7, 8, 9, 10, 11, 7), SamplingParams(max_tokens=8, temperature=0.0)))
    new = eng.add_request(GenerationRequest("new", (1, 2, 3, 4), SamplingParams(max_tokens=8, temperature=0.0)))
    for s, t in ((rep, 8), (new, 5)):
        hyb.observe(s, torch.randn(1, H), [t])
        s.token_ids.append(t)
    out = hyb.propose([rep, new], [3, 3]).tokens
    assert out[0] == [9, 10, 11]  # the context ends in "7 8", seen before: copy what followed it
    assert out[1] == hyb.head.propose([new], [3]).tokens[0] and 1 <= len(out[1]) <= 3  # nothing repeats: the head
    assert (hyb.lookups, hyb.head_calls) == (1, 1)
    assert hyb.propose([rep, new], [0, 2]).tokens[0] == []
    eng.abort("rep")
    eng.abort("new")
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [10, 20, 30], list(range(40, 70))]
    off = run_greedy(eng, prompts, 16, "off")
    binary = run_greedy(eng, prompts, 16, "binary")
    assert [o.token_ids for o in off] == [b.token_ids for b in binary]
    assert hyb.lookups > 1 and hyb.head_calls > 2  # both parts drafted in the engine's steps
    assert eng.cache.pool.num_free == eng.cache.pool.num_usable


def test_hybrid_without_a_head_drafts_by_lookup_alone(tiny_dir):
    eng = LLMEngine(EngineConfig(model=str(tiny_dir), spec=SpecConfig(mode="binary", drafter="hybrid", spec_max_batch=10**6),
                                 num_blocks=128))
    hyb = eng.spec.drafter
    assert hyb.head is None and not hyb.wants_hidden and hyb.n_min == eng.config.spec.ngram_min
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [10, 20, 30]]
    off = run_greedy(eng, prompts, 12, "off")
    binary = run_greedy(eng, prompts, 12, "binary")
    assert [o.token_ids for o in off] == [b.token_ids for b in binary]
    assert hyb.lookups > 0 and hyb.head_calls == 0


def test_plain_steps_keep_the_head_window_current(tiny_dir, tiny_head_path):
    """Steps that decode plainly (a wide batch) still feed the head every committed token, so
    drafting can resume at once when the batch narrows, from the true recent pairs."""
    from dataclasses import replace

    eng = engine_with_head(tiny_dir, tiny_head_path)
    eng.config = replace(eng.config, spec=replace(eng.config.spec, spec_max_batch=1))
    seqs = [eng.add_request(GenerationRequest(f"r{i}", tuple(range(5 + i, 12 + i)),
                                              SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                                              SpecParams(mode="binary"))) for i in range(2)]
    for _ in range(6):
        eng.step()
    assert eng.stats_.draft_tokens == 0  # two decoding sequences > spec_max_batch: plain steps only
    for s in seqs:
        st = s.drafter_state
        n = len(st.tokens)
        assert st.end == s.num_tokens and 1 <= n <= eng.spec.drafter.head.window
        assert st.tokens.tolist() == s.token_ids[-n:]  # the pairs' tokens are the committed ones
    eng.abort("r1")
    eng.step()
    assert eng.stats_.draft_tokens > 0  # one sequence left: it drafts on the next step
    while eng.has_unfinished():
        eng.step()
    assert eng.cache.pool.num_free == eng.cache.pool.num_usable


def test_missing_head_is_a_clear_error(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="train-head"):
        LLMEngine(EngineConfig(model=str(tiny_dir), spec=SpecConfig(mode="binary", drafter="head"), num_blocks=16))
    # hybrid without a head of the model's drafts by lookup alone; a head named that is missing is an error
    eng = LLMEngine(EngineConfig(model=str(tiny_dir), spec=SpecConfig(mode="binary", drafter="hybrid"), num_blocks=16))
    assert eng.spec.drafter.head is None
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="missing file"):
        LLMEngine(EngineConfig(model=str(tiny_dir), spec=SpecConfig(mode="binary", drafter="hybrid", head_path=missing),
                               num_blocks=16))


def test_wrong_hidden_size_is_rejected(tiny_dir, tmp_path):
    random_head(32, 100).save(tmp_path / "bad.safetensors", {})
    with pytest.raises(ValueError, match="hidden size"):
        engine_with_head(tiny_dir, tmp_path / "bad.safetensors")


def test_walk_steps_through_an_answer_as_the_engine_does():
    # one answer of 6 starts: from 0 two drafts kept (3 tokens), from 3 none, from 4 all the rest
    kept = torch.tensor([2, 0, 0, 0, 5, 1])
    drafted = torch.tensor([3, 3, 3, 1, 5, 2])
    assert walk(kept, drafted, [(0, 6)]) == (6 / 3, (3 + 1 + 5) / 3)  # steps from 0, 3 and 4
    # the mean over start positions counts the stretch from 4 once; the walk sees every step
    assert walk(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long), [(0, 4)]) == (1.0, 1.0)
    # two answers, each walked from its own first start
    assert walk(torch.tensor([1, 0, 9, 0]), torch.tensor([2, 2, 2, 2]), [(0, 2), (2, 2)]) == (4 / 2, 2.0)


# ------------------------------------------------------------------ training prompts


def test_builtin_prompts_are_deterministic_unique_and_not_spec_bench():
    from server.engine.drafters.train_head import builtin_prompts

    a, b = builtin_prompts(0), builtin_prompts(0)
    assert a == b and a != builtin_prompts(1)
    assert len({r["id"] for r in a}) == len(a)
    first = [r for r in a if r["id"] < 20_000]
    assert len(first) == 1544 and a[:1544] == first  # `--limit-prompts 1544` is the first set alone
    second = {r["prompt"] for r in a[1544:]}
    assert len(second) == len(a) - 1544 > 1000 and not second & {r["prompt"] for r in first}
    if SPEC_BENCH_FILE.exists():
        questions = {t for line in SPEC_BENCH_FILE.read_text().splitlines() if line.strip()
                     for t in json.loads(line)["turns"]}
        assert not questions & {r["prompt"] for r in a}


def test_adding_a_set_of_prompts_keeps_the_earlier_held_out_split():
    from server.engine.drafters.train_head import split_by_prompt

    first = [{"prompt_id": i} for i in list(range(200)) + list(range(10_000, 10_900))]
    second = [{"prompt_id": i} for i in range(20_000, 21_000)]
    _, held_first = split_by_prompt(first, 0.1, 0)
    train, held = split_by_prompt(first + second, 0.1, 0)
    ids = {s["prompt_id"] for s in held}
    assert {s["prompt_id"] for s in held_first} == {i for i in ids if i < 20_000}
    assert len(ids) == 110 + 100 and not ids & {s["prompt_id"] for s in train}
    # another seed holds out other prompts
    assert {s["prompt_id"] for s in split_by_prompt(first + second, 0.1, 1)[1]} != ids


def test_third_prompts_are_new_deterministic_and_named_sets_join():
    from server.engine.drafters.train_head import THIRD_START, builtin_prompts, named_prompts, split_by_prompt
    from server.engine.drafters.train_prompts import third_prompts

    a = third_prompts(0, start_id=THIRD_START)
    assert a == third_prompts(0, start_id=THIRD_START) and a != third_prompts(1, start_id=THIRD_START)
    assert [r["id"] for r in a] == list(range(THIRD_START, THIRD_START + len(a))) and len(a) > 1400
    assert len({r["prompt"] for r in a}) == len(a)
    builtin = builtin_prompts(0)
    assert not {r["prompt"] for r in a} & {r["prompt"] for r in builtin}  # new instructions, not the shipped ones
    if SPEC_BENCH_FILE.exists():
        questions = {t for line in SPEC_BENCH_FILE.read_text().splitlines() if line.strip()
                     for t in json.loads(line)["turns"]}
        assert not questions & {r["prompt"] for r in a}
    assert named_prompts("third", 0) == a and named_prompts("builtin", 0) == builtin
    assert named_prompts("builtin+third", 0) == builtin + a
    assert named_prompts("prompts.jsonl", 0) is None and named_prompts("builtin+nope", 0) is None
    _, held_first = split_by_prompt([{"prompt_id": r["id"]} for r in builtin], 0.1, 0)
    _, held = split_by_prompt([{"prompt_id": r["id"]} for r in builtin + a], 0.1, 0)
    assert {s["prompt_id"] for s in held if s["prompt_id"] < THIRD_START} == {s["prompt_id"] for s in held_first}
    assert sum(s["prompt_id"] >= THIRD_START for s in held) == round(len(a) * 0.1)


def test_paper_prompts_are_deterministic_passages_of_the_aclsum_papers():
    from server.engine.drafters.train_head import PAPERS_START, split_by_prompt
    from server.engine.drafters.train_prompts import paper_passages, paper_prompts

    passages = paper_passages()
    if not passages:
        pytest.skip("the aclsum package is not installed (make install puts it in)")
    assert len(passages) > 2500
    assert all(150 <= len(p.split()) <= 550 for _, p in passages)
    assert {k for k, _ in passages} == {"introduction", "method", "results", "other"}
    a = paper_prompts(0)
    assert a == paper_prompts(0) and a != paper_prompts(1) and len(a) == len(passages)
    assert [r["id"] for r in a] == list(range(PAPERS_START, PAPERS_START + len(a)))
    # each instruction holds one passage, whole (a sample of 40 against every passage)
    texts = [p for _, p in passages]
    found = [[i for i, p in enumerate(texts) if p in r["prompt"]] for r in a[::72][:40]]
    assert all(len(f) == 1 for f in found) and len({f[0] for f in found}) == len(found)
    assert {r["category"] for r in a} == {"summarization", "rag", "explain", "extraction", "writing"}
    if SPEC_BENCH_FILE.exists():
        questions = {t for line in SPEC_BENCH_FILE.read_text().splitlines() if line.strip()
                     for t in json.loads(line)["turns"]}
        assert not questions & {r["prompt"] for r in a}
    # a set of its own: adding it leaves the earlier sets' held-out prompts where they were
    first = [{"prompt_id": i} for i in list(range(10_000, 10_500)) + list(range(20_000, 20_300))]
    _, held_first = split_by_prompt(first, 0.1, 0)
    _, held = split_by_prompt(first + [{"prompt_id": r["id"]} for r in a], 0.1, 0)
    assert {s["prompt_id"] for s in held if s["prompt_id"] < PAPERS_START} == {s["prompt_id"] for s in held_first}
    assert sum(s["prompt_id"] >= PAPERS_START for s in held) == round(len(a) * 0.1)


def test_paper_prompts_without_the_package_are_refused(monkeypatch):
    import importlib.util

    from server.engine.drafters import train_head

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "aclsum" else real(name, *a))
    with pytest.raises(SystemExit, match="aclsum"):
        train_head.papers_or_exit(0)


# ------------------------------------------------------------------ training, end to end
def test_train_head_command_on_tiny_model(tiny_dir, tmp_path, monkeypatch):
    from server.engine.drafters.train_head import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "category": "t", "prompt": f"say {w}"}) + "\n"
                               for i, w in enumerate(["a", "bb", "ccc", "dddd", "e", "ff"])))
    out = tmp_path / "tiny.head"
    rc = main(["--model", str(tiny_dir), "--prompts", str(prompts), "--max-tokens", "12", "--sampled", "1",
               "--data", str(tmp_path / "d.pt"), "--vocab", "64", "--ffn", "32", "--heads", "4", "--window", "8",
               "--epochs", "2", "--batch-size", "4", "--heldout", "0.34", "--out", str(out)])
    assert rc == 0
    rec = json.loads(Path(str(out) + ".json").read_text())
    assert rec["seed"] == 0 and rec["data"]["answers"] == 12
    assert 0.0 <= rec["heldout"]["top1"] <= 1.0 and 1.0 <= rec["heldout"]["tau"] <= 6.0
    assert 1.0 <= rec["heldout"]["tokens_per_step"] <= 6.0
    eng = engine_with_head(tiny_dir, Path(str(out) + ".safetensors"))
    assert eng.spec.drafter.head.reduced_ids.numel() <= 64 and eng.spec.drafter.head.window == 8
    first, _ = DraftHead.load(Path(str(out) + ".safetensors"))

    # `--init`: training continues from the saved head, whose layout and reduced vocabulary stay
    # (the layout flags given here are not used), and the record says where it started
    more = tmp_path / "more.head"
    rc = main(["--model", str(tiny_dir), "--prompts", str(prompts), "--max-tokens", "12", "--sampled", "1",
               "--data", str(tmp_path / "d.pt"), "--vocab", "32", "--ffn", "16", "--heads", "2", "--window", "4",
               "--epochs", "1", "--batch-size", "4", "--heldout", "0.34", "--init", str(out) + ".safetensors",
               "--out", str(more)])
    assert rc == 0
    again, _ = DraftHead.load(Path(str(more) + ".safetensors"))
    assert torch.equal(again.reduced_ids, first.reduced_ids)
    assert (again.ffn, again.heads, again.window) == (first.ffn, first.heads, first.window) == (32, 4, 8)
    assert any(not torch.equal(a, b) for a, b in zip(again.state_dict().values(), first.state_dict().values()))
    rec = json.loads(Path(str(more) + ".json").read_text())
    assert rec["init"]["head"] == "tiny.head.safetensors" and rec["init"]["record"]["data"]["answers"] == 12
    assert rec["head"]["ffn"] == 32 and rec["head"]["reduced_vocab"] == first.reduced_ids.numel()

    # without `--out` the head goes to the user's cache, never over the package's shipped head
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    shipped = {p.name: p.read_bytes() for p in ASSETS.glob("*.head.*")}
    rc = main(["--model", str(tiny_dir), "--prompts", str(prompts), "--max-tokens", "12", "--sampled", "1",
               "--data", str(tmp_path / "d.pt"), "--vocab", "32", "--ffn", "16", "--heads", "2", "--window", "4",
               "--epochs", "1", "--batch-size", "4", "--heldout", "0.34"])
    assert rc == 0
    cached = tmp_path / "home" / ".cache" / "via-sd" / "heads" / f"{tiny_dir.name}.head"
    assert DraftHead.load(Path(str(cached) + ".safetensors"))[0].window == 4
    assert json.loads(Path(str(cached) + ".json").read_text())["head"]["ffn"] == 16
    assert {p.name: p.read_bytes() for p in ASSETS.glob("*.head.*")} == shipped


def test_train_head_bf16_trains_in_bf16_and_records_it(tiny_dir, tmp_path, monkeypatch):
    """`--bf16`: the same seed and data as fp32, other arithmetic (so other weights), fp32
    parameters all along, and the record says so."""
    import server.engine.drafters.train_head as th

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "category": "t", "prompt": f"say {w}"}) + "\n"
                               for i, w in enumerate(["a", "bb", "ccc", "dddd", "e", "ff"])))
    seen = []
    real = th._unrolled_loss

    def spy(head, *a):
        loss, ce = real(head, *a)
        seen.append((torch.is_autocast_cpu_enabled(), next(head.parameters()).dtype))
        return loss, ce

    monkeypatch.setattr(th, "_unrolled_loss", spy)
    heads = {}
    for flag in ([], ["--bf16"]):
        out = tmp_path / f"h{len(flag)}.head"
        rc = th.main(["--model", str(tiny_dir), "--prompts", str(prompts), "--max-tokens", "12", "--sampled", "1",
                      "--data", str(tmp_path / "d.pt"), "--vocab", "64", "--ffn", "32", "--heads", "4",
                      "--window", "8", "--epochs", "2", "--batch-size", "4", "--heldout", "0.34",
                      "--out", str(out)] + flag)
        assert rc == 0
        rec = json.loads(Path(str(out) + ".json").read_text())
        assert rec["training"]["bf16"] is bool(flag)
        assert 0.0 <= rec["heldout"]["top1"] <= 1.0
        heads[bool(flag)] = DraftHead.load(Path(str(out) + ".safetensors"))[0]
    half = len(seen) // 2
    assert seen[:half] == [(False, torch.float32)] * half and seen[half:] == [(True, torch.float32)] * half
    a, b = heads[False].state_dict(), heads[True].state_dict()
    assert torch.equal(heads[False].reduced_ids, heads[True].reduced_ids)
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert all(torch.isfinite(b[k]).all() for k in b if b[k].is_floating_point())


def test_user_turn_prefix_cuts_the_template_where_the_message_begins(tiny_dir):
    from server.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tiny_dir)
    prefix = tok.user_turn_prefix()
    full = tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=False)
    assert 0 < len(prefix) < len(full) and full[: len(prefix)] == prefix
    assert tok.decode(full[len(prefix):], skip_special_tokens=True).strip().startswith("hello there")


@pytest.mark.real_model
def test_self_instructions_are_the_models_own_turns_deterministic_and_unique(real_model_dir):
    from server.engine.drafters.train_head import SELF_START, self_instructions, split_by_prompt

    a = self_instructions(str(real_model_dir), 6, seed=0, batch=8, threads=None)
    assert a == self_instructions(str(real_model_dir), 6, seed=0, batch=8, threads=None)
    assert [r["id"] for r in a] == list(range(SELF_START, SELF_START + 6))
    assert all(r["category"] == "self" and 16 <= len(r["prompt"]) <= 600 for r in a)
    assert len({r["prompt"].lower() for r in a}) == 6
    assert "<|im" not in "".join(r["prompt"] for r in a)  # the model ended its turn; no template left in
    assert [r["prompt"] for r in self_instructions(str(real_model_dir), 6, seed=1, batch=8, threads=None)] != \
        [r["prompt"] for r in a]
    if SPEC_BENCH_FILE.exists():
        questions = {t for line in SPEC_BENCH_FILE.read_text().splitlines() if line.strip()
                     for t in json.loads(line)["turns"]}
        assert not questions & {r["prompt"] for r in a}
    # the model's own set is held out on its own: the earlier sets' split does not move
    first = [{"prompt_id": i} for i in range(10_000, 10_500)]
    _, held_first = split_by_prompt(first, 0.1, 0)
    _, held = split_by_prompt(first + [{"prompt_id": r["id"]} for r in a * 5], 0.1, 0)
    assert {s["prompt_id"] for s in held if s["prompt_id"] < SELF_START} == {s["prompt_id"] for s in held_first}
    assert any(s["prompt_id"] >= SELF_START for s in held)


# ------------------------------------------------------------------ the shipped head
# Floors on what training recorded for the shipped head (held-out prompts, true pairs for top-1,
# its own drafts for the chained numbers). They sit a little under what the shipped head reached
# (top-1 0.565; at γ = 5, 2.40 tokens per start position and 2.20 per step walked as the engine
# steps, on the held-out answers of builtin+third; the head it continued read 0.538 and 2.08 on
# the same answers, 0.551 and 2.15 on its own builtin split), so a retrained head that regresses
# fails here.
# The walked number is the engine's: `binary` with an earlier head (0.53 / 2.11) on the 154
# first-set held-out prompts, every draft verified, made 2.08 tokens per step.
TOP1_FLOOR = 0.50
TAU_FLOOR = 2.2
TOKENS_PER_STEP_FLOOR = 2.0


def test_shipped_record_meets_floor():
    rec = json.loads(RECORD.read_text())
    assert rec["model"] == "SmolLM2-135M-Instruct"
    assert rec["heldout"]["top1"] >= TOP1_FLOOR, rec["heldout"]
    assert rec["heldout"]["tau"] >= TAU_FLOOR, rec["heldout"]
    assert rec["heldout"]["tokens_per_step"] >= TOKENS_PER_STEP_FLOOR, rec["heldout"]
    assert rec["command"].startswith("via-sd train-head")
    assert shipped_head_path("/nowhere/SmolLM2-135M-Instruct") is not None


@pytest.mark.real_model
def test_shipped_head_binary_is_lossless(real_model_dir):
    eng = LLMEngine(EngineConfig(model=str(real_model_dir), spec=SpecConfig(mode="binary", drafter="head",
                                                                            spec_max_batch=10**6)))
    tok = eng.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in
               ("What is the capital of France?", "Write a haiku about the sea.", "Explain recursion in one paragraph.")]
    off = run_greedy(eng, prompts, 40, "off")
    binary = run_greedy(eng, prompts, 40, "binary")
    assert [o.token_ids for o in off] == [b.token_ids for b in binary]
    assert sum(b.via_sd.accepted for b in binary) > 0  # the trained head gets some drafts right


def test_collect_on_a_given_engine_restores_its_runner_and_keeps_features_on_the_host(tiny_dir):
    """`collect(engine=...)`: the recording wrapper comes off afterwards (a second collection on
    the same engine records once), the features are fp16 host tensors, one per generated token
    but the last, and greedy answers repeat."""
    from server.engine.drafters.train_head import collect

    eng = LLMEngine(EngineConfig(model=str(tiny_dir), spec=SpecConfig(mode="off"), max_num_seqs=4))
    runner = eng.runner
    rows = [{"id": i, "category": "t", "prompt": f"say {w}"} for i, w in enumerate(["a", "bb", "ccc"])]
    kw = dict(max_tokens=10, sampled=1, temperature=0.7, seed=0, batch=4, threads=None, engine=eng)
    first = collect("", rows, **kw)
    assert eng.runner is runner
    again = collect("", rows, **kw)
    assert eng.runner is runner and len(first) == len(again) == 6
    for a, b in zip(first, again):
        assert a["hidden"].device.type == "cpu" and a["hidden"].dtype == torch.float16
        assert a["hidden"].shape == (len(a["greedy"]), 64) and len(a["tokens"]) == len(a["greedy"]) + 1
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["hidden"], b["hidden"])
    assert eng.cache.pool.num_free == eng.cache.pool.num_usable


def test_head_to_device_moves_the_attached_embeddings():
    V, H = 300, 64
    embed = torch.randn(V, H)
    head = random_head(H, V).attach(embed, embed)
    assert head.to_device("cpu") is head and head.embed.device.type == head.out_embed.device.type == "cpu"
    assert torch.equal(head.out_embed, embed[head.reduced_ids])
