"""Model runner: the model, its paged cache, and forwards over lists of chunks."""

from __future__ import annotations

import dataclasses

import torch

from server.engine.kv_cache import Chunk, KVCache, build_batch
from server.engine.model import ForwardOutput, LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache, *, cuda_graphs: bool = True,
                 wide_dtype: torch.dtype | None = None):
        self.model = model
        self.cache = cache
        self.wide_dtype = wide_dtype  # EngineConfig.prefill_dtype: the products of wide passes
        self.num_forwards = 0
        # layers whose outputs a pass that wants hidden states returns with them (a draft head
        # that reads low- and mid-level features: DraftHead.taps)
        self.taps: tuple[int, ...] = ()
        self.graphs = None
        if cuda_graphs and cache.device.type == "cuda":
            from server.engine.cuda_graphs import CudaGraphRunner

            self.graphs = CudaGraphRunner(model, cache)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], route=None, **kw) -> ForwardOutput:
        self.num_forwards += 1
        if self.taps and kw.get("want_hidden"):
            # the drafter reads tapped layers too: `hidden` becomes [M, (len(taps) + 1) H], the
            # tapped layers' outputs and then the final-norm state (not on CUDA graphs' buffers)
            out = self.model.forward(build_batch(chunks, self.cache.device), self.cache.k, self.cache.v, route,
                                     wide_dtype=self.wide_dtype, taps=self.taps, **kw)
            return dataclasses.replace(out, hidden=torch.cat([out.taps.flatten(1), out.hidden], dim=1), taps=None)
        if self.graphs is not None:
            out = self.graphs.forward(chunks, route, **kw)  # None: not a decode-sized batch
            if out is not None:
                return out
        batch = build_batch(chunks, self.cache.device)
        return self.model.forward(batch, self.cache.k, self.cache.v, route, wide_dtype=self.wide_dtype, **kw)
