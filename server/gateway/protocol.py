"""OpenAI protocol models (pydantic) for `/v1/completions` and `/v1/chat/completions`.

These mirror OpenAI's request and response bodies. Requests accept and ignore unknown fields (the
gateway logs their names); fields that OpenAI defines but via-sd cannot honour are rejected by
`server.gateway.translate`, which turns a request into engine parameters once, at the edge.

Extensions: the request field `via_sd` (`ViaSDOptions`) and the response field `usage.via_sd`
(the per-request `SpecUsage` counts).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LenientModel(BaseModel):
    """A request body: unknown fields are kept in `model_extra` (and logged), not rejected."""

    model_config = ConfigDict(extra="allow")


# ----------------------------------------------------------------------------- errors


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ----------------------------------------------------------------------------- requests


class ViaSDOptions(LenientModel):
    mode: Literal["off", "binary", "three_tier"] | None = None
    accept_threshold: float | None = None
    escalate_threshold: float | None = None
    num_draft_tokens: int | None = None
    full_accept_threshold: float | None = None


class StreamOptions(LenientModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extension: with include_usage, `usage` in every chunk too


class TextPart(LenientModel):
    type: str
    text: str | None = None


class FunctionCall(LenientModel):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(LenientModel):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(LenientModel):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's answer


class FunctionDefinition(LenientModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(LenientModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(LenientModel):
    name: str


class NamedToolChoice(LenientModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaFormat(LenientModel):
    name: str | None = None
    description: str | None = None
    # `schema` would shadow a pydantic method
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(LenientModel):
    type: str = "text"
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsField(LenientModel):
    """vLLM's `structured_outputs` request field: exactly one constraint."""

    json_: Union[dict[str, Any], str, None] = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class _SamplingFields(LenientModel):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = None  # vLLM extension
    min_p: float | None = None  # vLLM extension
    min_tokens: int = 0  # vLLM extension
    allowed_token_ids: list[int] | None = None  # vLLM extension
    bad_words: list[str] | None = None  # vLLM extension
    skip_special_tokens: bool = True  # vLLM extension
    include_stop_str_in_output: bool = False  # vLLM extension
    truncate_prompt_tokens: int | None = None  # vLLM extension: keep the prompt's last k tokens (-1: the context)
    return_tokens_as_token_ids: bool = False  # vLLM extension: logprobs name tokens "token_id:{id}"
    prompt_logprobs: int | None = None  # vLLM extension: each prompt token's logprob and rank, with the top k
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None  # vLLM extension
    via_sd: ViaSDOptions | None = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    # vLLM's chat extensions: how the chat template renders the messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message is continued, not closed
    chat_template_kwargs: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call
    functions: list[Any] | None = None
    function_call: Any = None


# ----------------------------------------------------------------------------- usage


class ViaSDUsage(OpenAIModel):
    draft_tokens: int = 0
    accepted: int = 0
    slim_regenerated: int = 0
    full_verified: int = 0
    slim_passes: int = 0
    full_passes: int = 0
    steps: int = 0
    lenient_accepted: int = 0


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


class Usage(OpenAIModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    via_sd: ViaSDUsage = Field(default_factory=ViaSDUsage)


# ----------------------------------------------------------------------------- logprobs


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(OpenAIModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


# ----------------------------------------------------------------------------- responses

FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class PromptLogprob(OpenAIModel):
    """vLLM's entry of `prompt_logprobs`: one token at one prompt position."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's `prompt_logprobs`: null for the first prompt token, then per position {token id: entry}
# for the prompt's token and the top k there
PromptLogprobs = list[Union[dict[str, PromptLogprob], None]]


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extension


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionStreamResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ResponseFunctionCall(OpenAIModel):
    name: str
    arguments: str


class ResponseToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] = Field(default_factory=list)


class ChatChoice(OpenAIModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extension


class DeltaMessage(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


# ----------------------------------------------------------------------------- models


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "via-sd"
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- vLLM's tokenizer routes


class TokenizeRequest(LenientModel):
    """vLLM's `POST /tokenize`: a completion `prompt`, or chat `messages` through the chat template,
    to the ids the matching /v1 route would run."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None
    add_generation_prompt: bool = True  # messages only
    continue_final_message: bool = False  # messages only
    chat_template_kwargs: dict[str, Any] | None = None  # messages only
    add_special_tokens: bool | None = None  # default: true for a prompt (as /v1/completions), false for messages
    return_token_strs: bool = False


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(LenientModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIModel):
    prompt: str
