"""Running engine requests for one API call: open, merge n choices, watch the client, abort.

A `ChoiceRun` wraps one engine request. `open_runs` starts the n requests of one call and pulls
each one's first delta, so that `EngineBusy`, `EngineNotReady` and `RequestRejected` surface
before any response header is sent. `merged` interleaves the choices' deltas with a deadline.

Every way out (finished, client gone, timeout, error) closes the engine iterators and calls
`engine.abort`, so no request is left holding KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncGenerator, AsyncIterator, Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.engine.api import AsyncEngineClient, GenerationRequest, RequestOutput
from server.gateway.errors import APIError, from_engine_error
from server.gateway.metrics import GatewayMetrics


class ChoiceRun:
    """One engine request (one choice): its iterator, first delta and timings."""

    def __init__(self, engine: AsyncEngineClient, metrics: GatewayMetrics | None, index: int, t0: float):
        self.engine = engine
        self.metrics = metrics
        self.index = index
        self.t0 = t0
        self.request_id = ""
        self.finished = False
        self._gen: AsyncIterator[RequestOutput] | None = None
        self._first: RequestOutput | None = None
        self._ttft: float | None = None

    async def open(self, request: GenerationRequest) -> None:
        self.request_id = request.request_id
        self._gen = self.engine.generate(request)  # may raise before the first delta
        try:
            self._first = await self._gen.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the engine ended the request without output", code="internal_error") from None
        self._note(self._first)

    def _note(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if self._ttft is None and out.token_ids:
            self._ttft = now - self.t0
        if out.finished:
            self.finished = True
            if self.metrics is not None and out.finish_reason in ("stop", "length"):
                self.metrics.observe_request(self._ttft, now - self.t0, out.completion_tokens)

    async def deltas(self) -> AsyncGenerator[RequestOutput, None]:
        assert self._gen is not None and self._first is not None
        try:
            yield self._first
            if self._first.finished:
                return
            async for out in self._gen:
                self._note(out)
                yield out
                if out.finished:
                    return
        finally:
            await self.close()

    async def close(self) -> None:
        """Idempotent: close the engine iterator and abort the request if it has not finished."""
        gen, self._gen = self._gen, None
        if gen is not None:
            with contextlib.suppress(Exception):
                await gen.aclose()  # type: ignore[attr-defined]
        if not self.finished and self.request_id:
            self.finished = True
            with contextlib.suppress(Exception):
                await self.engine.abort(self.request_id)


async def open_runs(
    engine: AsyncEngineClient, metrics: GatewayMetrics | None, requests: list[GenerationRequest]
) -> list[ChoiceRun]:
    """Start every choice at once; if one fails to start, abort the others and raise an
    `APIError`."""
    t0 = time.perf_counter()
    runs = [ChoiceRun(engine, metrics, i, t0) for i in range(len(requests))]
    try:
        results = await asyncio.gather(*(r.open(q) for r, q in zip(runs, requests)), return_exceptions=True)
    except BaseException:  # cancelled: the client left while waiting for the first tokens
        for run in runs:
            await run.close()
        raise
    failures = [e for e in results if isinstance(e, BaseException)]
    if failures:
        for run in runs:
            await run.close()
        e = failures[0]
        if isinstance(e, Exception):
            raise from_engine_error(e) from None
        raise e
    return runs


async def merged(runs: list[ChoiceRun], deadline: float) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Deltas of all choices as `(index, delta)`, in arrival order, until each has finished.
    Raises `APIError(504)` past `deadline` (a `time.monotonic()` value)."""
    if len(runs) == 1:  # the common case, without tasks
        run = runs[0]
        it = run.deltas()
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    # a timeout scope, not `wait_for`: no task per delta (Python 3.11's `wait_for` wraps
                    # every awaitable in a new task)
                    async with asyncio.timeout(max(remaining, 0.0)):
                        out = await it.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise APIError(504, "the request timed out", code="timeout") from None
                yield run.index, out
        finally:
            await it.aclose()
            await run.close()

    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(run: ChoiceRun) -> None:
        try:
            async for out in run.deltas():
                await queue.put((run.index, out))
        except Exception as e:  # surfaced to the consumer
            await queue.put((run.index, e))
        finally:
            await queue.put((run.index, done))

    tasks = [asyncio.create_task(pump(r)) for r in runs]
    try:
        live = len(runs)
        while live:
            remaining = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    index, item = await queue.get()
            except TimeoutError:
                raise APIError(504, "the request timed out", code="timeout") from None
            if item is done:
                live -= 1
            elif isinstance(item, Exception):
                raise from_engine_error(item)
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in runs:
            await r.close()


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(work: Awaitable, receive: Receive):
    """Run `work`; if the client disconnects first, cancel it (its cleanup aborts the engine
    requests) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return None
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


class SSEResponse(Response):
    """`text/event-stream` from an async generator of ready-made frames.

    Unlike a plain streaming response, it watches for the client's disconnect whatever the ASGI
    version, and always closes the generator, which is where the engine request is aborted."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncGenerator[bytes, None], on_close: Callable[[], Awaitable[None]] | None = None):
        self.frames = frames
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for frame in self.frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_disconnect(pump(), receive)
        except OSError:
            pass  # the client went away while we were sending
        finally:
            await self.frames.aclose()
            if self.on_close is not None:
                await self.on_close()
