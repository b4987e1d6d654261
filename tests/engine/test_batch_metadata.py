"""The ragged batch's metadata (`kv_cache.build_batch`), written out by hand for a small batch."""

import torch

from server.engine.block_pool import BlockTable
from server.engine.kv_cache import Chunk, build_batch


def _table(blocks: list[int], bs: int = 4) -> BlockTable:
    t = BlockTable(bs)
    t.blocks = list(blocks)
    return t


def test_flat_fields_slots_and_lazy_padded_layout():
    # sequence 0: 2 new tokens at positions 5, 6 (blocks 7, 3); sequence 1: 1 token at position 2 (block 9)
    a, b = _table([7, 3]), _table([9])
    batch = build_batch([Chunk(a, 5, [11, 12], 2), Chunk(b, 2, [13], 1)])
    assert batch.input_ids.tolist() == [11, 12, 13]
    assert batch.positions.tolist() == [5, 6, 2]
    assert batch.slot_mapping.tolist() == [3 * 4 + 1, 3 * 4 + 2, 9 * 4 + 2]
    assert batch.token_seq.tolist() == [0, 0, 1]
    assert batch.logits_index.tolist() == [0, 1, 2]
    # context slots per sequence up to the longest context (7), past a table: the null block 0
    assert batch.ctx_slots.tolist() == [[28, 29, 30, 31, 12, 13, 14], [36, 37, 38, 39, 0, 1, 2]]
    assert batch.ctx_slots.is_contiguous()
    assert batch.q_index is None and batch.out_index is None  # not built until asked
    batch.padded()
    assert batch.q_index.tolist() == [[0, 1], [2, 3]]  # 3 = the zero pad row
    assert batch.out_index.tolist() == [0, 1, 2]
    m = batch.attn_mask[:, 0]
    assert m.shape == (2, 2, 7)
    assert m[0, 0].tolist() == [True] * 6 + [False]  # position 5 sees 0..5
    assert m[0, 1].tolist() == [True] * 7
    assert m[1, 0].tolist() == [True] * 3 + [False] * 4
    assert batch.padded() is batch and batch.pad is None


def test_one_token_over_the_whole_context_needs_no_mask():
    batch = build_batch([Chunk(_table([2, 5]), 6, [4], 1)]).padded()
    assert batch.attn_mask is None
    assert batch.slot_mapping.tolist() == [5 * 4 + 2]
    assert torch.equal(batch.ctx_slots, torch.tensor([[8, 9, 10, 11, 20, 21, 22]]))
