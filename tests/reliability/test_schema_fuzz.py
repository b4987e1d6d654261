"""A schema-driven fuzz of every operation of the server's own OpenAPI document (`app.openapi()`),
in-process over ASGI, against the gateway over the real embedded engine (tiny model): positive
and negative examples, bounded per operation; no 5xx, and every response matches the status
codes, content types and schemas the document declares."""

from __future__ import annotations

import pytest

from server.gateway.app import create_app
from tests.reliability.conftest import MODEL, wait_idle
from tests.reliability.test_bad_input import app, engine  # noqa: F401  (module fixtures)

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extras")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

_BOUND: list = []  # the app over the real engine, bound by the test (the schema is built at import)


async def _bound_app(scope, receive, send):
    await _BOUND[-1](scope, receive, send)


def _schema():
    from tests.gateway.fake_engine import FakeEngine

    # the document does not depend on the engine
    loaded = schemathesis.openapi.from_dict(
        create_app(FakeEngine(), api_key=None, served_model_names=[MODEL]).openapi()
    )
    loaded.app = _bound_app
    return loaded


schema = _schema()


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_openapi_fuzz_no_5xx_and_responses_match_schema(case, app, engine):
    _BOUND.append(app)
    # Not `negative_data_rejection`: like vLLM, the gateway validates in pydantic's lax mode, so
    # schema-violating values that coerce (false -> 0, "2" -> 2) are served on purpose.
    response = case.call_and_validate(checks=[
        not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
    ])
    assert response.status_code < 500, response.text
    if case.path in ("/v1/completions", "/v1/chat/completions"):
        wait_idle(engine, timeout_s=60)




@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}),
])
def test_streamed_responses_match_the_documents_event_schema(path, body):
    """The fuzzer reaches a streamed 200 only by chance: each SSE event, as schema tools parse it,
    must match the document's `text/event-stream` schema."""
    from tests.gateway.fake_engine import FakeEngine

    app = create_app(FakeEngine(), api_key=None, served_model_names=[MODEL])
    loaded = schemathesis.openapi.from_dict(app.openapi())
    loaded.app = app
    case = loaded[path]["POST"].Case(body={**body, "model": MODEL}, media_type="application/json")
    response = case.call_and_validate(checks=[
        not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
    ])
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
