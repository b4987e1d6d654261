"""Host memory in transparent huge pages, for the weights and the KV cache on a CPU.

A decode step streams every weight once. With 4 KiB pages that is a TLB miss every 4 KiB, and
the hardware prefetchers stop at every page boundary; with 2 MiB pages neither happens. Measured
on this project's 2-core CPU box with the skinny GEMM (`via_sd_kernels/cpu`), one token against
30 distinct copies of each SmolLM2-135M weight shape: the MLP's gate/up projection 12.5 -> 22.3
GB/s, the down projection 15.9 -> 25.1, the LM head 31.2 -> 48.1 (README, Performance).

Linux hands out huge pages for anonymous memory only where asked (`transparent_hugepage` set to
`madvise`, the common default), so the tensors are carved out of one anonymous mapping advised
with MADV_HUGEPAGE. Elsewhere, or with VIA_SD_HUGE_PAGES=0, tensors are plain allocations.
"""

from __future__ import annotations

import logging
import mmap
import os

import torch

log = logging.getLogger("via_sd.engine")

HUGE_PAGE = 2 << 20
ALIGN = 64  # every tensor starts on a cache line


def available() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("VIA_SD_HUGE_PAGES", "1") != "0"


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class Arena:
    """One anonymous mapping advised for huge pages; `take` carves zeroed tensors out of it.
    Each tensor keeps the mapping alive."""

    def __init__(self, nbytes: int):
        size = _round_up(max(nbytes, 1), HUGE_PAGE) + HUGE_PAGE  # room to align the start
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._map.madvise(mmap.MADV_HUGEPAGE)
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._off = (-self._bytes.data_ptr()) % HUGE_PAGE
        self._end = size

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = _nbytes(shape, dtype)
        if self._off + n > self._end:
            raise MemoryError("arena exhausted")
        t = self._bytes[self._off:self._off + n]
        self._off += n
        return t.view(dtype)[: torch.Size(shape).numel()].view(shape)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes a tensor takes in the arena, padded to the next cache line."""
    return _round_up(torch.Size(shape).numel() * dtype.itemsize, ALIGN)


def move_to_huge_pages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of CPU `tensors` in one huge-page mapping (the same tensor object given twice, as
    tied embeddings are, gives one copy). Unchanged where huge pages are not available."""
    if not tensors or not available() or any(t.device.type != "cpu" for t in tensors):
        return tensors
    unique: dict[int, torch.Tensor] = {}
    for t in tensors:
        unique.setdefault(id(t), t)
    try:
        arena = Arena(sum(_nbytes(t.shape, t.dtype) for t in unique.values()))
    except (OSError, ValueError) as e:
        log.warning("huge pages unavailable (%s); weights stay in ordinary pages", e)
        return tensors
    moved = {}
    for key, t in unique.items():
        c = arena.take(tuple(t.shape), t.dtype)
        c.copy_(t)
        moved[key] = c
    return [moved[id(t)] for t in tensors]


def zeros(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Zeroed CPU tensors of `shapes` in one huge-page mapping (plain `torch.zeros` without it)."""
    if available():
        try:
            arena = Arena(sum(_nbytes(s, dtype) for s in shapes))
            return [arena.take(s, dtype) for s in shapes]  # anonymous memory starts zeroed
        except (OSError, ValueError) as e:
            log.warning("huge pages unavailable (%s); the KV cache stays in ordinary pages", e)
    return [torch.zeros(s, dtype=dtype) for s in shapes]
