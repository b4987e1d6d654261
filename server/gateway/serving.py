"""`/v1/completions` and `/v1/chat/completions`: from a `PreparedRequest` to a response.

Non-streamed calls collect every choice and answer one JSON body; streamed calls answer SSE
frames `data: {json}\\n\\n` and end with `data: [DONE]\\n\\n`. Chat streams start with one chunk
per choice carrying `delta.role`; with `stream_options.include_usage` one last chunk carries
`usage` and empty `choices` (with vLLM's `continuous_usage_stats` too, every chunk carries the
usage so far; otherwise no other chunk has a `usage` key).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncGenerator, Literal

from starlette.types import Receive

from server.engine.api import AsyncEngineClient, GenerationRequest, RequestOutput, SpecUsage, TokenLogprob
from server.gateway.errors import APIError, from_engine_error
from server.gateway.metrics import GatewayMetrics
from server.gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionResponse,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
    ViaSDUsage,
)
from server.gateway.streaming import SSEResponse, merged, open_runs, until_disconnect
from server.gateway.structured import StreamedToolCalls, calls_of
from server.gateway.translate import PreparedRequest

Kind = Literal["chat", "completion"]
DONE_FRAME = b"data: [DONE]\n\n"


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def frame(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    via_sd: SpecUsage = field(default_factory=SpecUsage)
    finish_reason: str | None = None
    text_offset: int = 0  # completions' logprobs.text_offset runs across chunks
    prompt_logprobs: list[TokenLogprob | None] | None = None
    echoed: bool = False  # a stream has sent its echo

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text.append(out.text)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        self.completion_tokens = out.completion_tokens or self.completion_tokens
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.cached_tokens = out.cached_tokens or self.cached_tokens
        self.via_sd = out.via_sd
        if out.finished:
            self.finish_reason = out.finish_reason


def check_failed(out: RequestOutput) -> None:
    if out.finished and out.finish_reason == "error":
        raise APIError(500, f"the request failed inside the engine: {out.error or 'unknown error'}", code="engine_error")


def usage_of(states: list[ChoiceState], prep: PreparedRequest) -> Usage:
    """A prompt counts once however many choices it has (OpenAI's rule); a batch of prompts
    counts each. Choices that only score their prompt (echo, max_tokens 0) complete nothing."""
    via = SpecUsage()
    for s in states:
        via.add(s.via_sd)
    n = len(prep.sampling)
    groups = [states[p * n:(p + 1) * n] for p in range(len(prep.prompts))]
    prompt = sum(max((s.prompt_tokens for s in g), default=0) or len(ids) for g, ids in zip(groups, prep.prompts))
    cached = sum(max((s.cached_tokens for s in g), default=0) for g in groups)
    completion = 0 if prep.score_only else sum(s.completion_tokens for s in states)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        via_sd=ViaSDUsage(**via.to_dict()),
    )


class LogprobFormatter:
    """Logprobs in OpenAI's shapes; a token is its text, or `token_id:{id}` with `as_ids` (vLLM's
    `return_tokens_as_token_ids`, for tokens whose text alone does not say which they are)."""

    def __init__(self, tokenizer, top_k: int, as_ids: bool = False):
        self.tok = tokenizer
        self.k = top_k
        self.as_ids = as_ids

    def _text(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.tok.token_text(token_id)

    def prompt_entry(self, token_id: int, logprob: float, rank: int | None) -> PromptLogprob:
        # vLLM floors the logprob at -9999 (JSON has no -inf)
        return PromptLogprob(logprob=max(logprob, -9999.0), rank=rank, decoded_token=self._text(token_id))

    def chat(self, items: list[TokenLogprob]) -> ChatChoiceLogprobs:
        content = []
        for lp in items:
            text = self._text(lp.token_id)
            top = [
                TopLogprob(token=(t := self._text(tid)), logprob=v, bytes=list(t.encode("utf-8")))
                for tid, v in lp.top[: self.k]
            ]
            content.append(
                ChatTokenLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode("utf-8")), top_logprobs=top)
            )
        return ChatChoiceLogprobs(content=content)

    def completion(self, items: list[TokenLogprob], state: ChoiceState,
                   out: CompletionLogprobs | None = None) -> CompletionLogprobs:
        out = out if out is not None else CompletionLogprobs()
        for lp in items:
            text = self._text(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self._text(tid): v for tid, v in lp.top[: self.k]})
            out.text_offset.append(state.text_offset)
            state.text_offset += len(text)
        return out

    def prompt(self, ids: tuple[int, ...], items: list[TokenLogprob | None] | None,
               state: ChoiceState) -> CompletionLogprobs:
        """An echoed prompt's tokens: the first has no logprob (null, as OpenAI and vLLM show it)."""
        out = CompletionLogprobs()
        if not ids:
            return out
        text = self._text(ids[0])
        out.tokens.append(text)
        out.token_logprobs.append(None)
        out.top_logprobs.append(None)
        out.text_offset.append(state.text_offset)
        state.text_offset += len(text)
        return self.completion([lp for lp in (items or [])[1:] if lp is not None], state, out)


class Serving:
    def __init__(self, engine: AsyncEngineClient, metrics: GatewayMetrics | None, request_timeout_s: float):
        self.engine = engine
        self.metrics = metrics
        self.timeout_s = request_timeout_s

    async def handle(self, kind: Kind, prep: PreparedRequest, receive: Receive):
        call_id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        created = now()
        n = len(prep.sampling)
        requests = [
            GenerationRequest(
                request_id=f"{call_id}-{p * n + i}",
                prompt_token_ids=ids,
                sampling=sp,
                spec=prep.spec,
            )
            for p, ids in enumerate(prep.prompts)
            for i, sp in enumerate(prep.sampling)
        ]
        deadline = time.monotonic() + self.timeout_s
        fmt = (LogprobFormatter(self.engine.tokenizer, prep.logprobs or 0, prep.tokens_as_ids)
               if prep.logprobs is not None else None)

        if prep.stream:
            runs = await until_disconnect(open_runs(self.engine, self.metrics, requests), receive)
            if runs is None:
                return None  # the client left before the first token; open_runs aborted it
            frames = self._stream(kind, prep, runs, deadline, call_id, created, fmt)

            async def close_all() -> None:  # also when the stream never got to start
                for run in runs:
                    await run.close()

            return SSEResponse(frames, on_close=close_all)

        async def collect():
            runs = await open_runs(self.engine, self.metrics, requests)
            states = [ChoiceState() for _ in runs]
            async for index, out in merged(runs, deadline):
                check_failed(out)
                states[index].add(out)
            return states

        states = await until_disconnect(collect(), receive)
        if states is None:
            return None
        usage = usage_of(states, prep)
        if kind == "chat":
            return ChatCompletionResponse(
                id=call_id,
                created=created,
                model=prep.model,
                choices=[
                    self._chat_choice(prep, i, s, fmt.chat(s.logprobs) if fmt else None)
                    for i, s in enumerate(states)
                ],
                usage=usage,
                prompt_logprobs=self._prompt_logprobs(prep, 0, states[0]),
            )
        choices = []
        for i, s in enumerate(states):
            text, logprobs = self._echo(prep, i // n, s, fmt)
            if not prep.score_only:
                text += "".join(s.text)
                if fmt:
                    logprobs = fmt.completion(s.logprobs, s, logprobs)
            choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs,
                                            finish_reason="length" if prep.score_only else s.finish_reason,
                                            prompt_logprobs=self._prompt_logprobs(prep, i // n, s)))
        return CompletionResponse(id=call_id, created=created, model=prep.model, choices=choices, usage=usage)

    @staticmethod
    def _chat_choice(prep: PreparedRequest, i: int, state: ChoiceState, logprobs) -> ChatChoice:
        text = "".join(state.text)
        calls = None
        if prep.tool_mode is not None and state.finish_reason == "stop":
            calls = calls_of(prep.tool_mode, text)
        if calls is None:
            return ChatChoice(index=i, message=AssistantMessage(content=text), logprobs=logprobs,
                              finish_reason=state.finish_reason)
        return ChatChoice(index=i, message=AssistantMessage(content=None, tool_calls=calls), logprobs=logprobs,
                          finish_reason="tool_calls")

    def _prompt_logprobs(self, prep: PreparedRequest, p: int, state: ChoiceState) -> PromptLogprobs | None:
        """vLLM's `prompt_logprobs` of prompt `p`: null for its first token, then per position the
        prompt token's logprob, rank and text, and the top k there (ranks 1..k)."""
        k = prep.prompt_logprobs
        if k is None or state.prompt_logprobs is None:
            return None
        fmt = LogprobFormatter(self.engine.tokenizer, k, prep.tokens_as_ids)
        out: PromptLogprobs = [None]
        for tid, lp in zip(prep.prompts[p][1:], state.prompt_logprobs[1:]):
            if lp is None:
                out.append(None)
                continue
            entry = {str(tid): fmt.prompt_entry(tid, lp.logprob, lp.rank)}
            for rank, (top_id, v) in enumerate(lp.top[:k], 1):
                entry.setdefault(str(top_id), fmt.prompt_entry(top_id, v, rank))
            out.append(entry)
        return out

    @staticmethod
    def _echo(prep: PreparedRequest, p: int, state: ChoiceState, fmt) -> tuple[str, CompletionLogprobs | None]:
        """What a completion choice starts with: with echo, its prompt's text and, with logprobs,
        its prompt tokens' logprobs; else nothing."""
        if not prep.echo:
            return "", (CompletionLogprobs() if fmt else None)
        return prep.prompt_texts[p], (fmt.prompt(prep.prompts[p], state.prompt_logprobs, state) if fmt else None)

    async def _stream(
        self, kind: Kind, prep: PreparedRequest, runs, deadline: float, call_id: str, created: int, fmt
    ) -> AsyncGenerator[bytes, None]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = {"id": call_id, "object": obj, "created": created, "model": prep.model}
        states = [ChoiceState() for _ in runs]
        tools = [StreamedToolCalls(prep.tool_mode) for _ in runs] if prep.tool_mode is not None else None

        def chunk(choices: list[dict]) -> bytes:
            body = {**head, "choices": choices}
            if prep.continuous_usage:
                body["usage"] = usage_of(states, prep).model_dump(mode="json")
            return frame(body)
        try:
            if kind == "chat":
                for i in range(len(runs)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
            n = len(prep.sampling)
            async for index, out in merged(runs, deadline):
                check_failed(out)
                state = states[index]
                state.add(out)
                if kind == "completion" and (prep.echo and not state.echoed or prep.score_only):
                    # the prompt goes first, in this choice's first frame (a scored prompt's only one)
                    text, lp = "", None
                    if not state.echoed:
                        text, lp = self._echo(prep, index // n, state, fmt)
                        state.echoed = True
                    if not prep.score_only:
                        text += out.text
                        if fmt is not None:
                            lp = fmt.completion(out.logprobs or [], state, lp)
                    if text or lp is not None and lp.tokens or out.finished:
                        finish = ("length" if prep.score_only else out.finish_reason) if out.finished else None
                        yield chunk([{"index": index, "text": text, "finish_reason": finish,
                                      "logprobs": lp.model_dump(mode="json") if lp else None}])
                    continue
                if not (out.text or out.logprobs or out.finished):
                    continue
                logprobs = None
                if fmt is not None and out.logprobs:
                    lp = fmt.chat(out.logprobs) if kind == "chat" else fmt.completion(out.logprobs, state)
                    logprobs = lp.model_dump(mode="json")
                elif fmt is not None and kind == "chat":
                    logprobs = {"content": []}
                finish = out.finish_reason if out.finished else None
                if kind == "chat":
                    delta = {"content": out.text} if out.text else {}
                    if tools is not None:
                        delta, finish = tools[index].delta(out.text, out.finished, finish)
                        if not delta and finish is None and logprobs is None:
                            continue
                    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                else:
                    choice = {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": finish}
                yield chunk([choice])
            if prep.include_usage:
                usage = usage_of(states, prep)
                yield frame({**head, "choices": [], "usage": usage.model_dump(mode="json")})
        except APIError as e:
            yield e.sse_bytes()
        except Exception as e:  # an engine failure after the stream started
            yield from_engine_error(e).sse_bytes()
        yield DONE_FRAME
