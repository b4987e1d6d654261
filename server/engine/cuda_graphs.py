"""CUDA graphs for the forwards of decode-sized batches.

On a GPU the eager forward of a small batch is bound by Python and kernel launches, not by the
GPU: for a 1B Llama at batch 1 on an H200, 6.1 ms eager against 1.6 ms for the same forward
replayed from a CUDA graph (`benchmarks/results/gpu_engine.json`). So passes of up to
`MAX_TOKENS_PER_SEQ` tokens per sequence (plain decodes, the verification and slim passes of
speculation, the `self` drafter's steps) are captured once per shape and replayed.

A graph needs fixed shapes, so a batch is padded to buckets: sequences to the next of
`BATCH_BUCKETS`, tokens per sequence to the next of `TOKEN_BUCKETS`, context to a multiple of
`CONTEXT_STEP`. The padded layout is dense: sequence b's j-th token sits at row b * Q + j. What
changes between replays is three small integer tensors, copied in with one transfer:

    ids   [B * Q]        token ids (0 for padding)
    qpos  [B, Q]         position of each token, -1 for padding
    table [B, L / bs]    block table (the null block for padding)

Inside the graph the positions, the cache slots each token writes (padding writes the null
block's slot 0), the context slots [B, L] and the causal mask [B, 1, Q, L] are computed from
them; padded queries attend to key 0 only and their outputs are never read. The forward is the
eager one (`LlamaModel.forward`), so a replay computes what an eager pass of the padded batch
computes. Graphs share one memory pool; outputs are copied out before the next replay.

Capturing runs the forward once (warm-up) and records it once; the warm-up writes the same K/V
the replay writes, so the cache ends as after an eager pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.kv_cache import Chunk, KVCache
from server.engine.model import ForwardBatch, ForwardOutput, LlamaModel

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (1, 2, 4, 8, 16)
MAX_TOKENS_PER_SEQ = TOKEN_BUCKETS[-1]
CONTEXT_STEP = 256


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None when not capturing
    packed: torch.Tensor  # [B*Q + B*Q + B*nblk] int64: ids, qpos, table
    start_hidden: torch.Tensor | None  # [B*Q, H] input when the pass starts inside the network
    out: ForwardOutput


class CudaGraphRunner:
    """Replays captured forwards for batches that fit the buckets; `forward` returns None otherwise."""

    def __init__(self, model: LlamaModel, cache: KVCache, *, capture: bool = True):
        """`capture=False` runs the padded batch eagerly instead of replaying a graph: the same
        layout and metadata on any device, which is how the CPU tests check them."""
        self.capture = capture
        self.model = model
        self.cache = cache
        self.device = cache.device
        self.block_size = cache.block_size
        self.max_context = min(model.cfg.max_position_embeddings, cache.num_blocks * cache.block_size)
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None
        self.num_replays = 0
        self.num_captures = 0

    # ------------------------------------------------------------------ shapes
    def shape(self, chunks: list[Chunk]) -> tuple[int, int, int] | None:
        """(B, Q, L) buckets for `chunks`, or None when the batch is not graph-sized."""
        B = _bucket(len(chunks), BATCH_BUCKETS)
        Q = _bucket(max(len(c.token_ids) for c in chunks), TOKEN_BUCKETS)
        end = max(c.start + len(c.token_ids) for c in chunks)
        L = -(-end // CONTEXT_STEP) * CONTEXT_STEP
        if B is None or Q is None or L > self.max_context + CONTEXT_STEP:
            return None
        return B, Q, L

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], route=None, *, start_sublayer: int = 0,
                start_hidden: torch.Tensor | None = None, save_at: int | None = None,
                want_hidden: bool = False) -> ForwardOutput | None:
        shape = self.shape(chunks)
        if shape is None:
            return None
        B, Q, L = shape
        nblk = L // self.block_size
        host = torch.zeros(2 * B * Q + B * nblk, dtype=torch.long)
        ids, qpos, tab = host[: B * Q], host[B * Q: 2 * B * Q].view(B, Q), host[2 * B * Q:].view(B, nblk)
        qpos.fill_(-1)
        logit_rows: list[int] = []
        token_rows: list[int] = []
        for b, c in enumerate(chunks):
            n = len(c.token_ids)
            r = b * Q
            ids[r:r + n] = torch.tensor(c.token_ids, dtype=torch.long)
            qpos[b, :n] = torch.arange(c.start, c.start + n)
            k = min(len(c.table.blocks), nblk)
            if k:
                tab[b, :k] = torch.tensor(c.table.blocks[:k], dtype=torch.long)
            logit_rows.extend(range(r + n - c.num_logits, r + n))
            token_rows.extend(range(r, r + n))
        key = (B, Q, L, route, start_sublayer, save_at)
        g = self.graphs.get(key)
        fresh = g is None
        if fresh:
            g = self._allocate(B, Q, L, start_sublayer > 0)
        g.packed.copy_(host)
        rows_t = torch.tensor(token_rows, dtype=torch.long).to(self.device, non_blocking=True)
        if g.start_hidden is not None:
            g.start_hidden.zero_()
            g.start_hidden.index_copy_(0, rows_t, start_hidden.to(g.start_hidden.dtype))
        if not self.capture:
            g.out = self.model.forward(self._batch(g, B, Q, L), self.cache.k, self.cache.v, route,
                                       start_sublayer=start_sublayer, start_hidden=g.start_hidden, save_at=save_at,
                                       want_hidden=True)
        else:
            if fresh:
                self._capture(g, B, Q, L, route, start_sublayer, save_at)
                self.graphs[key] = g
            g.graph.replay()
        self.num_replays += 1
        lrows = torch.tensor(logit_rows, dtype=torch.long).to(self.device, non_blocking=True)
        out = g.out
        return ForwardOutput(
            logits=out.logits.index_select(0, lrows),
            hidden=out.hidden.index_select(0, lrows) if want_hidden else out.hidden[:0].clone(),
            prefix_hidden=None if out.prefix_hidden is None else out.prefix_hidden.index_select(0, rows_t),
        )

    # ------------------------------------------------------------------ capture
    def _allocate(self, B: int, Q: int, L: int, with_start: bool) -> _Graph:
        nblk = L // self.block_size
        packed = torch.zeros(2 * B * Q + B * nblk, dtype=torch.long, device=self.device)
        start = None
        if with_start:
            start = torch.zeros(B * Q, self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.device)
        return _Graph(torch.cuda.CUDAGraph() if self.capture else None, packed, start, None)

    def _batch(self, g: _Graph, B: int, Q: int, L: int) -> ForwardBatch:
        """The padded batch's metadata, computed on the device from the packed inputs."""
        bs = self.block_size
        nblk = L // bs
        dev = self.device
        ids = g.packed[: B * Q]
        qpos = g.packed[B * Q: 2 * B * Q].view(B, Q)
        tab = g.packed[2 * B * Q:].view(B, nblk)
        pos = qpos.clamp(min=0)
        real = qpos >= 0
        tok_block = tab.gather(1, pos // bs)  # [B, Q]
        slot = torch.where(real, tok_block * bs + pos % bs, torch.zeros_like(pos))  # padding -> null slot 0
        kpos = torch.arange(L, device=dev)
        ctx_slots = tab[:, kpos // bs] * bs + kpos % bs  # [B, L]
        mask = (kpos[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, Q, L]
        flat = torch.arange(B * Q, device=dev)
        return ForwardBatch(input_ids=ids, positions=pos.reshape(-1), slot_mapping=slot.reshape(-1),
                            ctx_slots=ctx_slots, q_index=flat.view(B, Q), out_index=flat, attn_mask=mask,
                            logits_index=flat, num_seqs=B, token_seq=None)

    def _capture(self, g: _Graph, B: int, Q: int, L: int, route, start_sublayer: int, save_at: int | None) -> None:
        kw = dict(start_sublayer=start_sublayer, start_hidden=g.start_hidden, save_at=save_at, want_hidden=True)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.model.forward(self._batch(g, B, Q, L), self.cache.k, self.cache.v, route, **kw)  # warm-up
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(g.graph, pool=self.pool):
            g.out = self.model.forward(self._batch(g, B, Q, L), self.cache.k, self.cache.v, route, **kw)
        self.num_captures += 1
