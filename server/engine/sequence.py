"""The state of one request inside the engine.

Positions and frontiers. `token_ids` holds every committed token (prompt then output). The last
committed token is normally not yet fed to the model: a step feeds it (plus any draft) and gets
the next token. Two frontiers say what the cache holds:

- `full_frontier`: positions [0, full_frontier) hold the K/V of *every* layer as the full model
  computes them (written by full passes). Everything after it is recomputed by the next full pass.
- `slim_frontier` >= full_frontier: positions [0, slim_frontier) hold K/V for the slim route's
  layers (written by a full pass, or by slim passes for tokens the full model has not seen yet).

`len(token_ids) - 1 - full_frontier` is the *slim backlog*: committed tokens the full model has
not seen, bounded by `max_slim_backlog`.

Prefix cache. `block_serials[i]` is the prefix-cache serial of the sequence's block i once that
block is full and below `full_frontier` (its K/V final, see `block_pool`); a sequence admitted
with a cached prefix starts with those blocks, its frontiers after them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from server.engine.api import GenerationRequest, SpecUsage, TokenLogprob
from server.engine.block_pool import BlockTable
from server.engine.config import ResolvedSpec
from server.engine.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    spec: ResolvedSpec
    table: BlockTable
    detok: IncrementalDetokenizer
    token_ids: list[int]
    num_prompt: int
    # the sampling seed (the request's, or drawn at random), None for greedy: the row that samples
    # token j draws its noise from a generator seeded by (seed, j) (`position_noise`)
    seed: int | None
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    full_frontier: int = 0
    slim_frontier: int = 0
    usage: SpecUsage = field(default_factory=SpecUsage)
    first_token_time: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    # output not yet handed out as a delta
    pending_ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    controller: object | None = None  # per-request slim-tier controller state
    drafter_state: object | None = None
    draft_accept: object | None = None  # draft_length.AcceptanceEstimate of its lookup drafts
    lookup_accept: object | None = None  # its own draft_length.LookupAcceptance (spec_step._fixed_path)
    lookup_index: object | None = None  # drafters.ngram.LookupIndex of its committed tokens
    block_serials: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    # SamplingParams.prompt_logprobs: entry i for prompt token i (None for the first), filled as
    # the full passes read the prompt; handed out once, with the first delta
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    # SamplingParams.structured_outputs: an llguidance matcher over the committed output
    matcher: object | None = None

    @property
    def reads_prompt_logprobs(self) -> bool:
        """Its next full pass must return logits at every prompt position it feeds."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt

    @property
    def adjusts_logits(self) -> bool:
        """Its next rows need `LLMEngine.adjusted_rows` (SamplingParams.adjusts_logits at its
        output length)."""
        return self.request.sampling.adjusts_logits(self.num_output)

    @property
    def argmax_only(self) -> bool:
        """Its next pass needs only each position's argmax (SamplingParams.argmax_only at its
        output length)."""
        return self.request.sampling.argmax_only(self.num_output)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def uncomputed(self) -> int:
        """Committed tokens whose K/V the full model has not written (the last one included)."""
        return len(self.token_ids) - self.full_frontier

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: the cache is dropped; committed tokens are kept and will be
        prefilled again."""
        self.full_frontier = 0
        self.slim_frontier = 0
        self.block_serials = []
        self.num_preemptions += 1
