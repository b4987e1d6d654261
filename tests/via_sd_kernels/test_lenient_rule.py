"""The full model's threshold as the two backends share it (via_sd_kernels/lenient.py)."""

from __future__ import annotations

import math

import torch

from via_sd_kernels import lenient


def test_keep_marks_near_ties_and_never_a_masked_token():
    logits = torch.tensor([[0.0, 2.0, 1.5, float("-inf")]] * 4)
    ids = torch.tensor([1, 2, 0, 3])  # the argmax; a near tie (e^-0.5); far (e^-2); masked out
    kept, forced = lenient.keep(logits, ids, torch.full((4,), math.log(0.5)))
    assert kept.tolist() == [True, True, False, False]
    assert forced.tolist() == [False, True, False, False]
    # θ = 0 keeps every draft the logits allow, θ = 1 only the argmax
    kept0, _ = lenient.keep(logits, ids, torch.full((4,), lenient.log_threshold(0.0)))
    assert kept0.tolist() == [True, True, True, False]
    kept1, forced1 = lenient.keep(logits, ids, torch.full((4,), lenient.log_threshold(1.0)))
    assert kept1.tolist() == [True, False, False, False] and not forced1.any()


def test_guard_refuses_forced_drafts_that_repeat_an_ngram():
    # sequence 0: output "1 2 3 4 9 1 2", drafts [3, 4]: "1 2 3 4" would repeat at the second draft;
    # sequence 1: nothing forced, so nothing is looked at
    seqs = [([1, 2, 3, 4, 9, 1, 2], [3, 4]), ([5, 6, 7, 8, 5, 6, 7], [8])]
    assert lenient.guard([True, True, False], seqs, 4) == [1]
    assert lenient.guard([True, False, False], seqs, 4) == []  # the repeat is not forced: the argmax stays
    assert lenient.guard([True, True, False], seqs, 0) == []  # guard off
    assert lenient.guard([False, False, True], seqs, 4) == [2]
