import torch

from via_sd_kernels.metadata import SpecMetadata


def test_from_lists_layout_matches_the_docstring_example():
    meta = SpecMetadata.from_lists([[5, 7], [], [9]])
    assert meta.draft_token_ids.tolist() == [5, 7, 9]
    assert meta.cu_num_draft_tokens.tolist() == [0, 2, 2, 3]
    assert meta.cu_num_rows.tolist() == [0, 3, 4, 6]
    assert meta.token_seq_ids.tolist() == [0, 0, 2]
    assert meta.token_positions.tolist() == [0, 1, 0]
    assert meta.token_rows.tolist() == [0, 1, 4]
    assert meta.bonus_rows.tolist() == [2, 3, 5]
    assert (meta.batch_size, meta.num_tokens, meta.num_rows, meta.max_num_draft_tokens) == (3, 3, 6, 2)


def test_from_tensors_equals_from_lists_and_infers_gamma():
    lists = [[1], [2, 3, 4], [], [5, 6]]
    a = SpecMetadata.from_lists(lists)
    b = SpecMetadata.from_tensors(torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([1, 3, 0, 2]))
    for name in ("draft_token_ids", "cu_num_draft_tokens", "cu_num_rows", "token_rows", "bonus_rows"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert b.max_num_draft_tokens == 3


def test_batches_without_drafts():
    meta = SpecMetadata.from_lists([[], []])
    assert meta.num_tokens == 0 and meta.num_rows == 2
    assert meta.bonus_rows.tolist() == [0, 1]
    assert SpecMetadata.from_lists([]).batch_size == 0
