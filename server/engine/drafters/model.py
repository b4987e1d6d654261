"""The `model` drafter: a separate, smaller model with the same tokenizer, with its own paged
cache. Per sequence it remembers which tokens it has fed; after verification it keeps only the
longest prefix that still matches the committed tokens (rollback), so rejected drafts cost
nothing to undo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.block_pool import BlockTable, OutOfBlocks
from server.engine.drafters.autoregressive import DraftPrice, draft_loop
from server.engine.drafters.base import DraftBatch, Drafter
from server.engine.kv_cache import Chunk, KVCache
from server.engine.model import LlamaModel
from server.engine.runner import ModelRunner


@dataclass
class _State:
    table: BlockTable
    fed: list[int] = field(default_factory=list)  # tokens whose K/V the drafter holds, by position


class ModelDrafter(Drafter):
    name = "model"

    def __init__(self, engine, min_confidence: float = 0.4, memory_gb: float = 0.25):
        from server.engine.engine import DTYPES

        cfg = engine.config
        if not cfg.spec.draft_model:
            raise ValueError("the `model` drafter needs a draft model folder (SpecConfig.draft_model)")
        dtype = DTYPES[cfg.dtype]
        self.model = LlamaModel.from_folder(cfg.spec.draft_model, dtype, engine.device)
        if self.model.cfg.vocab_size != engine.model.cfg.vocab_size:
            raise ValueError("the draft model must share the target's tokenizer and vocabulary")
        nb = KVCache.num_blocks_for_memory(self.model.cfg, cfg.block_size, memory_gb, dtype)
        self.cache = KVCache(self.model.cfg, nb, cfg.block_size, dtype, engine.device)
        self.runner = ModelRunner(self.model, self.cache)
        self.min_confidence = min_confidence
        # the draft model's parameters over the target's: the price of a draft token until measured
        self.price = DraftPrice(engine, self.model.cfg.counted_params() / engine.model.cfg.counted_params())
        self.states: dict[int, _State] = {}

    def _state(self, seq) -> _State:
        st = self.states.get(id(seq))
        if st is None:
            st = self.states[id(seq)] = _State(self.cache.new_table())
        return st

    def propose(self, seqs, max_tokens: list[int], pass_cost=None) -> DraftBatch:
        max_tokens = self.price.lengths(seqs, max_tokens)
        first, keep, limits = [], [], []
        for seq, k in zip(seqs, max_tokens):
            st = self._state(seq)
            common = 0
            for a, b in zip(st.fed, seq.token_ids):
                if a != b:
                    break
                common += 1
            common = min(common, seq.num_tokens - 1)
            del st.fed[common:]
            st.table.truncate(self.cache.pool, common)
            try:
                st.table.ensure(self.cache.pool, seq.num_tokens + k)
            except OutOfBlocks:
                k = 0
            new = seq.token_ids[common:]
            if k > 0:
                st.fed.extend(new)
            first.append(Chunk(st.table, common, new, 1))
            limits.append(k)
            keep.append(st)
        drafts = draft_loop(lambda ch: self.runner.forward(ch).logits, first, limits, self.min_confidence,
                            timed=self.price.observe)
        for st, d in zip(keep, drafts):
            st.fed.extend(d[:-1])  # the last draft token was never fed
        return DraftBatch(drafts)

    def release(self, seq) -> None:
        st = self.states.pop(id(seq), None)
        if st is not None:
            st.table.release(self.cache.pool)
