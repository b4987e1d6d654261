"""The Triton kernels against the torch reference, on CPU under Triton's interpreter.

Triton picks interpreter or compiler when a function is decorated, its own standard library
(`tl.zeros_like`, `tl.max`, ...) included, i.e. when triton is first imported. A pytest run of
the whole tests/ folder has usually imported triton long before this module (torch can import
it), so the kernel tests run in a child process started with TRITON_INTERPRET=1
(`test_kernels_in_an_interpreter_process`); run directly with TRITON_INTERPRET=1 set they run in
process. Vocabularies stay small: the interpreter runs every tensor op in numpy. MAX_BLOCK is
lowered in some cases so that the loops over the vocabulary run several iterations (cross-block
max and first-argmax ties).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from via_sd_kernels import SpecMetadata, gate, verify_binary, verify_three_tier

from .cases import assert_same_gate, assert_same_output, check_invariants, random_batch

triton = pytest.importorskip("triton")

INTERPRETED = type(triton.language.standard.zeros_like).__name__ == "InterpretedFunction"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in a TRITON_INTERPRET=1 child process (test_kernels_in_an_interpreter_process)"
)


@pytest.mark.skipif(INTERPRETED, reason="this process already interprets the kernels")
def test_kernels_in_an_interpreter_process():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=root,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " skipped" in proc.stdout, proc.stdout[-2000:]


@pytest.fixture
def small_blocks():
    from via_sd_kernels.triton import _common

    saved = _common.MAX_BLOCK
    _common.MAX_BLOCK = 4
    yield
    _common.MAX_BLOCK = saved


def _both(fn, *args):
    return fn(*args, backend="torch"), fn(*args, backend="triton")


def _check_batch(b):
    g_torch, g_triton = _both(gate, b.slim_probs, b.meta, b.accept, b.escalate, b.bonus_conf)
    assert_same_gate(g_triton, g_torch)
    for u, noise in ((None, None), (b.uniforms, b.noise)):
        ref, out = _both(verify_binary, b.meta, b.full_probs, b.draft_probs, u, noise)
        assert_same_output(out, ref)
        check_invariants(b.meta, out, b.vocab)
        ref, out = _both(verify_three_tier, b.meta, g_torch, b.slim_scaled, b.full_probs, b.draft_probs, u, noise)
        assert_same_output(out, ref)
        check_invariants(b.meta, out, b.vocab, g_torch)


@interpreted
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 5),
    gamma=st.integers(0, 5),
    vocab=st.integers(2, 12),
    with_draft_probs=st.booleans(),
)
def test_kernels_match_the_reference_on_ragged_batches(seed, batch, gamma, vocab, with_draft_probs):
    _check_batch(random_batch(seed, batch, gamma, vocab, with_draft_probs=with_draft_probs))


@interpreted
def test_kernels_match_across_vocabulary_blocks(small_blocks):
    for seed in range(3):
        _check_batch(random_batch(seed, 4, 4, 11, with_draft_probs=seed != 1))


@interpreted
def test_first_maximum_wins_across_blocks(small_blocks):
    meta = SpecMetadata.from_lists([[1], []])
    q = torch.tensor(
        [
            [0.1, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.3, 0.0, 0.3],  # argmax 5 (ties at 7 and 9)
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.5],  # (bonus of sequence 0, not reached)
            [0.2, 0.0, 0.0, 0.0, 0.4, 0.0, 0.0, 0.0, 0.4, 0.0],  # argmax 4 (tie at 8, next block)
        ]
    )
    ref, out = _both(verify_binary, meta, q, None, None, None)
    assert out.output_token_ids.tolist() == ref.output_token_ids.tolist() == [[5, -1], [4, -1]]
    noise = torch.ones_like(q)  # ties in q / noise as well
    u = torch.tensor([0.99])  # rejects d = 1 (q = 0); residual = q
    ref, out = _both(verify_binary, meta, q, None, u, noise)
    assert_same_output(out, ref)
    assert out.output_token_ids.tolist() == [[5, -1], [4, -1]]
    # p == q and q(d) = 0: d is rejected and the residual has no mass, so the token comes from q
    ref, out = _both(verify_binary, meta, q, q[:1].clone(), u, noise)
    assert_same_output(out, ref)
    assert out.output_token_ids.tolist() == [[5, -1], [4, -1]]


@interpreted
def test_identical_drafter_is_fully_accepted_by_the_kernels():
    b = random_batch(11, 6, 5, 9)
    q = b.full_probs
    p = q[b.meta.token_rows]
    g = torch.Generator().manual_seed(0)
    meta = SpecMetadata.from_tensors(torch.multinomial(p, 1, generator=g).squeeze(1), b.meta.num_draft_tokens, 5)
    out = verify_binary(meta, q, p, b.uniforms, b.noise, backend="triton")
    assert torch.equal(out.counts.accepted, meta.num_draft_tokens)


@interpreted
def test_escalate_above_one_is_binary_on_the_kernels():
    b = random_batch(5, 6, 4, 10)
    over = torch.full((6,), 1.5)
    g = gate(b.slim_probs, b.meta, b.accept, over, over, backend="triton")
    three = verify_three_tier(b.meta, g, b.slim_scaled, b.full_probs, b.draft_probs, b.uniforms, b.noise, backend="triton")
    binary = verify_binary(b.meta, b.full_probs, b.draft_probs, b.uniforms, b.noise, backend="triton")
    assert_same_output(three, binary)


@interpreted
def test_batches_without_drafts():
    b = random_batch(2, 3, 0, 6)
    _check_batch(b)
