import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from via_sd_kernels import SpecMetadata, gate

from .cases import assert_same_gate, gate_by_loops, random_batch


def _thr(b, acc=0.7, esc=0.5, bonus=0.9):
    return torch.full((b,), acc), torch.full((b,), esc), torch.full((b,), bonus)


def test_worked_example_from_the_docstring():
    meta = SpecMetadata.from_lists([[3, 1, 2]])
    q = torch.tensor(
        [[0.10, 0.05, 0.05, 0.80], [0.30, 0.45, 0.15, 0.10], [0.50, 0.10, 0.30, 0.10], [0.25, 0.25, 0.25, 0.25]]
    )
    out = gate(q, meta, *_thr(1))
    assert out.tiers.tolist() == [0, 0, 1]
    assert out.stop.tolist() == [2] and out.stop_tier.tolist() == [1]
    assert out.needs_full.tolist() == [False] and out.bonus_from_slim.tolist() == [False]

    q[2] = torch.tensor([0.50, 0.10, 0.20, 0.20])  # r = 0.4 -> tier C
    out = gate(q, meta, *_thr(1))
    assert out.tiers.tolist() == [0, 0, 2] and out.needs_full.tolist() == [True]

    q[2] = torch.tensor([0.10, 0.10, 0.70, 0.10])  # all A; bonus row max 0.95 >= 0.9
    q[3] = torch.tensor([0.95, 0.05, 0.0, 0.0])
    out = gate(q, meta, *_thr(1))
    assert out.tiers.tolist() == [0, 0, 0] and out.stop.tolist() == [3]
    assert out.bonus_from_slim.tolist() == [True] and out.needs_full.tolist() == [False]


def test_escalate_above_one_makes_every_draft_tier_c_and_bonus_above_one_needs_full():
    b = random_batch(0, batch=6, gamma=4, vocab=16)
    acc, esc, bonus = torch.full((6,), 2.0), torch.full((6,), 1.5), torch.full((6,), 1.5)
    out = gate(b.slim_probs, b.meta, acc, esc, bonus)
    n = b.meta.num_draft_tokens
    assert torch.equal(out.stop, torch.zeros_like(n))
    assert torch.equal(out.stop_tier, (n > 0).to(torch.int8) * 2)
    assert bool(out.needs_full.all()) and not bool(out.bonus_from_slim.any())
    assert bool((out.tiers[b.meta.token_positions == 0] == 2).all())
    assert bool((out.tiers[b.meta.token_positions > 0] == -1).all())


def test_a_slim_row_of_zeros_never_passes():
    meta = SpecMetadata.from_lists([[1], []])
    q = torch.zeros(3, 4)
    out = gate(q, meta, *_thr(2, acc=0.0, esc=0.0, bonus=0.5))
    assert out.tiers.tolist() == [2] and out.needs_full.tolist() == [True, True]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 8),
    gamma=st.integers(0, 6),
    vocab=st.integers(2, 24),
)
def test_gate_matches_its_definition_with_per_request_thresholds(seed, batch, gamma, vocab):
    b = random_batch(seed, batch, gamma, vocab)
    out = gate(b.slim_probs, b.meta, b.accept, b.escalate, b.bonus_conf, backend="torch")
    assert_same_gate(out, gate_by_loops(b))
