"""CUDA graphs for the forwards of decode-sized batches.

On a GPU the eager forward of a small batch is bound by Python and kernel launches, not by the
GPU: for a 1B Llama at batch 1 on an H200, 6.1 ms eager against 1.6 ms for the same forward
replayed from a CUDA graph (`benchmarks/results/gpu_engine.json`). So passes of up to
`MAX_TOKENS_PER_SEQ` tokens per sequence (plain decodes, the verification and slim passes of
speculation with their slim backlog, the `self` drafter's steps) are captured once per shape and
replayed.

A graph needs fixed shapes, so a batch is padded to buckets: sequences to the next of
`BATCH_BUCKETS`, tokens per sequence to the next of `TOKEN_BUCKETS`, context to the next power of
two from `MIN_CONTEXT`. The padded layout is dense: sequence b's j-th token sits at row b * Q + j.
Logits (and final hidden states) are computed for the last R = min(Q, `MAX_LOGITS_PER_SEQ`) rows
of each sequence. What changes between replays is three small integer tensors, copied in with one
transfer:

    ids   [B * Q]        token ids (0 for padding)
    qpos  [B, Q]         position of each token, -1 for padding
    table [B, L / bs]    block table (the null block for padding)

Inside the graph the positions, the cache slots each token writes (padding writes the null
block's slot 0), the context slots [B, L] and the causal mask [B, 1, Q, L] are computed from
them; padded queries attend to key 0 only and their outputs are never read. The forward is the
eager one (`LlamaModel.forward`), so a replay computes what an eager pass of the padded batch
computes. Graphs share one memory pool, and write their outputs into buffers shared by all of
them (sized for the largest bucket), which `forward` reads before the next replay.

Capturing runs the forward once (warm-up) and records it once; the warm-up writes the same K/V
the replay writes, so the cache ends as after an eager pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from server.engine.kv_cache import Chunk, KVCache
from server.engine.model import ForwardBatch, ForwardOutput, LlamaModel

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_TOKENS_PER_SEQ = TOKEN_BUCKETS[-1]
MAX_LOGITS_PER_SEQ = 16  # logits rows per sequence a graph computes (the last ones)
MIN_CONTEXT = 256  # context buckets: powers of two from here


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
        self.capture_seconds = 0.0  # wall time spent capturing (a new shape's one-off cost)
        self._out: dict[str, torch.Tensor] = {}  # shared output buffers

    # ------------------------------------------------------------------ shapes
    def shape(self, chunks: list[Chunk]) -> tuple[int, int, int] | None:
        """(B, Q, L) buckets for `chunks`, or None when the batch is not graph-sized."""
        B = _bucket(len(chunks), BATCH_BUCKETS)
        Q = _bucket(max(len(c.token_ids) for c in chunks), TOKEN_BUCKETS)
        end = max(c.start + len(c.token_ids) for c in chunks)
        L = MIN_CONTEXT
        while L < end:
            L *= 2
        if B is None or Q is None or end > self.max_context:
            return None
        if any(c.num_logits > min(Q, MAX_LOGITS_PER_SEQ) for c in chunks):
            return None
        return B, Q, L

    def _buffers(self) -> dict[str, torch.Tensor]:
        """The output buffers every graph writes: logits and final hidden states of up to
        `MAX_LOGITS_PER_SEQ` rows per sequence, the saved prefix of every token."""
        if not self._out:
            cfg, dev, dt = self.model.cfg, self.device, self.model.dtype
            rows = BATCH_BUCKETS[-1] * MAX_LOGITS_PER_SEQ
            self._out = {
                "logits": torch.empty(rows, cfg.vocab_size, dtype=torch.float32, device=dev),
                "hidden": torch.empty(rows, cfg.hidden_size, dtype=dt, device=dev),
                "prefix": torch.empty(BATCH_BUCKETS[-1] * TOKEN_BUCKETS[-1], cfg.hidden_size, dtype=dt, device=dev),
            }
        return self._out

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], route=None, *, start_sublayer: int = 0,
                start_hidden: torch.Tensor | None = None, save_at: int | None = None,
                want_hidden: bool = False, argmax_only: bool = False) -> ForwardOutput | None:
        # argmax_only: the fp16 LM-head read of a greedy pass is a CPU path (model.GreedyHead);
        # a captured graph computes the full logits
        shape = self.shape(chunks)
        if shape is None:
            return None
        B, Q, L = shape
        R = min(Q, MAX_LOGITS_PER_SEQ)
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
            logit_rows.extend(range(b * R + R - c.num_logits, b * R + R))
            token_rows.extend(range(r, r + n))
        key = (B, Q, L, route, start_sublayer, save_at)
        g = self.graphs.get(key)
        fresh = g is None
        if fresh:
            g = self._allocate(B, Q, L, start_sublayer > 0)
        g.packed.copy_(host)
        rows_t = torch.tensor(token_rows, dtype=torch.long).to(self.device)
        if g.start_hidden is not None:
            g.start_hidden.zero_()
            g.start_hidden.index_copy_(0, rows_t, start_hidden.to(g.start_hidden.dtype))
        if not self.capture:
            self._run(g, B, Q, L, route, start_sublayer, save_at)
        else:
            if fresh:
                self._capture(g, B, Q, L, route, start_sublayer, save_at)
                self.graphs[key] = g
            g.graph.replay()
        self.num_replays += 1
        lrows = torch.tensor(logit_rows, dtype=torch.long).to(self.device)
        logits = self._out["logits"][: B * R].index_select(0, lrows)
        hidden = self._out["hidden"][: B * R].index_select(0, lrows) if want_hidden else logits.new_empty(0, 0)
        prefix = None
        if save_at is not None:
            prefix = self._out["prefix"][: B * Q].index_select(0, rows_t)
        return ForwardOutput(logits=logits, hidden=hidden, prefix_hidden=prefix)

    # ------------------------------------------------------------------ capture
    def _allocate(self, B: int, Q: int, L: int, with_start: bool) -> _Graph:
        nblk = L // self.block_size
        packed = torch.zeros(2 * B * Q + B * nblk, dtype=torch.long, device=self.device)
        start = None
        if with_start:
            start = torch.zeros(B * Q, self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.device)
        return _Graph(torch.cuda.CUDAGraph() if self.capture else None, packed, start)

    def _batch(self, g: _Graph, B: int, Q: int, L: int) -> ForwardBatch:
        """The padded batch's metadata, computed on the device from the packed inputs."""
        bs = self.block_size
        nblk = L // bs
        dev = self.device
        R = min(Q, MAX_LOGITS_PER_SEQ)
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
        # logits for the last R rows of each sequence (clamped at its first row when shorter)
        last = real.sum(1, keepdim=True) - R + torch.arange(R, device=dev)[None, :]  # [B, R]
        logits_index = (flat.view(B, Q)[:, :1] + last.clamp(min=0)).reshape(-1)
        return ForwardBatch(input_ids=ids, positions=pos.reshape(-1), slot_mapping=slot.reshape(-1),
                            ctx_slots=ctx_slots, q_index=flat.view(B, Q), out_index=flat, attn_mask=mask,
                            logits_index=logits_index, num_seqs=B, token_seq=None, dense=True)

    def _run(self, g: _Graph, B: int, Q: int, L: int, route, start_sublayer: int, save_at: int | None) -> None:
        """One padded forward, its outputs written into the shared buffers (what a graph records)."""
        out = self.model.forward(self._batch(g, B, Q, L), self.cache.k, self.cache.v, route,
                                 start_sublayer=start_sublayer, start_hidden=g.start_hidden, save_at=save_at,
                                 want_hidden=True)
        buf = self._buffers()
        buf["logits"][: out.logits.shape[0]].copy_(out.logits)
        buf["hidden"][: out.hidden.shape[0]].copy_(out.hidden)
        if out.prefix_hidden is not None:
            buf["prefix"][: out.prefix_hidden.shape[0]].copy_(out.prefix_hidden)

    def _capture(self, g: _Graph, B: int, Q: int, L: int, route, start_sublayer: int, save_at: int | None) -> None:
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        self._buffers()  # on the current stream, before the warm-up's side stream
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._run(g, B, Q, L, route, start_sublayer, save_at)  # warm-up
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(g.graph, pool=self.pool):
            self._run(g, B, Q, L, route, start_sublayer, save_at)
        self.num_captures += 1
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - t0
