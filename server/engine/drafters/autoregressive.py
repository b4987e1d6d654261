"""Greedy autoregressive drafting, batched over sequences, shared by the `self` and `model`
drafters: feed what the drafter has not seen, then one token at a time, stopping a sequence
where the drafter's top probability falls below `min_confidence` (it is unsure) or at its limit.
"""

from __future__ import annotations

import torch

from server.engine.kv_cache import Chunk


def draft_loop(forward, first_chunks: list[Chunk], max_tokens: list[int], min_confidence: float) -> list[list[int]]:
    """`forward(chunks) -> logits [B, V]` (one row per chunk). `first_chunks[i]` feeds sequence
    i's unseen tokens; later rounds feed the previous draft token. Returns the drafts."""
    drafts: list[list[int]] = [[] for _ in first_chunks]
    active = [i for i, k in enumerate(max_tokens) if k > 0]
    chunks = {i: first_chunks[i] for i in active}
    while active:
        logits = forward([chunks[i] for i in active])  # [len(active), V]
        probs = torch.softmax(logits.float(), -1)
        conf, tok = probs.max(-1)
        conf_l, tok_l = conf.tolist(), tok.tolist()
        nxt = []
        for j, i in enumerate(active):
            if drafts[i] and conf_l[j] < min_confidence:
                continue  # unsure: stop drafting this sequence (the first token is always kept)
            drafts[i].append(tok_l[j])
            if len(drafts[i]) < max_tokens[i]:
                c = chunks[i]
                chunks[i] = Chunk(c.table, c.start + len(c.token_ids), [tok_l[j]], 1)
                nxt.append(i)
        active = nxt
    return drafts
