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
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.block_size = block_size
        self.device = torch.device(device)
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        shape = (slots, cfg.num_kv_heads, cfg.head_dim)
        if self.device.type == "cpu":
            from server.engine import host_memory

            kv = host_memory.zeros([shape] * (2 * cfg.num_layers), dtype)  # in huge pages where possible
            self.k, self.v = kv[: cfg.num_layers], kv[cfg.num_layers:]
        else:
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
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
    """Flatten the chunks into one ragged batch. Per-token Python work is limited to the new
    tokens; context slots come from the block tables as one tensor expression. The padded
    layout that torch's attention reads (`q_index`, `out_index`, `attn_mask`) is built only when
    a pass asks for it (`ForwardBatch.padded`): decode-sized passes on the CPU kernels never do,
    and building it cost about as much as the rest (~0.15 ms a step)."""
    B = len(chunks)
    lens = [len(c.token_ids) for c in chunks]
    ends = [c.start + n for c, n in zip(chunks, lens)]
    L = max(ends)
    bs = chunks[0].table.block_size
    nblk = -(-L // bs)
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_index: list[int] = []
    base = 0
    for c, n in zip(chunks, lens):
        input_ids.extend(c.token_ids)
        positions.extend(range(c.start, c.start + n))
        blocks = c.table.blocks
        have = min(len(blocks), nblk)  # past a table's blocks: the null block, as in `tab`
        slots.extend((blocks[p // bs] if p // bs < have else 0) * bs + p % bs for p in range(c.start, c.start + n))
        logits_index.extend(range(base + n - c.num_logits, base + n))
        base += n
    tab = torch.zeros(B, nblk, dtype=torch.long)  # padded with the null block
    for b, c in enumerate(chunks):
        k = min(len(c.table.blocks), nblk)
        if k:
            tab[b, :k] = torch.tensor(c.table.blocks[:k], dtype=torch.long)
    ctx_slots = (tab[:, :, None] * bs + torch.arange(bs)).view(B, nblk * bs)[:, :L].contiguous()  # [B, L]
    token_seq = torch.zeros(base, dtype=torch.long) if B == 1 else torch.repeat_interleave(torch.arange(B), torch.tensor(lens))

    def pad() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        Q = max(lens)
        lens_t = torch.tensor(lens)
        qi = torch.arange(Q)
        cu = torch.cumsum(lens_t, 0) - lens_t
        valid = qi[None, :] < lens_t[:, None]  # [B, Q]
        q_index = torch.where(valid, cu[:, None] + qi[None, :], torch.full((B, Q), base))
        out_index = (torch.arange(B)[:, None] * Q + qi[None, :])[valid]
        mask = None
        if Q > 1 or any(e < L for e in ends):
            starts_t = torch.tensor([c.start for c in chunks])
            qpos = torch.where(valid, starts_t[:, None] + qi[None, :], torch.zeros(B, Q, dtype=torch.long))  # [B, Q]
            kpos = torch.arange(L)
            mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < torch.tensor(ends)[:, None, None])
            mask = mask[:, None].to(device)  # [B, 1, Q, L]
        return q_index.to(device), out_index.to(device), mask

    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        ctx_slots=ctx_slots.to(device),
        q_index=None,
        out_index=None,
        attn_mask=None,
        logits_index=torch.tensor(logits_index, dtype=torch.long, device=device),
        token_seq=token_seq.to(device),
        num_seqs=B,
        pad=pad,
    )
