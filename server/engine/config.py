"""Configuration of the engine and of one request, as frozen dataclasses.

Everything here is validated once where it enters (CLI, HTTP) with `validate()`, which raises
`ValueError` naming the field to change; inner code only reads the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

SpecMode = Literal["off", "binary", "three_tier"]
SPEC_MODES: tuple[str, ...] = ("off", "binary", "three_tier")
DrafterName = Literal["ngram", "self", "head", "hybrid", "model"]
DRAFTERS: tuple[str, ...] = ("ngram", "self", "head", "hybrid", "model")
KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "fp16")  # EngineConfig.kv_cache_dtype
PREFILL_DTYPES: tuple[str, ...] = ("auto", "bfloat16")  # EngineConfig.prefill_dtype


class ConfigError(ValueError):
    """A bad parameter. `param` names the field, as OpenAI's error shape wants it."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the output's text (vLLM's `StructuredOutputsParams`), exactly one of: a JSON
    schema (its JSON text), any JSON object, a regular expression, one of a list of strings, or a
    grammar in Lark syntax. `server.engine.structured` turns it into a mask on the logits."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    # JSON without whitespace between tokens (vLLM's option): a small model cannot loop on spaces
    disable_any_whitespace: bool = False

    def _given(self) -> list[str]:
        """The constraint fields that are set, in the order `kind` prefers them."""
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        return given + (["json_object"] if self.json_object else [])

    @property
    def kind(self) -> str:
        """The field that is set (the first one, before `validate`)."""
        return next(iter(self._given()), "json_object")

    def validate(self) -> "StructuredOutputs":
        given = self._given()
        if len(given) != 1:
            raise ConfigError("structured_outputs takes exactly one of json, json_object, regex, choice, grammar; "
                              f"got {', '.join(given) or 'none'}", "structured_outputs")
        if self.choice is not None and (not self.choice or any(not isinstance(c, str) or not c for c in self.choice)):
            raise ConfigError("structured_outputs.choice must be a non-empty list of non-empty strings",
                              "structured_outputs.choice")
        from server.engine.structured import check

        check(self)
        return self


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. `temperature == 0` means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus top k
    # None: off; k >= 0: each prompt token's logprob given the ones before it, plus the top k
    # there (vLLM's `prompt_logprobs`; the first prompt token has none). Such a request skips the
    # prefix cache and verifies no draft until its prompt is read.
    prompt_logprobs: int | None = None
    # OpenAI's penalties and logit_bias ((token id, bias) pairs), applied to the logits a token is
    # sampled from (logprobs stay the model's, as vLLM reports them by default). Verification
    # applies them to each draft position with the counts the drafts before it make.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's extensions, with its meaning: `repetition_penalty` divides the positive logits and
    # multiplies the negative ones of every token in the prompt or the output (1: off);
    # `min_tokens` keeps EOS and `stop_token_ids` out, and stop strings unmatched, until the output
    # has that many tokens; `min_p` drops, after the temperature, the tokens whose probability is
    # under min_p x the top token's (0: off).
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    min_p: float = 0.0
    # vLLM's too: only these tokens may be sampled (None: all); `bad_words` may not be written (a
    # word's last token is masked where the output ends with the tokens before it); the engine
    # fills `bad_words_token_ids` from them with its tokenizer, as vLLM does
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # the text: special tokens left out (True) or shown; the stop string, or the text of the EOS or
    # stop token id that ended the output, kept at its end (False: left out, as OpenAI does)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # the output must follow this grammar (masked logits; logprobs stay the model's); drafts are
    # cut to what the grammar allows and verified against masked rows (server/engine/structured.py).
    # A request with any of these verifies against the full model's rows only (no slim tier).
    structured_outputs: StructuredOutputs | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def argmax_only(self, num_output: int = 0) -> bool:
        """Only the argmax of each position's logits is read, once the output has `num_output`
        tokens: greedy, without logprobs, nothing adjusting the logits (a pass of such requests
        may read the LM head in fp16, model.GreedyHead)."""
        return self.greedy and self.logprobs is None and not self.adjusts_logits(num_output)

    def adjusts_logits(self, num_output: int = 0) -> bool:
        """Penalties, a logit bias, a structured-output constraint, or `min_tokens` not yet reached
        by an output of `num_output` tokens, move the logits this request samples from
        (`LLMEngine.adjusted_rows`)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0 or self.min_tokens > num_output
                    or self.allowed_token_ids is not None or self.bad_words or self.structured_outputs is not None)

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not (0.0 <= self.temperature <= 100.0):
            raise ConfigError(f"temperature must be in [0, 100], got {self.temperature}", "temperature")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}", "top_k")
        if len(self.stop) > 4:
            raise ConfigError("at most 4 stop sequences are allowed", "stop")
        if any(not s for s in self.stop):
            raise ConfigError("stop sequences must be non-empty strings", "stop")
        if self.seed is not None and not (-(2**63) <= self.seed < 2**63):
            raise ConfigError(f"seed must be a 64-bit signed integer, got {self.seed}", "seed")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise ConfigError(f"top_logprobs must be in [0, 20], got {self.logprobs}", "top_logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not (isinstance(self.repetition_penalty, (int, float)) and 0.0 < self.repetition_penalty <= 100.0):
            raise ConfigError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}", "repetition_penalty")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}",
                              "min_tokens")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ConfigError("allowed_token_ids must name at least one token", "allowed_token_ids")
        if len(self.bad_words) > 100 or any(not w.strip() for w in self.bad_words):
            raise ConfigError("bad_words takes at most 100 words, none of them empty", "bad_words")
        if len(self.logit_bias) > 300:
            raise ConfigError(f"logit_bias takes at most 300 tokens, got {len(self.logit_bias)}", "logit_bias")
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise ConfigError("logit_bias values must be in [-100, 100]", "logit_bias")
        if self.prompt_logprobs is not None and not (0 <= self.prompt_logprobs <= 20):
            raise ConfigError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}", "prompt_logprobs")
        if self.structured_outputs is not None:
            self.structured_outputs.validate()
        return self


@dataclass(frozen=True)
class SpecParams:
    """Per-request speculation settings. `None` fields take the engine's defaults."""

    mode: SpecMode | None = None
    accept_threshold: float | None = None
    escalate_threshold: float | None = None
    num_draft_tokens: int | None = None
    full_accept_threshold: float | None = None

    def validate(self) -> "SpecParams":
        if self.mode is not None and self.mode not in SPEC_MODES:
            raise ConfigError(f"via_sd.mode must be one of {', '.join(SPEC_MODES)}, got {self.mode!r}", "via_sd.mode")
        for name in ("accept_threshold", "escalate_threshold", "full_accept_threshold"):
            v = getattr(self, name)
            if v is not None and not (0.0 <= v <= 1.0):
                raise ConfigError(f"via_sd.{name} must be in [0, 1], got {v}", f"via_sd.{name}")
        if (
            self.accept_threshold is not None
            and self.escalate_threshold is not None
            and self.escalate_threshold > self.accept_threshold
        ):
            raise ConfigError("via_sd.escalate_threshold must not exceed via_sd.accept_threshold", "via_sd.escalate_threshold")
        if self.num_draft_tokens is not None and not (0 <= self.num_draft_tokens <= 16):
            raise ConfigError(f"via_sd.num_draft_tokens must be in [0, 16], got {self.num_draft_tokens}", "via_sd.num_draft_tokens")
        return self


@dataclass(frozen=True)
class SpecConfig:
    """Engine-wide speculation defaults (DESIGN.md section 2)."""

    mode: SpecMode = "three_tier"
    # n-gram lookup where the context repeats, the trained head elsewhere (lookup alone for a
    # model without a head): 1.98 tokens per step on Spec-Bench against 1.62 for `ngram` (README)
    drafter: DrafterName = "hybrid"
    num_draft_tokens: int = 5
    accept_threshold: float = 0.7
    escalate_threshold: float = 0.5
    bonus_confidence: float = 0.9
    # where the full model decides a draft token of a `three_tier` request, it keeps d when
    # q(d) >= full_accept_threshold * max q (temperature 1): 1 keeps only its own choice (exact, as
    # `binary`), lower values keep near-ties too. Lossy; `binary` requests never use it.
    full_accept_threshold: float = 1.0
    # ...except where a draft token that is not the full model's choice would complete an n-gram
    # the output already holds (n = lenient_no_repeat; 0 turns the guard off): measured, the rule
    # alone nearly doubles the repeated 4-grams of the output at θ = 0.1
    lenient_no_repeat: int = 4
    # the slim verifier decides a position (tier A or B) only where it is itself confident:
    # max q' >= slim_confidence, else the position escalates (tier C). Measured on the bundled
    # model: the ratio rule alone accepts the slim argmax even where q' is flat, which is where
    # slim and full disagree most.
    slim_confidence: float = 0.7
    # every draft in tier A but the slim verifier unsure at the bonus position: DESIGN.md runs the
    # full model for that one token (True); the default ends the block without a bonus instead,
    # since a full pass for one token costs more than it buys (measured, see the README)
    escalate_bonus: bool = False
    max_slim_backlog: int = 32
    ngram_min: int = 1
    ngram_max: int = 4
    slim_route: str | None = None  # path to a route JSON; None = the one shipped for the model
    draft_route: str | None = None  # route of the `self` drafter
    draft_model: str | None = None  # folder of the `model` drafter
    head_path: str | None = None  # weights of the `head` drafter
    # the head sits a sequence out while fewer drafts than this are kept per drafted step (0: never)
    head_min_gain: float = 0.3
    controller: bool = True  # bypass the slim tier when it does not pay
    # verify only the drafts that pay for their place in the pass (server/engine/draft_length.py)
    adaptive_draft: bool = True
    # draft tokens verified per step across the batch: speculation is nearly free while a forward
    # is memory-bound (small batches) and costs compute once it is not, so drafts shrink as the
    # batch grows (γ_i = min(γ, budget // sequences), 0 = plain decoding)
    draft_token_budget: int = 32
    # speculate only while at most this many sequences decode in a step; above it the step is plain
    # decoding. Measured with `via-sd bench --load` (README, Throughput under load): at 2 concurrent
    # requests `three_tier` was 0.83x `off` when both sequences speculated, and from 4 on every
    # speculative mode was slower than `off` on the bundled model.
    spec_max_batch: int = 1

    def resolve(self, req: SpecParams) -> "ResolvedSpec":
        return ResolvedSpec(
            mode=req.mode or self.mode,
            accept_threshold=self.accept_threshold if req.accept_threshold is None else req.accept_threshold,
            escalate_threshold=self.escalate_threshold if req.escalate_threshold is None else req.escalate_threshold,
            num_draft_tokens=self.num_draft_tokens if req.num_draft_tokens is None else req.num_draft_tokens,
            bonus_confidence=self.bonus_confidence,
            full_accept_threshold=(self.full_accept_threshold if req.full_accept_threshold is None
                                   else req.full_accept_threshold),
        )


@dataclass(frozen=True)
class ResolvedSpec:
    mode: SpecMode
    accept_threshold: float
    escalate_threshold: float
    num_draft_tokens: int
    bonus_confidence: float
    full_accept_threshold: float = 1.0

    @property
    def lenient(self) -> bool:
        """The full model keeps near-ties of this request's drafts (three_tier, θ < 1)."""
        return self.mode == "three_tier" and self.full_accept_threshold < 1


@dataclass(frozen=True)
class EngineConfig:
    """The embedded engine: model, memory and batching limits."""

    model: str = "SmolLM2-135M-Instruct"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # where the weights and the KV cache live: "cpu" (the CPU decode kernels), or "cuda" /
    # "cuda:N" (torch's kernels and the Triton verification kernels); scheduling stays on the host
    device: str = "cpu"
    # on CUDA, replay decode-sized forwards from CUDA graphs (server/engine/cuda_graphs.py)
    cuda_graphs: bool = True
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    # the K/V cache's element type, as vLLM's --kv-cache-dtype: "auto" = the model's dtype
    # (lossless), "fp16" = half the bytes per token (twice the blocks in the same memory, half the
    # bytes attention reads; each key and value rounded once to fp16: lossy, measured in the README)
    kv_cache_dtype: Literal["auto", "fp16"] = "auto"
    # the matrix products of wide passes, those the decode kernels do not take (prompts, and steps
    # of more than 16 tokens): "auto" = the model's dtype (lossless; fp32 on oneDNN's GEMM),
    # "bfloat16" = inputs and weights rounded to bf16, fp32 sums (oneDNN's bf16 GEMM: ~1.6x its
    # fp32 rate at 512 tokens on an AVX512-BF16 CPU, 1.06x `off` on Spec-Bench; the prompt's K/V
    # then differ by about bf16's rounding: lossy, measured in the README). Decode-sized passes,
    # the LM head, attention and norms stay in the model's dtype.
    prefill_dtype: Literal["auto", "bfloat16"] = "auto"
    max_model_len: int | None = None  # None: the model's own
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 256  # queue bound; the gateway answers 429 beyond it
    prefill_chunk: int = 512
    # reuse the K/V of full blocks of earlier requests' tokens (a shared system prompt, the turns
    # before in a chat); vLLM's automatic prefix caching, on by default there too
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    tensor_parallel_size: int = 1  # vLLM backend only
    pipeline_parallel_size: int = 1  # vLLM backend only
    spec: SpecConfig = field(default_factory=SpecConfig)

    def with_spec(self, **kw) -> "EngineConfig":
        return replace(self, spec=replace(self.spec, **kw))
