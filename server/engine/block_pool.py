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

**Prefix cache.** A full block whose K/V the full model has written (every layer, positions below
a sequence's `full_frontier`, which no pass writes again) can be *registered* under its tokens and
the block before it. A later sequence whose tokens start the same way takes those blocks by
reference instead of prefilling them (`lookup`, `take`). The key is (serial of the block before,
the block's tokens), and a serial is never reused, so a hit is exact: no hash can collide, and a
block evicted and written again cannot be mistaken for its old contents or for the parent of its
old children. A registered block whose last reference goes stays cached but *evictable*: it
counts as free, and `allocate` takes never-cached free blocks first, then the least recently
released cached one (dropping it from the cache).
"""

from __future__ import annotations

from collections import OrderedDict, deque


class OutOfBlocks(RuntimeError):
    """Not enough free blocks; the scheduler answers with preemption, never a crash."""


class BlockPool:
    NULL_BLOCK = 0
    ROOT = 0  # the serial "before" a sequence's first block

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks (one is the reserved null block)")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._ref = [0] * num_blocks
        # prefix cache: (serial of the block before, tokens) -> block, and back
        self._cached: dict[tuple[int, tuple[int, ...]], int] = {}
        self._key: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._serial: dict[int, int] = {}
        self._next_serial = 1
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, no reference; oldest first

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: never-cached free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._key)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_usable

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._uncache(b)
            self._ref[b] = 1
            out.append(b)
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
                if b in self._key:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    # ---------------------------------------------------------------- prefix cache
    def register(self, block: int, parent: int, tokens: tuple[int, ...]) -> int:
        """Cache `block` (held, full, K/V final) as the block of `tokens` after the block of serial
        `parent`; returns the serial that now stands for this content. If that content is cached
        already (another sequence computed the same prefix), the existing serial is returned and
        `block` stays private."""
        if self._ref[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        key = (parent, tokens)
        have = self._cached.get(key)
        if have is not None:
            return self._serial[have]
        serial = self._next_serial
        self._next_serial += 1
        self._cached[key] = block
        self._key[block] = key
        self._serial[block] = serial
        return serial

    def lookup(self, parent: int, tokens: tuple[int, ...]) -> tuple[int, int] | None:
        """(block, serial) cached for `tokens` after the block of serial `parent`, or None."""
        b = self._cached.get((parent, tokens))
        return None if b is None else (b, self._serial[b])

    def take(self, block: int) -> None:
        """One more reference to a cached block (a prefix hit); an evictable one is in use again."""
        if block not in self._key:
            raise ValueError(f"block {block} is not cached")
        if self._ref[block] == 0:
            del self._evictable[block]
        self._ref[block] += 1

    def _uncache(self, block: int) -> None:
        del self._cached[self._key.pop(block)]
        del self._serial[block]

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (evictable ones become plain free blocks); returns how many."""
        n = len(self._key)
        for b in list(self._evictable):
            self._free.append(b)
        self._evictable.clear()
        self._cached.clear()
        self._key.clear()
        self._serial.clear()
        return n


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
