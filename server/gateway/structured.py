"""Structured outputs at the edge: `response_format`, vLLM's `structured_outputs`, and tool calls.

Request side: `constraint` turns `response_format` (`json_object`, `json_schema`) or vLLM's
`structured_outputs` into one engine `StructuredOutputs`; `tool_constraint` turns chat `tools`
with a forcing `tool_choice` into one too, vLLM's way: a named function constrains the output to
its `parameters` schema (the text is the call's arguments); `"required"` constrains it to a
non-empty JSON array (of one, with `parallel_tool_calls: false`) of `{"name": ..., "parameters": ...}`, one function's name and parameters
each. `tool_choice: "auto"` needs a parser of the model's own tool-call format, which this server
does not have (vLLM refuses it too unless started with one), so it is a 400.

Response side: `ToolCalls` turns the constrained text into OpenAI's `tool_calls`, whole or as
stream deltas.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from server.engine.config import StructuredOutputs
from server.gateway.errors import APIError
from server.gateway.protocol import ChatCompletionRequest, CompletionRequest, NamedToolChoice


def _json_text(schema, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise APIError(400, f"{param} is not valid JSON: {e}", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise APIError(400, f"{param} must be a JSON schema object", param=param)
    return json.dumps(schema, separators=(",", ":"))


def constraint(req: CompletionRequest | ChatCompletionRequest) -> StructuredOutputs | None:
    """The output constraint that `response_format` or `structured_outputs` asks for, if any."""
    rf, so = req.response_format, req.structured_outputs
    from_rf = None
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            from_rf = StructuredOutputs(json_object=True)
        elif rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                               param="response_format.json_schema")
            from_rf = StructuredOutputs(json=_json_text(rf.json_schema.json_schema, "response_format.json_schema.schema"))
        else:
            raise APIError(400, f"response_format type {rf.type!r} is not supported; use text, json_object or "
                                "json_schema", param="response_format.type")
    if so is None:
        return from_rf
    if from_rf is not None:
        raise APIError(400, "response_format and structured_outputs both constrain the output; send one",
                       param="structured_outputs")
    return StructuredOutputs(
        json=None if so.json_ is None else _json_text(so.json_, "structured_outputs.json"),
        json_object=bool(so.json_object),
        regex=so.regex,
        choice=None if so.choice is None else tuple(so.choice),
        grammar=so.grammar,
        disable_any_whitespace=so.disable_any_whitespace,
    )


@dataclass(frozen=True)
class ToolMode:
    """How a chat answer becomes tool calls: one named function's arguments, or an array of calls."""

    name: str | None  # the named function; None: "required" (an array of {name, parameters})


def tool_constraint(req: ChatCompletionRequest) -> tuple[StructuredOutputs | None, ToolMode | None]:
    tools, choice = req.tools or [], req.tool_choice
    if req.functions or req.function_call not in (None, "none"):
        raise APIError(400, "functions and function_call are deprecated and not supported; use tools and "
                            "tool_choice", param="functions" if req.functions else "function_call")
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None, None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools must have different function names", param="tools")
    if choice is None or choice == "auto":
        raise APIError(400, 'tool_choice "auto" (the default when tools are given) needs a parser of the model\'s '
                            'own tool-call format, which this server does not have; send tool_choice "required" '
                            'or {"type": "function", "function": {"name": ...}} to get a call, or "none"',
                       param="tool_choice")
    if choice == "none":
        return None, None

    def params(t) -> dict:
        p = t.function.parameters
        return p if p is not None else {"type": "object", "properties": {}}

    if isinstance(choice, NamedToolChoice):
        match = [t for t in tools if t.function.name == choice.function.name]
        if not match:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among tools",
                           param="tool_choice")
        return StructuredOutputs(json=_json_text(params(match[0]), "tools.function.parameters")), ToolMode(
            match[0].function.name)
    # "required": an array of one or more calls, each one tool's name and parameters
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": params(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return StructuredOutputs(json=json.dumps(schema, separators=(",", ":"))), ToolMode(None)


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def calls_of(mode: ToolMode, text: str) -> list[dict] | None:
    """The tool calls in a finished, constrained answer (OpenAI's shape), or None if the text is
    not a whole call (cut by max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if mode.name is not None:
        pairs = [(mode.name, text.strip())]
    else:
        if not isinstance(value, list):
            return None
        pairs = [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]
    return [{"id": tool_call_id(), "type": "function", "function": {"name": n, "arguments": a}} for n, a in pairs]


class StreamedToolCalls:
    """Stream deltas of one choice's tool calls: a named function's arguments as they come (the
    first delta carries the call's id and name); an array of calls when it is complete."""

    def __init__(self, mode: ToolMode):
        self.mode = mode
        self.text: list[str] = []
        self.opened = False

    def delta(self, text: str, finished: bool, finish_reason: str | None) -> tuple[dict, str | None]:
        """The `delta` for new text, and the finish reason to send with it."""
        self.text.append(text)
        if self.mode.name is not None:
            calls = []
            if text or (finished and not self.opened):
                call = {"index": 0, "function": {"arguments": text}}
                if not self.opened:
                    call = {"index": 0, "id": tool_call_id(), "type": "function",
                            "function": {"name": self.mode.name, "arguments": text}}
                    self.opened = True
                calls.append(call)
            reason = "tool_calls" if finished and finish_reason == "stop" else finish_reason
            return ({"tool_calls": calls} if calls else {}), reason
        if not finished:
            return {}, None
        full = "".join(self.text)
        calls = calls_of(self.mode, full) if finish_reason == "stop" else None
        if calls is None:  # not a whole array: the text as it is
            return ({"content": full} if full else {}), finish_reason
        return {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}, "tool_calls"
