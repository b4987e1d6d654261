"""The OpenAI-compatible HTTP gateway over one `AsyncEngineClient`.

`protocol` (pydantic request/response models), `translate` (API parameters -> engine parameters,
once), `serving` and `streaming` (responses, SSE, n choices, disconnect -> abort), `errors`
(OpenAI's error shape), `metrics` (Prometheus), `app` (`create_app`), `serve` (`via-sd serve`).
"""
