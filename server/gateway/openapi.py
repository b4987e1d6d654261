"""The gateway's OpenAPI document: request and response bodies of every route.

The routes read their JSON bodies themselves (to answer OpenAI-shaped 400s with codes such as
`invalid_json`), so FastAPI cannot infer the bodies; `install_openapi` adds them from the
pydantic models in `server.gateway.protocol`. The document is what schema-driven tests (and
clients' code generators) read through `app.openapi()`; the server does not serve it, since
`openapi_url` is off.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.gateway.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

_REF = "#/components/schemas/{model}"
# one event of a stream (what schema-driven tools check each parsed event against): `data` is a
# chunk's JSON text, or `[DONE]` last
_SSE_EVENT = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}},
    "required": ["data"],
}
_ERROR_STATUSES = {
    "400": "Invalid request (OpenAI error shape)",
    "401": "Missing or invalid API key",
    "404": "Unknown model or route",
    "413": "Request body too large",
    "429": "Waiting queue full; see Retry-After",
    "431": "Request headers too large",
    "500": "The request failed inside the engine",
    "503": "Starting or shutting down",
    "504": "The request timed out",
}


def _schema(model: type[BaseModel], components: dict[str, Any], mode: str) -> dict:
    """`model`'s JSON schema with its sub-models moved into `components`; returns a $ref."""
    schema = model.model_json_schema(ref_template=_REF, mode=mode)
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components.setdefault(model.__name__, schema)
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build_openapi(app: FastAPI) -> dict:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    error = _schema(ErrorResponse, components, "serialization")
    errors = {status: _json(error, text) for status, text in _ERROR_STATUSES.items()}
    paths = doc.setdefault("paths", {})
    bodies = {
        "/v1/completions": (CompletionRequest, CompletionResponse),
        "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse),
    }
    for path, (request_model, response_model) in bodies.items():
        op = paths[path]["post"]
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": _schema(request_model, components, "validation")}}}
        ok = _json(_schema(response_model, components, "serialization"), "The completion, or SSE frames when stream is true")
        ok["content"]["text/event-stream"] = {"schema": _SSE_EVENT}
        op["responses"] = {"200": ok, **errors}
    models = paths["/v1/models"]["get"]
    models["responses"] = {"200": _json(_schema(ModelList, components, "serialization"), "Served models"),
                           "401": errors["401"], "503": errors["503"]}
    paths["/v1/models/{model}"]["get"]["responses"] = {
        "200": _json(_schema(ModelCard, components, "serialization"), "The served model"),
        "401": errors["401"], "404": errors["404"], "503": errors["503"]}
    for path, (request_model, response_model) in {"/tokenize": (TokenizeRequest, TokenizeResponse),
                                                   "/detokenize": (DetokenizeRequest, DetokenizeResponse)}.items():
        op = paths[path]["post"]
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": _schema(request_model, components, "validation")}}}
        op["responses"] = {"200": _json(_schema(response_model, components, "serialization"), "vLLM's shape"),
                           **{k: errors[k] for k in ("400", "401", "404", "413", "431")}}
    version = {"type": "object", "properties": {"version": {"type": "string"}}, "required": ["version"]}
    paths["/version"]["get"]["responses"] = {"200": _json(version, "The server's version")}
    health = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}
    paths["/health"]["get"]["responses"] = {"200": _json(health, "Ready"), "503": _json(health, "Not ready")}
    paths["/metrics"]["get"]["responses"] = {
        "200": {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}},
        "401": errors["401"],
    }
    return doc


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
