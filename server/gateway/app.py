"""The OpenAI-compatible FastAPI app over one `AsyncEngineClient`.

Routes: POST /v1/completions, POST /v1/chat/completions (JSON or SSE), GET /v1/models and
/v1/models/{model}, GET /health (200 when the engine is ready, else 503), GET /metrics (Prometheus
text), and vLLM's POST /tokenize, POST /detokenize and GET /version.

At the edge, before any route runs (`EdgeMiddleware`): `Authorization: Bearer <key>` on every
route when an API key is set (compared in constant time; /health stays open, and /metrics too
with `metrics_public`, for a Prometheus that cannot send the key), 503 on /v1 while draining, the
header limit (431 when the request's headers together exceed `max_header_bytes`) and the body
limit (413 on a Content-Length over the limit, or on a body that grows past it while it streams
in). Prompt text and keys are never logged at the default level. No route reads or writes files
named by request input: `model` is matched against the served names only.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine.api import AsyncEngineClient
from server.gateway.errors import APIError, from_validation_error, install_error_handlers
from server.gateway.metrics import GatewayMetrics
from server.gateway.openapi import install_openapi
from server import __version__
from server.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from server.gateway.serving import Serving
from server.gateway.translate import detokenize, prepare_chat, prepare_completion, tokenize

log = logging.getLogger("via_sd.gateway")


class GatewayState:
    """Mutable serving state shared by the middleware and the routes."""

    def __init__(self) -> None:
        self.draining = False


class EdgeMiddleware:
    """Auth, draining and the body size limit, as plain ASGI so that no route ever sees an
    oversized or unauthenticated request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        state: GatewayState,
        metrics_public: bool = False,
        max_header_bytes: int = 16 << 10,
    ):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.max_header = max_header_bytes
        self.metrics_public = metrics_public
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope.get("path", "")
        raw_headers = scope.get("headers", [])
        if sum(len(k) + len(v) for k, v in raw_headers) > self.max_header:
            err = APIError(431, f"the request headers are larger than the limit of {self.max_header} bytes",
                           code="headers_too_large")
            return await err.response()(scope, receive, send)
        headers = {k.lower(): v for k, v in raw_headers}
        protected = (path.startswith("/v1") or path in ("/tokenize", "/detokenize", "/version")
                     or (path == "/metrics" and not self.metrics_public))
        if protected and self.api_key is not None and not self._authorized(headers.get(b"authorization", b"")):
            err = APIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
            err.headers["WWW-Authenticate"] = "Bearer"
            return await err.response()(scope, receive, send)
        if path.startswith("/v1"):
            if self.state.draining:
                return await APIError(503, "the server is shutting down", code="draining").response()(
                    scope, receive, send
                )
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)

        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await APIError(400, "invalid Content-Length header").response()(scope, receive, send)
            if declared > self.max_body:
                return await self._too_large(scope, receive, send)

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return await self._too_large(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break

        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, replay, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(token.strip(), self.api_key)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(413, f"the request body is larger than the limit of {self.max_body} bytes",
                       code="request_too_large")
        await err.response()(scope, receive, send)


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e.msg if hasattr(e, 'msg') else e}",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if b"\\u" in raw and _has_lone_surrogate(data):  # only escapes can carry one
        raise APIError(400, "the request body contains a lone UTF-16 surrogate escape (\\ud800-\\udfff) "
                       "that is not valid Unicode text; send valid UTF-8", code="invalid_json")
    return data


def _has_lone_surrogate(data) -> bool:
    """Whether any string in `data` holds an unpaired surrogate (json.loads joins valid pairs)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def create_app(
    engine: AsyncEngineClient,
    *,
    api_key: str | None,
    served_model_names: list[str],
    max_body_bytes: int = 1 << 20,
    max_header_bytes: int = 16 << 10,
    metrics_public: bool = False,
    request_timeout_s: float = 600,
    lifespan_start: bool = False,
    shutdown_grace_s: float = 30.0,
) -> FastAPI:
    """The gateway app over `engine`.

    With `lifespan_start`, the app's lifespan starts the engine (and shuts it down with
    `shutdown_grace_s`); otherwise the caller owns the engine's life. `app.state.gateway.draining`
    turns new /v1 requests and /health into 503s. With an `api_key`, /metrics needs it too
    unless `metrics_public`.
    """
    if not served_model_names:
        raise ValueError("served_model_names must name at least one model")
    state = GatewayState()
    metrics = GatewayMetrics(engine.stats)
    serving = Serving(engine, metrics, request_timeout_s)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if lifespan_start:
            await engine.start()
        try:
            yield
        finally:
            if lifespan_start:
                state.draining = True
                await engine.shutdown(shutdown_grace_s)

    app = FastAPI(title="via-sd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = state
    app.state.metrics = metrics
    app.state.engine = engine
    install_error_handlers(app)
    app.add_middleware(
        EdgeMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, state=state,
        metrics_public=metrics_public, max_header_bytes=max_header_bytes,
    )

    def resolve_model(name: str | None) -> str:
        if name is None:
            return served_model_names[0]
        if name not in served_model_names:
            raise APIError(
                404, f"the model {name!r} does not exist; this server serves {', '.join(served_model_names)}",
                param="model", code="model_not_found",
            )
        return name

    async def parsed(request: Request, model_cls):
        """The JSON body as `model_cls` and the served model it names (else a 400 or a 404)."""
        try:
            body = model_cls.model_validate(await _json_body(request))
        except ValidationError as e:
            raise from_validation_error(e) from None
        return body, resolve_model(body.model)

    async def run(
        request: Request,
        model_cls: type[CompletionRequest] | type[ChatCompletionRequest],
        prepare: Callable,
        kind: str,
    ):
        body, model = await parsed(request, model_cls)
        prep = prepare(body, engine.tokenizer, engine.max_model_len, model)
        result = await serving.handle(kind, prep, request.receive)
        if result is None:  # the client disconnected; its request was aborted
            return Response(status_code=499)
        if isinstance(result, Response):
            return result
        return JSONResponse(result.model_dump(mode="json"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, CompletionRequest, prepare_completion, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, ChatCompletionRequest, prepare_chat, "chat")

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=created, max_model_len=engine.max_model_len)

    @app.get("/v1/models")
    async def models():
        return JSONResponse(ModelList(data=[card(n) for n in served_model_names]).model_dump(mode="json"))

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str):  # OpenAI's "retrieve model"
        return JSONResponse(card(resolve_model(model)).model_dump(mode="json"))

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        body, _ = await parsed(request, TokenizeRequest)
        return JSONResponse(tokenize(body, engine.tokenizer, engine.max_model_len).model_dump(mode="json"))

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        body, _ = await parsed(request, DetokenizeRequest)
        return JSONResponse(detokenize(body, engine.tokenizer).model_dump(mode="json"))

    @app.get("/version")
    async def version():
        return JSONResponse({"version": __version__})

    @app.get("/health")
    async def health():
        if engine.is_ready() and not state.draining:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "draining" if state.draining else "starting"}, status_code=503)

    @app.get("/metrics")
    async def metrics_route():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    install_openapi(app)
    return app
