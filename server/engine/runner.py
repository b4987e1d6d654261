"""Model runner: the model, its paged cache, and forwards over lists of chunks."""

from __future__ import annotations

import torch

from server.engine.kv_cache import Chunk, KVCache, build_batch
from server.engine.model import ForwardOutput, LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache):
        self.model = model
        self.cache = cache
        self.num_forwards = 0

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], route=None, **kw) -> ForwardOutput:
        batch = build_batch(chunks, self.cache.device)
        self.num_forwards += 1
        return self.model.forward(batch, self.cache.k, self.cache.v, route, **kw)
