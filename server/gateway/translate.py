"""API parameters -> engine parameters, once, at the edge.

`prepare_chat` and `prepare_completion` validate an OpenAI request, tokenize its prompt and return a
`PreparedRequest`: the prompt ids plus one validated `SamplingParams` per choice and one
`SpecParams`. Everything the engine cannot honour is rejected here as a 400 that says what to
change; nothing past this point looks at the HTTP body again.

Context length follows vLLM: `len(prompt) + max_tokens > max_model_len` is rejected with code
`context_length_exceeded`. When `max_tokens` is omitted, chat defaults to the remaining context
and completions to OpenAI's legacy 16 (cut to the remaining context).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

from server.engine.config import ConfigError, SamplingParams, SpecParams
from server.gateway.errors import APIError
from server.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LenientModel,
    TokenizeRequest,
    TokenizeResponse,
)
from server.gateway.structured import ToolMode, constraint, tool_constraint

log = logging.getLogger("via_sd.gateway")

MAX_N = 16
COMPLETION_DEFAULT_MAX_TOKENS = 16
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass(frozen=True)
class PreparedRequest:
    model: str
    # one per prompt: a completion may send a batch of them (choice p * n + i is prompt p's
    # choice i, as vLLM and OpenAI number them); chat has one
    prompts: tuple[tuple[int, ...], ...]
    sampling: tuple[SamplingParams, ...]  # one per choice of a prompt; len == n
    spec: SpecParams
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: off; k: the chosen token plus the top k
    continuous_usage: bool = False  # `usage` (so far) in every chunk, as vLLM's continuous_usage_stats
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:{id}" (vLLM's return_tokens_as_token_ids)
    # completions' `echo`: each choice starts with its prompt's text (and, with logprobs, the
    # prompt tokens' logprobs); `prompt_texts[p]` is that text
    echo: bool = False
    prompt_texts: tuple[str, ...] = ()
    # echo with max_tokens 0: the prompt alone (scored); the engine runs one token, not shown
    score_only: bool = False
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob and rank, with the top k
    # chat with a forcing tool_choice: the answer is returned as tool calls
    tool_mode: ToolMode | None = None


def log_unknown_fields(body: LenientModel, where: str = "") -> None:
    """Unknown fields are ignored, with their names (never their values) in the log."""
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        log.info("ignoring unknown request fields%s: %s", f" in {where}" if where else "", ", ".join(extra))


def _reject_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.n < 1 or req.n > MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {req.n}", param="n")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if req.stream and req.prompt_logprobs is not None:
        raise APIError(400, "prompt_logprobs are not available when stream is true (as in vLLM)",
                       param="prompt_logprobs")


def _check_context(
    prompt_len: int, max_tokens: int | None, max_model_len: int, prompt_param: str, max_param: str = "max_tokens"
) -> int:
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty; send at least one token", param=prompt_param)
    if prompt_len >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens, which leaves no room for a completion. Shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > 0 and prompt_len + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            f"completion). Reduce the prompt or max_tokens.",
            param=max_param,
            code="context_length_exceeded",
        )
    return max_model_len - prompt_len


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _spec(req: CompletionRequest | ChatCompletionRequest) -> SpecParams:
    if req.via_sd is None:
        return SpecParams()
    log_unknown_fields(req.via_sd, "via_sd")
    v = req.via_sd
    return SpecParams(
        mode=v.mode,
        accept_threshold=v.accept_threshold,
        escalate_threshold=v.escalate_threshold,
        num_draft_tokens=v.num_draft_tokens,
        full_accept_threshold=v.full_accept_threshold,
    )


def _logit_bias(req: CompletionRequest | ChatCompletionRequest) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}` as (id, bias) pairs; the range checks are SamplingParams'."""
    out = []
    for key, bias in (req.logit_bias or {}).items():
        try:
            out.append((int(key), float(bias)))
        except (TypeError, ValueError):
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
    return tuple(out)


def _sampling(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    max_tokens_param: str,
    logprobs: int | None,
    logprobs_param: str,
    structured=None,
) -> tuple[SamplingParams, ...]:
    top_k = req.top_k if req.top_k is not None else 0
    base = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=0 if top_k == -1 else top_k,  # -1 disables top-k, as in vLLM
        seed=req.seed,
        stop=_stop(req.stop),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        logit_bias=_logit_bias(req),
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
        min_p=float(req.min_p or 0.0),
        min_tokens=req.min_tokens,
        allowed_token_ids=None if req.allowed_token_ids is None else tuple(req.allowed_token_ids),
        bad_words=tuple(req.bad_words or ()),
        prompt_logprobs=req.prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        structured_outputs=structured,
    )
    if req.seed is not None and not (-(1 << 63) <= req.seed and req.seed + req.n - 1 < (1 << 63)):
        raise APIError(400, "seed must be a 64-bit signed integer", param="seed", code="invalid_value")
    try:
        base.validate()
    except ConfigError as e:
        param = {"max_tokens": max_tokens_param, "top_logprobs": logprobs_param}.get(e.param or "", e.param)
        if (param or "").startswith("structured_outputs") and req.structured_outputs is None:
            # the constraint came from response_format or from the tools
            rf = req.response_format
            param = "response_format" if rf is not None and rf.type != "text" else "tools"
        raise APIError(400, str(e), param=param, code=e.code) from None
    # n > 1: n engine requests; a given seed s gives choice i the seed s + i
    return tuple(
        replace(base, seed=None if req.seed is None else req.seed + i) for i in range(req.n)
    )


def _validated_spec(req) -> SpecParams:
    try:
        return _spec(req).validate()
    except ConfigError as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None


def _check_token_ids(ids: list[int], vocab_size: int | None, param: str) -> None:
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param=param)


MAX_PROMPTS = 64  # prompts in one completions request
MAX_CHOICES = 256  # prompts x n


def _prompt_list(prompt) -> list:
    """`prompt` as a list of prompts: a string, a list of token ids, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, (str, list)) for p in prompt):
        return list(prompt)
    if any(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, "prompt must be a string, a list of token ids, or a list of either; not a mix",
                       param="prompt")
    return [prompt]


def prepare_completion(req: CompletionRequest, tokenizer, max_model_len: int, model: str) -> PreparedRequest:
    log_unknown_fields(req)
    _reject_unsupported(req)
    if req.best_of not in (None, 1):
        raise APIError(400, "best_of is not supported by this server; use n instead", param="best_of")
    if req.suffix:
        raise APIError(400, "suffix is not supported by this server; omit it", param="suffix")
    prompts = _prompt_list(req.prompt)
    if len(prompts) > MAX_PROMPTS or len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"a request takes at most {MAX_PROMPTS} prompts and {MAX_CHOICES} choices in all "
                            f"(prompts x n); got {len(prompts)} prompts and n = {req.n}", param="prompt")
    if req.logprobs is not None and not (0 <= req.logprobs <= 20):
        raise APIError(400, f"logprobs must be in [0, 20], got {req.logprobs}", param="logprobs")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens must be a positive integer, got 0 (0 is allowed with echo: the prompt "
                            "alone, scored)", param="max_tokens")
    score_only = req.echo and req.max_tokens == 0

    ids_list, texts = [], []
    limit = None
    for j, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt.{j}"
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
            text = prompt
        else:
            ids = list(prompt)
            _check_token_ids(ids, getattr(tokenizer, "vocab_size", None), param)
            text = None
        kept = _truncated(ids, req.truncate_prompt_tokens, max_model_len)
        if text is None or len(kept) < len(ids):
            text = tokenizer.decode(kept, skip_special_tokens=False) if req.echo and kept else ""
        ids = kept
        remaining = _check_context(len(ids), 1 if score_only else req.max_tokens, max_model_len, param)
        limit = remaining if limit is None else min(limit, remaining)
        ids_list.append(tuple(ids))
        texts.append(text)
    if score_only:
        max_tokens = 1
    elif req.max_tokens is not None:
        max_tokens = req.max_tokens
    else:  # OpenAI's legacy 16, cut to the room the longest prompt leaves
        max_tokens = min(COMPLETION_DEFAULT_MAX_TOKENS, limit)
    sampling = _sampling(req, max_tokens, "max_tokens", req.logprobs, "logprobs", constraint(req))
    if req.echo and req.logprobs is not None:
        # the engine reads the prompt's logprobs once, with the larger top k of the two asks
        sampling = tuple(replace(sp, prompt_logprobs=max(req.logprobs, req.prompt_logprobs or 0)) for sp in sampling)
    return PreparedRequest(
        model=model,
        prompts=tuple(ids_list),
        sampling=sampling,
        spec=_validated_spec(req),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        continuous_usage=bool(req.stream_options and req.stream_options.include_usage
                              and req.stream_options.continuous_usage_stats),
        tokens_as_ids=req.return_tokens_as_token_ids,
        prompt_logprobs=req.prompt_logprobs,
        logprobs=req.logprobs,
        echo=req.echo,
        prompt_texts=tuple(texts) if req.echo else (),
        score_only=score_only,
    )


def _truncated(ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: the prompt's last `keep` tokens (-1: as many as the
    context holds)."""
    if keep is None:
        return ids
    if keep != -1 and not 1 <= keep <= max_model_len:
        raise APIError(400, f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}], got {keep}",
                       param="truncate_prompt_tokens")
    keep = max_model_len if keep == -1 else keep
    return ids[-keep:]


def render_chat(req: ChatCompletionRequest | TokenizeRequest, tokenizer, add_special_tokens: bool = False) -> list[int]:
    """The token ids of `req.messages` through the chat template, with vLLM's template options
    (`add_generation_prompt`, `continue_final_message`, `chat_template_kwargs`) and the tools."""
    messages = chat_messages(req)
    if req.continue_final_message:
        if req.add_generation_prompt:
            raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true; "
                                "set add_generation_prompt to false", param="continue_final_message")
        if messages[-1]["role"] != "assistant":
            raise APIError(400, "continue_final_message continues the last message, which must be the assistant's",
                           param="continue_final_message")
    kwargs = req.chat_template_kwargs or {}
    clash = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt", "continue_final_message", "tokenize"})
    if clash:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(clash)}; use the request's own fields",
                       param="chat_template_kwargs")
    tools = [t.model_dump(mode="json", exclude_none=True) for t in req.tools] if req.tools else None
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt, tools=tools,
                                             add_special_tokens=add_special_tokens,
                                             continue_final_message=req.continue_final_message,
                                             template_kwargs=kwargs or None)
    except Exception as e:  # a template that rejects the conversation (e.g. role order)
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None


def chat_messages(req: ChatCompletionRequest | TokenizeRequest) -> list[dict]:
    """OpenAI messages -> the `[{"role", "content"}]` list a chat template takes."""
    if not req.messages:
        raise APIError(400, "messages must contain at least one message", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        role = CHAT_ROLES.get(m.role)
        if role is None:
            raise APIError(
                400,
                f"messages[{i}].role {m.role!r} is not supported; use one of system, developer, user, assistant, tool",
                param=f"messages.{i}.role",
            )
        content = m.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            pieces = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"messages[{i}].content[{j}] has type {part.type!r}; only text parts are supported",
                        param=f"messages.{i}.content.{j}.type",
                    )
                pieces.append(part.text)
            text = "".join(pieces)
        msg = {"role": role, "content": text}
        if m.tool_calls and role == "assistant":
            calls = [{"id": c.id, "type": "function",
                      "function": {"name": c.function.name, "arguments": c.function.arguments}} for c in m.tool_calls]
            msg["tool_calls"] = calls
            if not text:  # for templates that show only content: the calls as the model wrote them
                msg["content"] = json.dumps([{"name": c["function"]["name"], "parameters": _arguments(c, i)}
                                             for c in calls], ensure_ascii=False)
        if m.tool_call_id is not None and role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _arguments(call: dict, i: int):
    try:
        return json.loads(call["function"]["arguments"])
    except ValueError:
        raise APIError(400, f"messages[{i}].tool_calls has arguments that are not JSON",
                       param=f"messages.{i}.tool_calls") from None


def prepare_chat(req: ChatCompletionRequest, tokenizer, max_model_len: int, model: str) -> PreparedRequest:
    log_unknown_fields(req)
    structured = constraint(req)
    tool_structured, tool_mode = tool_constraint(req)
    if tool_structured is not None:
        if structured is not None:
            raise APIError(400, "a forced tool call already constrains the output; drop response_format or "
                                "structured_outputs, or set tool_choice to \"none\"", param="tool_choice")
        structured = tool_structured
    _reject_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    ids = _truncated(render_chat(req, tokenizer), req.truncate_prompt_tokens, max_model_len)

    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    remaining = _check_context(len(ids), requested, max_model_len, "messages", max_param)
    max_tokens = requested if requested is not None else remaining
    return PreparedRequest(
        model=model,
        prompts=(tuple(ids),),
        sampling=_sampling(req, max_tokens, max_param, logprobs, "top_logprobs", structured),
        spec=_validated_spec(req),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        continuous_usage=bool(req.stream_options and req.stream_options.include_usage
                              and req.stream_options.continuous_usage_stats),
        tokens_as_ids=req.return_tokens_as_token_ids,
        prompt_logprobs=req.prompt_logprobs,
        logprobs=logprobs,
        tool_mode=tool_mode,
    )


def tokenize(req: TokenizeRequest, tokenizer, max_model_len: int) -> TokenizeResponse:
    """vLLM's /tokenize: the ids /v1/completions runs for `prompt`, or /v1/chat/completions for
    `messages` (the same chat template, tools and message checks)."""
    log_unknown_fields(req)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "send either prompt (a string) or messages", param="prompt")
    if req.prompt is not None:
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tokenizer.encode(req.prompt, add_special_tokens=add) if req.prompt else []
    else:
        ids = render_chat(req, tokenizer, add_special_tokens=bool(req.add_special_tokens))
    return TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids,
                            token_strs=tokenizer.token_strs(ids) if req.return_token_strs else None)


def detokenize(req: DetokenizeRequest, tokenizer) -> DetokenizeResponse:
    """vLLM's /detokenize: the text of `tokens`, special tokens included."""
    log_unknown_fields(req)
    _check_token_ids(req.tokens, tokenizer.vocab_size, "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(req.tokens, skip_special_tokens=False))
