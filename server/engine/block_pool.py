"""A pool of fixed-size KV blocks with an O(1) free list and reference counts.

Block 0 is the reserved *null block*: padded slots of a batch point at it, so a padded write or
read never touches a sequence's data. It is never handed out and never freed.

Invariant the tests check after every request: `num_free == num_usable` once nothing runs.

The free list is a stack: the blocks freed last are handed out first. On a CPU the KV cache is
one anonymous mapping whose pages the kernel maps (and zeroes) at their first write, in huge pages
that may need compacting first; a queue walked through all of it, so a fresh server paid those
faults on every request until the whole cache had been touched once (a 1,187-token prefill
spent ~110 ms of ~2.4 s writing K/V, ~15 ms with the stack). Recently used blocks are also the
ones still in the CPU's caches.
"""

from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    """Not enough free blocks; the scheduler answers with preemption, never a crash."""


class BlockPool:
    NULL_BLOCK = 0

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks (one is the reserved null block)")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._ref = [0] * num_blocks

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_usable

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        return out

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._ref[b] > 0, f"block {b} is not allocated"
            self._ref[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference of each block; a block whose count reaches 0 goes back to the
        free list, from which `allocate` takes the most recently freed first."""
        for b in blocks:
            if b == self.NULL_BLOCK:
                raise ValueError("the null block is never freed")
            if self._ref[b] <= 0:
                raise ValueError(f"double free of block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)


class BlockTable:
    """The blocks of one sequence, in position order: position p lives in block p // block_size."""

    __slots__ = ("blocks", "block_size")

    def __init__(self, block_size: int):
        self.blocks: list[int] = []
        self.block_size = block_size

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.block_size

    def blocks_needed(self, num_positions: int) -> int:
        need = -(-num_positions // self.block_size)
        return max(0, need - len(self.blocks))

    def ensure(self, pool: BlockPool, num_positions: int) -> None:
        """Make room for positions [0, num_positions) (lookahead slots included)."""
        n = self.blocks_needed(num_positions)
        if n:
            self.blocks.extend(pool.allocate(n))

    def truncate(self, pool: BlockPool, num_positions: int) -> None:
        """Shrink to the blocks that positions [0, num_positions) need; whole tail blocks go back
        to the pool (a rejected draft position inside a kept block is simply overwritten later)."""
        keep = -(-num_positions // self.block_size)
        if keep < len(self.blocks):
            tail = self.blocks[keep:]
            del self.blocks[keep:]
            pool.free(tail)

    def release(self, pool: BlockPool) -> None:
        if self.blocks:
            pool.free(self.blocks)
            self.blocks = []

    def slots(self, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [self.blocks[p // bs] * bs + p % bs for p in range(start, end)]
