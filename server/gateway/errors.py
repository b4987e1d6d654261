"""Errors as data: every failure leaves the gateway in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

`APIError` is raised anywhere in request handling; `install_error_handlers` maps it, FastAPI's
validation errors (400, not 422) and engine errors (`EngineBusy` 429 + Retry-After,
`EngineNotReady` 503, `RequestRejected` 400) to responses.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.api import EngineBusy, EngineNotReady, RequestRejected
from server.engine.config import ConfigError

log = logging.getLogger("via_sd.gateway")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_bytes(self) -> bytes:
        """The error as one SSE event, for failures after a stream has started."""
        return b"data: " + json.dumps(self.body(), separators=(",", ":")).encode() + b"\n\n"


def from_engine_error(exc: Exception) -> APIError:
    """Map the engine's exceptions (and config validation) to API errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineBusy):
        retry = max(1, int(getattr(exc, "retry_after_s", 1)))
        return APIError(429, str(exc), code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
    if isinstance(exc, EngineNotReady):
        return APIError(503, str(exc) or "the engine is not ready", code="engine_not_ready")
    if isinstance(exc, (RequestRejected, ConfigError)):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    log.exception("request failed inside the engine", exc_info=exc)
    return APIError(500, "the request failed inside the engine", code="internal_error")


def param_of(loc: tuple) -> str | None:
    """`("body", "messages", 0, "role")` -> `"messages.0.role"`."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # drop pydantic's union branch labels such as "str" or "list[int]"
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    return ".".join(parts) or None


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    param = param_of(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    where = f"'{param}': " if param else ""
    return APIError(400, f"{where}{msg}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        # keep the exception's headers: a 405 must say which methods are allowed (`Allow`)
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        return from_engine_error(exc).response()
