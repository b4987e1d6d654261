"""The paged KV cache: one K and one V tensor per layer, addressed by flat slot
(`block * block_size + offset`), and the builder of a ragged forward's metadata.

Every route reads and writes this one cache; a sub-layer that a route skips leaves its slots
as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.block_pool import BlockPool, BlockTable
from server.engine.model import ForwardBatch, ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype):
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        self.k = [torch.zeros(slots, cfg.num_kv_heads, cfg.head_dim, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(slots, cfg.num_kv_heads, cfg.head_dim, dtype=dtype) for _ in range(cfg.num_layers)]
        self.pool = BlockPool(num_blocks)

    @staticmethod
    def num_blocks_for_memory(cfg: ModelConfig, block_size: int, memory_gb: float, dtype: torch.dtype) -> int:
        per_block = 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
        return max(2, int(memory_gb * (1 << 30)) // per_block)

    def new_table(self) -> BlockTable:
        return BlockTable(self.block_size)


@dataclass
class Chunk:
    """One sequence's share of a forward: tokens fed at positions [start, start + len(token_ids)),
    attending to [0, start + len(token_ids)); logits for the last `num_logits` positions."""

    table: BlockTable
    start: int
    token_ids: list[int]
    num_logits: int


def build_batch(chunks: list[Chunk], device: torch.device | str = "cpu") -> ForwardBatch:
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    logits_index: list[int] = []
    B = len(chunks)
    Q = max(len(c.token_ids) for c in chunks)
    L = max(c.start + len(c.token_ids) for c in chunks)
    n_total = sum(len(c.token_ids) for c in chunks)
    ctx_rows: list[list[int]] = []
    q_rows: list[list[int]] = []
    out_index: list[int] = []
    need_mask = False
    qpos_rows: list[list[int]] = []
    ctx_lens: list[int] = []
    for b, c in enumerate(chunks):
        n = len(c.token_ids)
        end = c.start + n
        base = len(input_ids)
        input_ids.extend(c.token_ids)
        positions.extend(range(c.start, end))
        slot_mapping.extend(c.table.slots(c.start, end))
        logits_index.extend(range(base + n - c.num_logits, base + n))
        ctx = c.table.slots(0, end)
        ctx_rows.append(ctx + [0] * (L - end))
        q_rows.append(list(range(base, base + n)) + [n_total] * (Q - n))
        out_index.extend(range(b * Q, b * Q + n))
        qpos_rows.append(list(range(c.start, end)) + [0] * (Q - n))
        ctx_lens.append(end)
        if n > 1 or end < L or n < Q:
            need_mask = True
    mask = None
    if need_mask:
        qpos = torch.tensor(qpos_rows)  # [B, Q]
        kpos = torch.arange(L)
        lens = torch.tensor(ctx_lens)
        mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < lens[:, None, None])
        mask = mask[:, None]  # [B, 1, Q, L]
    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        ctx_slots=torch.tensor(ctx_rows, dtype=torch.long, device=device),
        q_index=torch.tensor(q_rows, dtype=torch.long, device=device),
        out_index=torch.tensor(out_index, dtype=torch.long, device=device),
        attn_mask=None if mask is None else mask.to(device),
        logits_index=torch.tensor(logits_index, dtype=torch.long, device=device),
        num_seqs=B,
    )
