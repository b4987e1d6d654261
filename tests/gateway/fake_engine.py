"""A deterministic in-memory `AsyncEngineClient` for gateway tests.

It follows the interface contract faithfully: `generate` raises `EngineNotReady`, `EngineBusy`
or `RequestRejected` before the first delta; deltas carry new tokens and text (detokenized
with the project's `IncrementalDetokenizer`, so stop strings behave as in the real engine) and
cumulative counts; closing the iterator or `abort` ends the request and returns its fake KV
blocks; `stats()` counters add up across requests.

Output: a fixed text cycled from an offset chosen by the prompt (greedy) or by the seed
(sampled). Each step emits a block of tokens whose speculation counts follow a fixed pattern,
consistent with `server.engine.api`: tier_accept <= accepted <= tier_accept + tier_full.

Error injection: `reject_with` (raised before the first delta), `fail_after_steps` (a delta
with `finish_reason="error"`), `eos_after` (EOS after that many tokens), `step_delay_s`.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass

from server.engine.api import (
    AsyncEngineClient,
    EngineBusy,
    EngineNotReady,
    EngineStats,
    GenerationRequest,
    RequestOutput,
    RequestRejected,
    SpecUsage,
    TokenLogprob,
)
from server.engine.tokenizer import IncrementalDetokenizer

CORPUS = "The quick brown fox jumps over the lazy dog. Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich. "


class FakeTokenizer:
    """Byte-level: ids 0..255 are bytes; 256 `<|im_start|>`, 257 `<|im_end|>` (EOS)."""

    IM_START, IM_END = 256, 257
    SPECIAL = {256: "<|im_start|>", 257: "<|im_end|>"}

    def __init__(self) -> None:
        self.eos_token_ids = (self.IM_END,)
        self.vocab_size = 258
        self.has_chat_template = True

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out.extend(self.SPECIAL[i].encode())
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, add_special_tokens: bool = False,
                            continue_final_message: bool = False, template_kwargs: dict | None = None) -> list[int]:
        ids: list[int] = []
        for i, m in enumerate(messages):
            ids += [self.IM_START] + self.encode(f"{m['role']}\n{m['content']}")
            if not (continue_final_message and i == len(messages) - 1):
                ids += [self.IM_END] + self.encode("\n")
        if add_generation_prompt:
            ids += [self.IM_START] + self.encode("assistant\n")
        return ids

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)

    def token_strs(self, ids: list[int]) -> list[str]:
        return [self.SPECIAL.get(i) or f"<0x{i:02X}>" for i in ids]


@dataclass
class _Seq:
    request_id: str
    prompt_len: int
    generated: int = 0
    blocks: int = 0
    aborted: bool = False


class FakeEngine(AsyncEngineClient):
    def __init__(
        self,
        *,
        max_model_len: int = 512,
        max_num_seqs: int = 4,
        max_waiting: int = 8,
        num_blocks: int = 256,
        block_size: int = 4,
        step_delay_s: float = 0.0,
        eos_after: int | None = None,
        reject_with: Exception | None = None,
        fail_after_steps: int | None = None,
        num_draft_tokens: int = 3,
        ready: bool = True,
    ):
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.step_delay_s = step_delay_s
        self.eos_after = eos_after
        self.reject_with = reject_with
        self.fail_after_steps = fail_after_steps
        self.gamma = num_draft_tokens
        self._tok = FakeTokenizer()
        self._ready = ready
        self._slots = asyncio.Semaphore(max_num_seqs)
        self._waiting = 0
        self._seqs: dict[str, _Seq] = {}
        self._used_blocks = 0
        self.s = EngineStats()
        self.aborted: list[str] = []
        self.requests: list[GenerationRequest] = []

    # -- interface -----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> FakeTokenizer:
        return self._tok

    async def start(self) -> None:
        self._ready = True

    async def shutdown(self, grace_s: float = 30.0) -> None:
        self._ready = False
        loop = asyncio.get_running_loop()
        end = loop.time() + grace_s
        while self._seqs and loop.time() < end:
            await asyncio.sleep(0.01)
        for rid in list(self._seqs):
            await self.abort(rid)

    def is_ready(self) -> bool:
        return self._ready

    async def abort(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            seq.aborted = True
            self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        s = EngineStats(**vars(self.s))
        s.requests_running = len(self._seqs)
        s.requests_waiting = self._waiting
        s.kv_cache_usage = self._used_blocks / self.num_blocks
        return s

    def generate(self, request: GenerationRequest):
        # checks happen at call time, before any delta, as the contract says
        if not self._ready:
            raise EngineNotReady("the engine is not ready")
        if self.reject_with is not None:
            raise self.reject_with
        if len(request.prompt_token_ids) + request.sampling.max_tokens > self.max_model_len:
            raise RequestRejected("prompt plus max_tokens exceed the context", "max_tokens", "context_length_exceeded")
        if len(self._seqs) >= self.max_num_seqs and self._waiting >= self.max_waiting:
            raise EngineBusy(retry_after_s=2)
        self.requests.append(request)
        return self._run(request)

    # -- the fake model ------------------------------------------------------------------------
    def _text_source(self, request: GenerationRequest) -> bytes:
        sp = request.sampling
        if sp.greedy:
            offset = sum(request.prompt_token_ids) % len(CORPUS)
        else:
            offset = random.Random(sp.seed).randrange(len(CORPUS))
        text = (CORPUS[offset:] + CORPUS * 64).encode("utf-8")
        return text

    def _blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    async def _run(self, request: GenerationRequest):
        sp, rid = request.sampling, request.request_id
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        seq = _Seq(rid, len(request.prompt_token_ids))
        self._seqs[rid] = seq
        detok = IncrementalDetokenizer(self._tok, sp.stop, sp.min_tokens, sp.skip_special_tokens, sp.include_stop_str_in_output)
        source = self._text_source(request)
        usage = SpecUsage()
        mode = request.spec.mode or "three_tier"
        gamma = self.gamma if request.spec.num_draft_tokens is None else request.spec.num_draft_tokens
        finished = False
        try:
            self._grow(seq, seq.prompt_len)
            self.s.prompt_tokens += seq.prompt_len
            step = 0
            while True:
                if self.step_delay_s:
                    await asyncio.sleep(self.step_delay_s)
                else:
                    await asyncio.sleep(0)
                if seq.aborted:
                    finished = True
                    yield self._out(rid, [], "", seq, usage, "abort")
                    return
                if self.fail_after_steps is not None and step >= self.fail_after_steps:
                    finished = True
                    yield self._out(rid, [], "", seq, usage, "error", error="injected failure")
                    return
                n = self._spec_step(step, mode, gamma, usage)
                step += 1
                n = min(n, sp.max_tokens - seq.generated)
                ids = []
                for _ in range(n):
                    if self.eos_after is not None and seq.generated + len(ids) >= self.eos_after and not sp.ignore_eos:
                        ids.append(FakeTokenizer.IM_END)
                        break
                    ids.append(source[seq.generated + len(ids)])
                seq.generated += len(ids)
                self._grow(seq, seq.prompt_len + seq.generated)
                self.s.generation_tokens += len(ids)
                self.s.num_steps += 1
                text = detok.add([i for i in ids if i != FakeTokenizer.IM_END])
                reason = None
                if FakeTokenizer.IM_END in ids or detok.stopped:
                    reason = "stop"
                elif seq.generated >= sp.max_tokens:
                    reason = "length"
                if reason is not None:
                    text += detok.flush()
                logprobs = self._logprobs(ids, sp.logprobs) if sp.logprobs is not None else None
                finished = reason is not None
                out = self._out(rid, ids, text, seq, usage, reason, logprobs=logprobs)
                if sp.prompt_logprobs is not None and step == 1:  # with the first delta, as the engine
                    ids_p = list(request.prompt_token_ids)
                    out.prompt_logprobs = [None] + self._logprobs(ids_p[1:], sp.prompt_logprobs)
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.aborted.append(rid)
            self._release(seq)

    def _spec_step(self, step: int, mode: str, gamma: int, usage: SpecUsage) -> int:
        """Counts of one step; returns how many tokens it emits."""
        usage.steps += 1
        if mode == "off" or gamma == 0:
            usage.full_passes += 1
            self.s.full_passes += 1
            return 1
        a = step % (gamma + 1)  # tier-A accepts in this block
        usage.draft_tokens += gamma
        self.s.draft_tokens += gamma
        self.s.num_drafts += 1
        self.s.tier_accept += a
        usage.accepted += a
        emitted = a + 1
        three = mode == "three_tier"
        if three:
            usage.slim_passes += 1
            self.s.slim_passes += 1
            self.s.controller_slim_on += 1
        if a < gamma and three and step % 2 == 1:  # tier B: the slim verifier regenerates
            self.s.tier_slim += 1
            usage.slim_regenerated += 1
            self.s.slim_regenerated += 1
        elif a == gamma and three and step % 3 == 0:  # confident bonus from the slim verifier
            usage.slim_regenerated += 1
            self.s.slim_regenerated += 1
        else:  # tier C (or binary): the full model decides the rest
            decided = gamma - a
            f = decided // 2  # of which the full model accepts half
            self.s.tier_full += decided
            usage.full_verified += decided
            usage.accepted += f
            usage.full_passes += 1
            self.s.full_passes += 1
            emitted += f
        self.s.accepted_tokens += emitted - 1  # all but the regenerated or bonus token
        return emitted

    def _logprobs(self, ids: list[int], k: int) -> list[TokenLogprob]:
        out = []
        for i in ids:
            top = [(i, -0.25)] + [((i + j) % 256, -1.0 - j) for j in range(1, k)]
            out.append(TokenLogprob(token_id=i, logprob=-0.25, top=tuple(top[:k])))
        return out

    def _out(self, rid, ids, text, seq, usage, reason, logprobs=None, error=None) -> RequestOutput:
        return RequestOutput(
            request_id=rid,
            token_ids=ids,
            text=text,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.generated,
            via_sd=SpecUsage(**usage.to_dict()),
            logprobs=logprobs,
            error=error,
        )

    def _grow(self, seq: _Seq, tokens: int) -> None:
        need = self._blocks_for(tokens)
        self._used_blocks += need - seq.blocks
        seq.blocks = need

    def _release(self, seq: _Seq) -> None:
        if self._seqs.pop(seq.request_id, None) is not None:
            self._used_blocks -= seq.blocks
            seq.blocks = 0
            self._slots.release()

