"""Model runner: the model, its paged cache, and forwards over lists of chunks."""

from __future__ import annotations

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
        self.graphs = None
        if cuda_graphs and cache.device.type == "cuda":
            from server.engine.cuda_graphs import CudaGraphRunner

            self.graphs = CudaGraphRunner(model, cache)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], route=None, **kw) -> ForwardOutput:
        self.num_forwards += 1
        if self.graphs is not None:
            out = self.graphs.forward(chunks, route, **kw)  # None: not a decode-sized batch
            if out is not None:
                return out
        batch = build_batch(chunks, self.cache.device)
        return self.model.forward(batch, self.cache.k, self.cache.v, route, wide_dtype=self.wide_dtype, **kw)
