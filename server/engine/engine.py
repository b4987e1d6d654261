"""The embedded engine: requests in, token deltas out, one batched step at a time.

`LLMEngine.step()` runs one scheduling round for every running sequence together:
prefill chunks and plain decodes go through one full forward; speculative sequences go through
`server.engine.spec_step` (draft -> slim pass -> gate -> full pass only where needed -> verify).
Each step reads the device once for its decisions (the host sync).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import replace
from pathlib import Path

import torch

from server.engine.api import (
    CompletionResult,
    EngineStats,
    GenerationRequest,
    RequestOutput,
    RequestRejected,
    SpecUsage,
    TokenLogprob,
)
from server.engine.config import PREFILL_DTYPES, ConfigError, EngineConfig
from server.engine.draft_length import PassCosts, prior_slope
from server.engine.kv_cache import Chunk, KVCache
from server.engine.model import ForwardOutput, LlamaModel
from server.engine.runner import ModelRunner
from server.engine.scheduler import ScheduledSeq, Scheduler
from server.engine.sequence import Sequence, Status
from server.engine.structured import GrammarMasks
from server.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from via_sd_kernels import cpu as cpu_kernels
from via_sd_kernels.sampling import logits_to_probs, position_uniforms, sample_by_uniform

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def bad_words_token_ids(tokenizer, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """vLLM's tokenization of `bad_words`: each word as written and, where that gives another
    token sequence of the same length, after a space (a word inside the text)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip()))
        if bare:
            out.append(bare)
        spaced = tuple(tokenizer.encode(" " + word.lstrip()))
        if spaced and (not bare or (spaced[0] != bare[0] and len(spaced) == len(bare))):
            out.append(spaced)
    return tuple(out)


class LLMEngine:
    def __init__(self, config: EngineConfig, *, model: LlamaModel | None = None, tokenizer: Tokenizer | None = None):
        self.config = config
        path = Path(config.model)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = self._device(config.device)
        self.model = model or LlamaModel.from_folder(path, DTYPES[config.dtype], self.device)
        mcfg = self.model.cfg
        self.tokenizer = tokenizer or Tokenizer.from_folder(path, extra_eos=mcfg.eos_token_ids)
        self.eos_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(mcfg.eos_token_ids)
        self.grammars = GrammarMasks(self.tokenizer, mcfg.vocab_size)
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        dtype = DTYPES[config.dtype] if config.kv_cache_dtype == "auto" else torch.float16
        num_blocks = config.num_blocks or KVCache.num_blocks_for_memory(mcfg, config.block_size, config.kv_cache_memory_gb, dtype)
        self.cache = KVCache(mcfg, num_blocks, config.block_size, dtype, self.model.device)
        if config.prefill_dtype not in PREFILL_DTYPES:
            raise ConfigError(f"prefill_dtype must be one of {', '.join(PREFILL_DTYPES)}, got {config.prefill_dtype!r}",
                              "prefill_dtype")
        wide = torch.bfloat16 if config.prefill_dtype == "bfloat16" and self.model.dtype == torch.float32 else None
        if wide is not None:
            self.model.wide_weights(wide)  # the bf16 copies now, not in the first request's prompt
        self.runner = ModelRunner(self.model, self.cache, cuda_graphs=config.cuda_graphs, wide_dtype=wide)
        self.max_lookahead = max(1, config.spec.num_draft_tokens, 16) if config.spec.mode != "off" else 16
        self.scheduler = Scheduler(
            self.cache.pool,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            prefill_chunk=config.prefill_chunk,
            max_lookahead=self.max_lookahead,
            spec_max_batch=config.spec.spec_max_batch,
            prefix_caching=config.enable_prefix_caching,
        )
        self.seqs: dict[str, Sequence] = {}
        self.stats_ = EngineStats()
        from server.engine.spec_step import SpecDecoder

        self.pass_costs = PassCosts(prior_slope=prior_slope(self.device.type))  # one-sequence decode passes by size
        self.spec = SpecDecoder(self)

    @staticmethod
    def _device(name: str) -> torch.device:
        kind, _, index = name.partition(":")
        if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, got {name!r}", "device")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for, but torch sees no CUDA device", "device")
        return torch.device(name)

    # ------------------------------------------------------------------ requests
    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """Check a request without touching engine state; raises RequestRejected."""
        try:
            sampling = request.sampling.validate()
            spec_req = request.spec.validate()
        except ConfigError as e:
            raise RequestRejected(str(e), e.param) from e
        n_prompt = len(request.prompt_token_ids)
        if n_prompt == 0:
            raise RequestRejected("the prompt is empty", "prompt")
        vocab = self.model.cfg.vocab_size
        if any(not (0 <= t < vocab) for t in request.prompt_token_ids):
            raise RequestRejected(f"prompt token ids must be in [0, {vocab})", "prompt")
        if any(not (0 <= t < vocab) for t, _ in sampling.logit_bias):
            raise RequestRejected(f"logit_bias token ids must be in [0, {vocab})", "logit_bias")
        if any(not (0 <= t < vocab) for t in sampling.allowed_token_ids or ()):
            raise RequestRejected(f"allowed_token_ids must be in [0, {vocab})", "allowed_token_ids")
        if sampling.bad_words and not sampling.bad_words_token_ids:
            sampling = replace(sampling, bad_words_token_ids=bad_words_token_ids(self.tokenizer, sampling.bad_words))
        if n_prompt + sampling.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{n_prompt} tokens and max_tokens is {sampling.max_tokens}; shorten the prompt or lower max_tokens",
                "max_tokens" if n_prompt < self.max_model_len else "messages",
                "context_length_exceeded",
            )
        # a sequence that cannot fit in the whole KV cache alone would be preempted for ever
        speculates = self.config.spec.resolve(spec_req).mode != "off"
        lookahead = self.max_lookahead if speculates else 0
        bs = self.cache.block_size
        capacity = self.cache.pool.num_usable * bs
        need = -(-(n_prompt + sampling.max_tokens + lookahead) // bs) * bs
        if need > capacity:
            raise RequestRejected(
                f"this server's KV cache holds {capacity} tokens; the prompt has {n_prompt} tokens and max_tokens "
                f"is {sampling.max_tokens}" + (f" (plus {lookahead} draft slots)" if lookahead else "")
                + "; shorten the prompt or lower max_tokens",
                "max_tokens" if n_prompt + lookahead < capacity else "messages",
                "context_length_exceeded",
            )
        return replace(request, sampling=sampling, spec=spec_req)

    def add_request(self, request: GenerationRequest) -> Sequence:
        if request.request_id in self.seqs:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        request = self.validate(request)
        sampling, spec_req = request.sampling, request.spec
        n_prompt = len(request.prompt_token_ids)
        spec = self.config.spec.resolve(spec_req)
        if spec.num_draft_tokens == 0 and spec.mode != "off":
            spec = replace(spec, mode="off")
        matcher = None
        if sampling.structured_outputs is not None:
            try:
                matcher = self.grammars.matcher(sampling.structured_outputs)
            except ConfigError as e:
                raise RequestRejected(str(e), e.param) from e
        seed = None
        if not sampling.greedy:
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        seq = Sequence(
            request=replace(request, sampling=sampling),
            spec=spec,
            table=self.cache.new_table(),
            detok=IncrementalDetokenizer(self.tokenizer, sampling.stop, sampling.min_tokens, sampling.skip_special_tokens,
                                        sampling.include_stop_str_in_output),
            token_ids=list(request.prompt_token_ids),
            num_prompt=n_prompt,
            seed=seed,
            prompt_logprobs=None if sampling.prompt_logprobs is None else [None],
            matcher=matcher,
        )
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)
        self.stats_.prompt_tokens += n_prompt
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.finished:
            return None
        self._finish(seq, "abort")
        return self._delta(seq)

    def fail(self, request_id: str, message: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.finished:
            return None
        seq.error = message
        self._finish(seq, "error")
        return self._delta(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        s = replace(self.stats_)
        s.requests_running = len(self.scheduler.running)
        s.requests_waiting = len(self.scheduler.waiting)
        s.kv_cache_usage = self.cache.pool.usage
        s.preemptions = self.scheduler.num_preemptions
        s.prefix_cache_queries = self.scheduler.prefix_queries
        s.prefix_cache_hits = self.scheduler.prefix_hits
        return s

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        self.stats_.num_steps += 1
        prefills = [s for s in scheduled if not s.decode]
        decodes = [s for s in scheduled if s.decode]
        # a sequence speculates only where the scheduler reserved its draft slots
        # (a sequence still reading its prompt's logprobs decodes plainly: its chunk returns them)
        speculates = [s.seq.spec.mode != "off" and s.lookahead > 0 and not s.seq.reads_prompt_logprobs
                      for s in decodes]
        plain = [s for s, sp in zip(decodes, speculates) if not sp]
        specs = [s for s, sp in zip(decodes, speculates) if sp]
        if len(decodes) > self.config.spec.spec_max_batch:
            # a wide batch is compute-bound: verifying drafts costs more than it saves, so every
            # sequence decodes plainly (the plain chunk also catches up a three-tier slim backlog)
            plain, specs = decodes, []
        committed: dict[Sequence, tuple[list[int], list[TokenLogprob] | None]] = {}
        # speculative sequences decide which of them need the full pass; the rest are done
        full_chunks: list[Chunk] = [Chunk(s.seq.table, s.seq.full_frontier, s.seq.token_ids[s.seq.full_frontier:s.seq.full_frontier + s.num_new],
                                          s.num_new if s.seq.reads_prompt_logprobs else 0) for s in prefills]
        spec_job = self.spec.begin(specs) if specs else None
        if spec_job is not None:  # sequences without a draft this step decode plainly
            plain = plain + spec_job.undrafted
            if not spec_job.plans:
                spec_job = None
        plain_chunks = [Chunk(s.seq.table, s.seq.full_frontier, s.seq.token_ids[s.seq.full_frontier:],
                              s.seq.uncomputed if s.seq.reads_prompt_logprobs else 1) for s in plain]
        extra = spec_job.full_chunks if spec_job else []
        all_chunks = full_chunks + plain_chunks + extra
        out = None
        if all_chunks:
            start = spec_job.prefix_start(len(full_chunks) + len(plain_chunks)) if spec_job else None
            # greedy requests without logprobs read only the argmax of the full pass's logits
            argmax_only = all(s.seq.argmax_only for s in plain + specs) and not any(
                s.seq.reads_prompt_logprobs for s in prefills)
            if start is not None:
                taps = {} if start[2] is None else {"start_taps": start[2]}
                out = self.runner.forward(all_chunks, start_sublayer=start[0], start_hidden=start[1], want_hidden=True,
                                          argmax_only=argmax_only, **taps)
            else:
                # a drafter that reads hidden states sees every committed token, plain steps included
                watch = self.spec.drafter.wants_hidden and (spec_job is not None or any(s.seq.spec.mode != "off" for s in plain))
                timed = not prefills and len(all_chunks) == 1
                t0 = time.perf_counter() if timed else 0.0
                out = self.runner.forward(all_chunks, want_hidden=watch, argmax_only=argmax_only)
                if timed:
                    if out.logits.device.type == "cuda":
                        torch.cuda.synchronize(out.logits.device)
                    # one sequence's decode-sized pass: what a draft token adds to it (draft_length)
                    one = all_chunks[0]
                    self.pass_costs.observe(len(one.token_ids), time.perf_counter() - t0, one.start + len(one.token_ids))
        if any(c.num_logits for c in full_chunks) or any(c.num_logits > 1 for c in plain_chunks):
            out = self._take_prompt_logprobs(prefills + plain, full_chunks + plain_chunks, out)
        for s in prefills:
            s.seq.full_frontier += s.num_new
            s.seq.slim_frontier = max(s.seq.slim_frontier, s.seq.full_frontier)
        if plain:
            logits = out.logits[: len(plain)]  # prefill chunks asked for no logits
            toks, lps = self._sample([s.seq for s in plain], logits)
            hidden = out.hidden if out.hidden.numel() else None
            for r, (s, t, lp) in enumerate(zip(plain, toks, lps)):
                s.seq.full_frontier = s.seq.num_tokens
                s.seq.slim_frontier = s.seq.full_frontier
                committed[s.seq] = ([t], lp)
                if hidden is not None and s.seq.spec.mode != "off":
                    self.spec.drafter.observe(s.seq, hidden[r:r + 1], [t])
                # every plain step (an `off` request's, or a speculative request's without a draft,
                # in a batch too wide to speculate, without draft slots, or reading prompt logprobs)
                # is one step and one full pass, so full passes per token read 1.0 for `off` traffic
                self.spec.count_plain(s.seq)
        if spec_job:
            logits = out.logits[len(plain):] if out is not None else None
            hidden = out.hidden[len(plain):] if out is not None and out.hidden.numel() else None
            committed.update(spec_job.finish(logits, hidden))
        for s in scheduled:  # blocks whose K/V the full model has finished join the prefix cache
            self.scheduler.cache_computed(s.seq)
        outputs = []
        for seq, (toks, lps) in committed.items():
            self._commit(seq, toks, lps)
        for seq in [s.seq for s in scheduled]:
            if seq.pending_ids or seq.finished:
                outputs.append(self._delta(seq))
        return outputs

    def _take_prompt_logprobs(self, scheduled: list[ScheduledSeq], chunks: list[Chunk],
                              out: ForwardOutput) -> ForwardOutput:
        """Record the prompt logprobs of the sequences that asked for them from their chunks'
        logits rows (prefill chunks: every row; a plain chunk: every row, its last one samples),
        and return `out` with the rows the rest of the step reads: one per plain chunk, then the
        speculative sequences' rows, as when no chunk asked for more."""
        keep: list[int] = []
        at = 0
        for s, c in zip(scheduled, chunks):
            n = c.num_logits
            seq = s.seq
            if seq.reads_prompt_logprobs and n:
                # row j predicts the token at position c.start + j + 1
                # (after a preemption the recompute reads positions it has again: only new ones count)
                first = c.start + 1
                lo = max(first, len(seq.prompt_logprobs))
                upto = min(c.start + n + 1, seq.num_prompt)  # positions [lo, upto) are prompt tokens
                if upto > lo and len(seq.prompt_logprobs) >= first:
                    ids = torch.tensor(seq.token_ids[lo:upto], device=out.logits.device)
                    rows = out.logits[at + lo - first: at + upto - first]
                    seq.prompt_logprobs.extend(self._logprobs_of(rows, ids, seq.request.sampling.prompt_logprobs,
                                                                 ranks=True))
            if s.decode:
                keep.append(at + n - 1)
            at += n
        keep.extend(range(at, out.logits.shape[0]))
        idx = torch.tensor(keep, dtype=torch.long, device=out.logits.device)
        hidden = out.hidden[idx] if out.hidden.numel() else out.hidden
        return dataclasses.replace(out, logits=out.logits[idx], hidden=hidden)

    @staticmethod
    def _logprobs_of(logits: torch.Tensor, ids: torch.Tensor, k: int, ranks: bool = False) -> list[TokenLogprob]:
        """Each row's log-probability of its token in `ids`, with the row's top k (and, with
        `ranks`, the token's rank: 1 + the tokens more likely than it)."""
        lsm = torch.log_softmax(logits.float(), -1)
        chosen_t = lsm.gather(-1, ids.view(-1, 1))
        rank = ((lsm > chosen_t).sum(-1) + 1).tolist() if ranks else [None] * len(ids)
        chosen = chosen_t.squeeze(-1).tolist()
        top_v, top_i = lsm.topk(max(k, 1), -1)
        top_v, top_i = top_v[:, :k].tolist(), top_i[:, :k].tolist()
        return [TokenLogprob(int(t), float(c), tuple(zip(ti, tv)), r)
                for t, c, ti, tv, r in zip(ids.tolist(), chosen, top_i, top_v, rank)]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor):  # logits [B, V]
        """One new token per sequence; the per-step host sync happens here."""
        raw = logits
        if any(s.adjusts_logits for s in seqs):
            logits = self._adjusted(seqs, logits)
        greedy = all(s.request.sampling.greedy for s in seqs)
        if greedy:
            toks = cpu_kernels.argmax(logits)
        else:
            sp = [s.request.sampling for s in seqs]
            dev = logits.device
            probs = logits_to_probs(
                logits,
                torch.tensor([p.temperature for p in sp], device=dev),
                torch.tensor([p.top_k for p in sp], device=dev),
                torch.tensor([p.top_p for p in sp], device=dev),
                torch.tensor([p.min_p for p in sp], device=dev) if any(p.min_p for p in sp) else None,
            )
            # one uniform per request and position, so a seed gives the same text anywhere, whatever
            # the batch and however speculation cut the steps
            u = position_uniforms([s.seed for s in seqs], [s.num_tokens for s in seqs], [1] * len(seqs))
            toks = sample_by_uniform(probs, u)
        lps = self.logprobs_for(seqs, raw, toks)
        return toks.tolist(), lps

    def _adjusted(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """The logits (one row per sequence) with each request's penalties, bias and grammar."""
        logits = logits.clone()
        for b, seq in enumerate(seqs):
            if seq.adjusts_logits:
                logits[b:b + 1] = self.adjusted_rows(seq, [], logits[b:b + 1])
        return logits

    def adjusted_rows(self, seq: Sequence, drafts: list[int], rows: torch.Tensor) -> torch.Tensor:
        """One sequence's rows [len(drafts) + 1, V] of logits, row j as its request samples from
        them once `drafts[:j]` are committed, in vLLM's order: every token but `allowed_token_ids`
        at -inf; the logit bias added; EOS and the
        stop token ids at -inf while the output is shorter than `min_tokens`; the repetition
        penalty (positive logits divided by it, negative ones multiplied, for every token of the
        prompt and the output); OpenAI's penalties (minus frequency x the token's count in the
        output, minus presence where it is at least 1); and the tokens the grammar forbids at -inf.
        Plain sampling passes no drafts; verification passes the drafts it checks, so that what it
        accepts is what plain decoding would sample."""
        sp = seq.request.sampling
        rows = rows.clone()
        V, dev = rows.shape[-1], rows.device
        if sp.allowed_token_ids is not None:
            allowed = torch.zeros(V, dtype=torch.bool, device=dev)
            allowed[torch.tensor(sp.allowed_token_ids, dtype=torch.long, device=dev)] = True
            rows = rows.masked_fill(~allowed, float("-inf"))
        if sp.logit_bias:
            ids = torch.tensor([t for t, _ in sp.logit_bias], device=dev)
            rows[:, ids] += torch.tensor([v for _, v in sp.logit_bias], device=dev)
        short = sp.min_tokens - seq.num_output  # rows 0 .. short-1 may not end the output
        if short > 0:
            ends = [t for t in set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.eos_ids)) if t < V]
            if ends:
                rows[:short, torch.tensor(ends, device=dev)] = float("-inf")
        if sp.repetition_penalty != 1.0:
            # row j: the tokens of the prompt, the output and drafts[:j]
            seen = torch.zeros(len(drafts) + 1, V, dtype=torch.bool, device=dev)
            seen[:, torch.tensor(seq.token_ids, dtype=torch.long, device=dev)] = True
            for j, d in enumerate(drafts):
                seen[j + 1:, d] = True
            p = sp.repetition_penalty
            rows = torch.where(seen, torch.where(rows > 0, rows / p, rows * p), rows)
        if sp.bad_words_token_ids:
            # row j: a word's last token is out where the output and drafts[:j] end with the rest of it
            past = seq.output_ids + list(drafts)
            n_out = seq.num_output
            for j in range(len(drafts) + 1):
                for word in sp.bad_words_token_ids:
                    head = list(word[:-1])
                    if not head or past[max(0, n_out + j - len(head)):n_out + j] == head:
                        rows[j, word[-1]] = float("-inf")
        if sp.presence_penalty or sp.frequency_penalty:
            # row j counts the output and drafts[:j]
            out = torch.tensor(seq.output_ids, dtype=torch.long, device=dev)
            counts = torch.bincount(out, minlength=V)[:V].to(rows.dtype)
            counts = counts.expand(len(drafts) + 1, V).clone()
            for j, d in enumerate(drafts):
                counts[j + 1:, d] += 1
            rows -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0)
        if seq.matcher is not None:
            allowed = self.grammars.draft_rows(seq.matcher, drafts, V).to(dev)
            rows = rows.masked_fill(~allowed, float("-inf"))
        return rows

    def logprobs_for(self, seqs: list[Sequence], logits: torch.Tensor, toks: torch.Tensor):
        """Log-probabilities of the chosen tokens (raw model distribution, as vLLM reports)."""
        ks = [s.request.sampling.logprobs for s in seqs]
        if all(k is None for k in ks):
            return [None] * len(seqs)
        lps = self._logprobs_of(logits, toks, max(k or 0 for k in ks))
        return [None if k is None else [replace(lp, top=lp.top[:k])] for lp, k in zip(lps, ks)]

    # ------------------------------------------------------------------ commit
    def _commit(self, seq: Sequence, toks: list[int], lps) -> None:
        if seq.finished:
            return
        sp = seq.request.sampling
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now - seq.arrival
        reason = None
        kept: list[int] = []
        for t in toks:
            kept.append(t)
            if (t in self.eos_ids and not sp.ignore_eos) or t in sp.stop_token_ids:
                reason = "stop"
                break
            if seq.matcher is not None:
                if not seq.matcher.consume_token(t):
                    seq.error = f"the output left its grammar: {seq.matcher.get_error()}"
                    self._finish(seq, "error")
                    return
                if seq.matcher.is_stopped():  # the text is complete: the grammar allows nothing more
                    reason = "stop"
                    break
            if seq.num_output + len(kept) >= sp.max_tokens:
                reason = "length"
                break
        seq.token_ids.extend(kept)
        seq.pending_ids.extend(kept)
        if lps:
            seq.pending_logprobs.extend(lps[: len(kept)])
        self.stats_.generation_tokens += len(kept)
        # whole tail blocks beyond what the committed tokens need go back to the pool
        seq.table.truncate(self.cache.pool, max(seq.num_tokens, seq.full_frontier, seq.slim_frontier))
        # the EOS or stop token id that ended the output shows in the text only with
        # include_stop_str_in_output, as in vLLM; an EOS kept by ignore_eos only without skip_special_tokens
        ended_by_token = reason == "stop" and ((kept[-1] in self.eos_ids and not sp.ignore_eos)
                                               or kept[-1] in sp.stop_token_ids)
        text_ids = kept[:-1] if ended_by_token and not sp.include_stop_str_in_output else kept
        if sp.skip_special_tokens:
            text_ids = [t for t in text_ids if t not in self.eos_ids]
        seq.pending_text += seq.detok.add(text_ids)
        if reason is None and seq.detok.stopped:
            reason = "stop"
        if reason:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.pending_text += seq.detok.flush()
        seq.finish_reason = reason
        seq.status = Status.FINISHED
        self.scheduler.remove(seq)
        self.spec.drafter.release(seq)

    def _delta(self, seq: Sequence) -> RequestOutput:
        ids = seq.pending_ids
        text = seq.pending_text
        lps = seq.pending_logprobs if seq.request.sampling.logprobs is not None else None
        out = RequestOutput(
            request_id=seq.request_id,
            token_ids=list(ids),
            text=text,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt,
            completion_tokens=seq.num_output,
            cached_tokens=seq.num_cached_tokens,
            via_sd=SpecUsage(**seq.usage.to_dict()),
            logprobs=list(lps) if lps is not None else None,
            error=seq.error,
        )
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent and (
                len(seq.prompt_logprobs) == seq.num_prompt or seq.finished):
            out.prompt_logprobs = list(seq.prompt_logprobs)
            seq.prompt_logprobs_sent = True
        seq.pending_ids = []
        seq.pending_text = ""
        seq.pending_logprobs = []
        if seq.finished:
            self.seqs.pop(seq.request_id, None)
        return out

    # ------------------------------------------------------------------ offline
    def generate(self, requests: list[GenerationRequest]) -> list[CompletionResult]:
        t0 = time.monotonic()
        acc: dict[str, CompletionResult] = {}
        for r in requests:
            self.add_request(r)
            acc[r.request_id] = CompletionResult(r.request_id, list(r.prompt_token_ids), [], "", "", SpecUsage(), None)
        while self.has_unfinished():
            for o in self.step():
                c = acc[o.request_id]
                c.token_ids.extend(o.token_ids)
                c.text += o.text
                if o.logprobs is not None:
                    c.logprobs = (c.logprobs or []) + o.logprobs
                if o.prompt_logprobs is not None:
                    c.prompt_logprobs = o.prompt_logprobs
                if o.token_ids and c.first_token_time is None:
                    c.first_token_time = time.monotonic() - t0
                if o.finished:
                    c.finish_reason = o.finish_reason or ""
                    c.via_sd = o.via_sd
                    c.cached_tokens = o.cached_tokens
                    c.finish_time = time.monotonic() - t0
        return [acc[r.request_id] for r in requests]
