import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from via_sd_kernels import SpecMetadata, gate, verify_binary, verify_binary_greedy_host, verify_three_tier
from via_sd_kernels.sampling import logits_to_probs

from .cases import assert_same_output, check_invariants, random_batch


def test_binary_worked_example_from_the_docstring():
    meta = SpecMetadata.from_lists([[2, 0]])
    q = torch.tensor([[0.2, 0.2, 0.6], [0.1, 0.7, 0.2], [0.3, 0.3, 0.4]])
    u = torch.tensor([0.5, 0.3])
    noise = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 0.1], [1.0, 1.0, 1.0]])
    out = verify_binary(meta, q, None, u, noise)
    assert out.output_token_ids.tolist() == [[2, 2, -1]]
    assert out.num_output.tolist() == [2] and out.tiers.tolist() == [2, 2]
    c = out.counts
    assert (c.accepted.item(), c.full_emitted.item(), c.tier_full.item()) == (1, 1, 2)
    greedy = verify_binary(meta, q, None, None, None)  # argmax rows: 2 == 2 kept, then argmax 1
    assert greedy.output_token_ids.tolist() == [[2, 1, -1]]


def test_three_tier_worked_example_from_the_docstring():
    meta = SpecMetadata.from_lists([[2, 0]])
    slim = torch.tensor([[0.1, 0.1, 0.8], [0.30, 0.45, 0.25], [0.3, 0.3, 0.4]])
    u = torch.tensor([0.5, 0.3])
    noise = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 0.1], [1.0, 1.0, 1.0]])
    g = gate(slim, meta, torch.tensor([0.7]), torch.tensor([0.5]), torch.tensor([0.9]))
    assert g.tiers.tolist() == [0, 1] and not g.needs_full.item()
    full = torch.full_like(slim, float("nan"))  # not read: no sequence needs the full model
    out = verify_three_tier(meta, g, slim, full, None, u, noise)
    assert out.output_token_ids.tolist() == [[2, 2, -1]]
    c = out.counts
    assert (c.accepted.item(), c.slim_regenerated.item(), c.full_emitted.item()) == (1, 1, 0)
    assert (c.tier_accept.item(), c.tier_slim.item(), c.tier_full.item()) == (1, 1, 0)


def _identical_drafter(seed, batch, gamma, vocab, greedy):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, gamma + 1, (batch,), generator=g)
    rows_seq = torch.repeat_interleave(torch.arange(batch), n + 1)
    logits = torch.randn(int(n.sum()) + batch, vocab, generator=g) * 3
    probs = logits_to_probs(logits, torch.zeros(len(rows_seq)) if greedy else torch.ones(len(rows_seq)))
    meta0 = SpecMetadata.from_tensors(torch.zeros(int(n.sum()), dtype=torch.long), n, gamma)
    draft_rows = probs[meta0.token_rows]  # p == q at every draft position
    drafts = torch.multinomial(draft_rows, 1, generator=g).squeeze(1)
    meta = SpecMetadata.from_tensors(drafts, n, gamma)
    u = torch.rand(meta.num_tokens, generator=g)
    noise = torch.empty(meta.num_rows, vocab).exponential_(generator=g)
    return meta, probs, draft_rows, u, noise


def test_a_drafter_identical_to_the_target_is_always_fully_accepted():
    for greedy in (True, False):
        meta, q, p, u, noise = _identical_drafter(1, batch=64, gamma=5, vocab=50, greedy=greedy)
        for out in (
            verify_binary(meta, q, p, u, noise),
            verify_binary(meta, q, p if not greedy else None, u, noise),
        ):
            assert torch.equal(out.counts.accepted, meta.num_draft_tokens)
            assert torch.equal(out.num_output, meta.num_draft_tokens + 1)
        if greedy:
            out = verify_binary(meta, q, None, None, None)
            assert torch.equal(out.counts.accepted, meta.num_draft_tokens)


def test_three_tier_with_escalate_above_every_ratio_is_exactly_binary():
    for seed in range(5):
        b = random_batch(seed, batch=12, gamma=5, vocab=20, with_draft_probs=seed % 2 == 0)
        over = torch.full((b.meta.batch_size,), 1.5)
        g = gate(b.slim_probs, b.meta, b.accept, over, over)
        for u, noise in ((b.uniforms, b.noise), (None, None)):
            three = verify_three_tier(b.meta, g, b.slim_scaled, b.full_probs, b.draft_probs, u, noise)
            binary = verify_binary(b.meta, b.full_probs, b.draft_probs, u, noise)
            assert_same_output(three, binary)


def test_cpu_packs_everything_in_one_copy():
    b = random_batch(3, batch=5, gamma=3, vocab=10)
    out = verify_binary(b.meta, b.full_probs, b.draft_probs, b.uniforms, b.noise)
    assert_same_output(out.cpu(), out)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 8),
    gamma=st.integers(0, 6),
    vocab=st.integers(2, 24),
    with_draft_probs=st.booleans(),
    greedy=st.booleans(),
)
def test_ragged_batches_keep_every_invariant(seed, batch, gamma, vocab, with_draft_probs, greedy):
    b = random_batch(seed, batch, gamma, vocab, with_draft_probs=with_draft_probs)
    u, noise = (None, None) if greedy else (b.uniforms, b.noise)
    out = verify_binary(b.meta, b.full_probs, b.draft_probs, u, noise)
    check_invariants(b.meta, out, vocab)
    assert not bool((out.counts.tier_accept + out.counts.tier_slim + out.counts.slim_regenerated).any())

    g = gate(b.slim_probs, b.meta, b.accept, b.escalate, b.bonus_conf)
    # rows of sequences that do not need the full model must not be read: poison them
    rows_seq = torch.repeat_interleave(torch.arange(batch), b.meta.num_draft_tokens + 1)
    full = b.full_probs.clone()
    full[~g.needs_full[rows_seq]] = float("nan")
    out3 = verify_three_tier(b.meta, g, b.slim_scaled, full, b.draft_probs, u, noise)
    check_invariants(b.meta, out3, vocab, g)
    gate_decided = g.tiers != -1
    assert torch.equal(out3.tiers[gate_decided], g.tiers[gate_decided])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 5), gamma=st.integers(0, 6), vocab=st.integers(2, 24))
def test_greedy_binary_on_the_host_is_verify_binary(seed, batch, gamma, vocab):
    """The host path of greedy steps with deterministic drafts: the same tokens and counts as
    the tensor path, on ragged batches where drafts are often, not always, the argmax."""
    b = random_batch(seed, batch, gamma, vocab, with_draft_probs=False)
    out = verify_binary(b.meta, b.full_probs, None, None, None)
    n = b.meta.num_draft_tokens.tolist()
    flat = b.meta.draft_token_ids.tolist()
    drafts, at = [], 0
    for k in n:
        drafts.append(flat[at:at + k])
        at += k
    got = verify_binary_greedy_host(drafts, b.full_probs.argmax(-1).tolist())
    for i, (toks, counts) in enumerate(got):
        m = int(out.num_output[i])
        assert toks == out.output_token_ids[i, :m].tolist()
        for name, v in counts.items():
            assert v == int(getattr(out.counts, name)[i]), name
    with pytest.raises((ValueError, IndexError)):  # one row short
        verify_binary_greedy_host(drafts, b.full_probs.argmax(-1).tolist()[:-1])
