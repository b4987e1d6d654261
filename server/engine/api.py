"""The one async engine interface that the gateway talks to.

Both backends implement `AsyncEngineClient`: the embedded engine (`server.engine.async_engine`)
and the vLLM backend (`server.vllm_plugin`). The gateway knows nothing else about them.

Counting (DESIGN.md section 4). Every draft position a step looks at is decided exactly once,
or left undecided after the block stops:

- `accepted`: draft tokens that ended in the output (tier A keeps, plus drafts the full model
  accepted); this is vLLM's `spec_decode_num_accepted_tokens`.
- `slim_regenerated`: tokens the slim verifier emitted (tier B, and the bonus token when the
  slim verifier was confident enough to supply it).
- `full_verified`: draft positions decided by the full model (tier C and the positions after it
  in the same block).
- tier decisions: `tier_accept` + `tier_slim` + `tier_full` = draft positions decided.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import AsyncIterator

from server.engine.config import SamplingParams, SpecParams


class EngineError(Exception):
    """Base of the errors the gateway maps to HTTP statuses."""


class EngineBusy(EngineError):
    """The waiting queue is full (HTTP 429 with Retry-After)."""

    def __init__(self, message: str = "the server is at capacity; retry later", retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineNotReady(EngineError):
    """Starting or draining (HTTP 503)."""


class RequestRejected(EngineError):
    """A request the engine cannot run as given (HTTP 400), e.g. longer than the context."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class SpecUsage:
    """Per-request speculation counts: `usage.via_sd` in HTTP responses."""

    draft_tokens: int = 0
    accepted: int = 0
    slim_regenerated: int = 0
    full_verified: int = 0
    slim_passes: int = 0
    full_passes: int = 0
    steps: int = 0
    lenient_accepted: int = 0  # accepted drafts the full model kept by full_accept_threshold, not its argmax

    def to_dict(self) -> dict[str, int]:
        # the fields in order; not `dataclasses.asdict`, which deep-copies each int (10 us against
        # 0.7 for a copy, and the engine copies a request's counts into every output it emits)
        return dict(vars(self))

    def add(self, other: "SpecUsage") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first
    rank: int | None = None  # the token's rank in its row (1: the most likely); prompt logprobs only


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    spec: SpecParams = field(default_factory=SpecParams)


@dataclass
class RequestOutput:
    """One delta of a request's output. Text and tokens are new since the previous delta;
    counts and `via_sd` are cumulative."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    via_sd: SpecUsage = field(default_factory=SpecUsage)
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    # with `SamplingParams.prompt_logprobs`, on the first delta only: one entry per prompt token,
    # None for the first (nothing before it predicts it)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class EngineStats:
    """A snapshot of the engine's gauges and cumulative counters, for `/metrics`."""

    requests_running: int = 0
    requests_waiting: int = 0
    kv_cache_usage: float = 0.0  # used blocks / usable blocks
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_drafts: int = 0  # steps of a sequence that verified at least one draft token
    draft_tokens: int = 0
    accepted_tokens: int = 0
    tier_accept: int = 0
    tier_slim: int = 0
    tier_full: int = 0
    slim_passes: int = 0  # per sequence
    full_passes: int = 0  # per sequence
    slim_regenerated: int = 0
    lenient_accepted: int = 0  # accepted draft tokens that were not the full model's argmax (full_accept_threshold)
    controller_slim_on: int = 0  # speculative steps that ran the slim tier
    controller_slim_off: int = 0  # speculative steps where the controller bypassed it
    preemptions: int = 0
    num_steps: int = 0
    prefix_cache_queries: int = 0  # tokens of admitted sequences looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found there


class AsyncEngineClient(abc.ABC):
    """What the gateway needs from an engine."""

    model_name: str
    max_model_len: int

    @property
    @abc.abstractmethod
    def tokenizer(self):
        """A `server.engine.tokenizer.Tokenizer` (encode, decode, apply_chat_template, eos ids)."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting requests (EngineNotReady), let in-flight ones finish for up to
        `grace_s`, abort the rest."""

    @abc.abstractmethod
    def is_ready(self) -> bool: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream deltas until one with `finished=True`. Raises EngineBusy, EngineNotReady or
        RequestRejected before the first delta. Closing the iterator aborts the request."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...


@dataclass
class CompletionResult:
    """A finished request, as `LLMEngine.generate` returns it (offline use: bench, generate)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    via_sd: SpecUsage
    logprobs: list[TokenLogprob] | None = None
    first_token_time: float | None = None  # seconds after the request was added
    finish_time: float | None = None
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None
