"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step, running sequences keep their place (oldest first), waiting ones join while the caps
allow (`max_num_seqs`, `max_num_batched_tokens`, free blocks), long prompts are prefilled in
chunks, and when the block pool runs dry the newest running sequence is preempted (its blocks
freed, its tokens kept for recompute) and put at the front of the queue. A request can be aborted
at any time; every block it held goes back to the pool.

With the prefix cache on, a sequence joining the batch first takes the cached blocks its tokens
start with (never the block of its last token, whose logits it needs), and after every step the
blocks its full passes have finished are registered (`cache_computed`); a preempted sequence finds
its own blocks again if they were not evicted meanwhile.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from server.engine.block_pool import BlockPool, OutOfBlocks
from server.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # committed tokens fed this step (from full_frontier)
    decode: bool  # True: the step samples (num_new == seq.uncomputed); False: a prefill chunk
    lookahead: int  # draft slots reserved after the committed tokens


class Scheduler:
    def __init__(self, pool: BlockPool, *, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_chunk: int, max_lookahead: int, spec_max_batch: int = 10**9,
                 prefix_caching: bool = False):
        self.pool = pool
        self.prefix_caching = prefix_caching
        self.prefix_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hits = 0  # of which found there
        self.spec_max_batch = spec_max_batch
        self._spec_slots = 0  # draft slots left to hand out in the step being scheduled
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.max_lookahead = max_lookahead
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and return all its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.table.release(self.pool)

    def _plan(self, seq: Sequence, budget: int) -> ScheduledSeq | None:
        unc = seq.uncomputed
        if unc <= self.prefill_chunk and unc <= budget:
            la = 0
            if seq.spec.mode != "off" and self._spec_slots > 0:
                la = self.max_lookahead
                self._spec_slots -= 1
            return ScheduledSeq(seq, unc, True, la)
        n = min(self.prefill_chunk, budget, unc - 1)
        if n <= 0:
            return None
        return ScheduledSeq(seq, n, False, 0)

    def _reserve(self, s: ScheduledSeq) -> bool:
        try:
            s.seq.table.ensure(self.pool, s.seq.full_frontier + s.num_new + s.lookahead)
            return True
        except OutOfBlocks:
            return False

    def _match(self, seq: Sequence) -> int:
        """Take the cached blocks `seq`'s tokens start with; its frontiers move past them. Returns
        the number of tokens found."""
        if not self.prefix_caching or seq.table.blocks or seq.full_frontier or seq.reads_prompt_logprobs:
            return 0  # (a cached block has no logits to give prompt logprobs from)
        bs, toks, parent = seq.table.block_size, seq.token_ids, self.pool.ROOT
        for i in range((len(toks) - 1) // bs):
            hit = self.pool.lookup(parent, tuple(toks[i * bs:(i + 1) * bs]))
            if hit is None:
                break
            block, parent = hit
            self.pool.take(block)
            seq.table.blocks.append(block)
            seq.block_serials.append(parent)
        seq.full_frontier = seq.slim_frontier = len(seq.table.blocks) * bs
        return seq.full_frontier

    def _unadmit(self, seq: Sequence) -> None:
        """A waiting sequence that did not fit: its blocks (cached prefix, partial reservation) go back."""
        seq.table.release(self.pool)
        seq.full_frontier = seq.slim_frontier = 0
        seq.block_serials = []

    def cache_computed(self, seq: Sequence) -> None:
        """Register `seq`'s blocks that are now full and below its full frontier (K/V final)."""
        if not self.prefix_caching or seq.finished:
            return
        bs, serials = seq.table.block_size, seq.block_serials
        end = min(seq.full_frontier, seq.num_tokens)
        while (len(serials) + 1) * bs <= end:
            i = len(serials)
            serials.append(self.pool.register(seq.table.blocks[i], serials[-1] if serials else self.pool.ROOT,
                                              tuple(seq.token_ids[i * bs:(i + 1) * bs])))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.table.release(self.pool)
        seq.reset_for_recompute()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledSeq]:
        out: list[ScheduledSeq] = []
        budget = self.max_num_batched_tokens
        # draft slots (KV and token budget) only for a step the engine will speculate in: at most
        # spec_max_batch decoding sequences. Reserving them for a wide batch that then decodes
        # plainly would take budget and blocks from the prefills queued behind it.
        decoding = sum(1 for s in self.running if s.uncomputed <= self.prefill_chunk)
        self._spec_slots = self.spec_max_batch if decoding <= self.spec_max_batch else 0
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            plan = self._plan(seq, budget)
            if plan is None:  # out of token budget this step; keep its place
                i += 1
                continue
            while not self._reserve(plan):
                victim = self.running[-1]
                if victim is seq:
                    break
                self._preempt(victim)
                out = [s for s in out if s.seq is not victim]
            else:
                out.append(plan)
                budget -= plan.num_new + plan.lookahead
                i += 1
                continue
            # could not fit even alone among the survivors: preempt it too
            self._preempt(seq)
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            hit = self._match(seq)
            plan = self._plan(seq, budget)
            if plan is None or not self._reserve(plan):
                self._unadmit(seq)
                break
            if self.prefix_caching:
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += hit
                if not seq.num_preemptions:
                    seq.num_cached_tokens = hit
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append(plan)
            budget -= plan.num_new + plan.lookahead
        return out
