"""`EmbeddedAsyncEngine`: the embedded engine behind the async interface the gateway uses.

The engine runs its step loop in one background thread (torch releases the GIL inside kernels,
so the event loop stays responsive). Requests and aborts reach it through a command queue;
deltas come back to each request's asyncio queue with `call_soon_threadsafe`. A step that raises
fails the requests it was running (each gets `finish_reason="error"`), returns their blocks, and
the engine goes on with the others.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator

from server.engine.api import (
    AsyncEngineClient,
    EngineBusy,
    EngineNotReady,
    EngineStats,
    GenerationRequest,
    RequestOutput,
)
from server.engine.config import EngineConfig

log = logging.getLogger("via_sd.engine")


class EmbeddedAsyncEngine(AsyncEngineClient):
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_name = Path(config.model).name
        self.engine = None
        self._ready = False
        self._draining = False
        self._cmds: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._num_waiting_cmds = 0
        self._lock = threading.Lock()
        from server.engine.tokenizer import Tokenizer
        from server.engine.model import ModelConfig

        mcfg = ModelConfig.from_folder(Path(config.model))
        self._tokenizer = Tokenizer.from_folder(config.model, extra_eos=mcfg.eos_token_ids)
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        self.fault_hook = None  # tests: callable(engine) run before each step

    @property
    def tokenizer(self):
        return self._tokenizer

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._ready:
            return
        from server.engine.engine import LLMEngine

        self.engine = await asyncio.to_thread(LLMEngine, self.config, tokenizer=self._tokenizer)
        self._thread = threading.Thread(target=self._loop, name="via-sd-engine", daemon=True)
        self._thread.start()
        self._ready = True

    def is_ready(self) -> bool:
        return self._ready and not self._draining

    async def shutdown(self, grace_s: float = 30.0) -> None:
        self._draining = True
        deadline = time.monotonic() + grace_s
        while self._queues and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._queues):
            await self.abort(rid)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._ready = False

    # ------------------------------------------------------------------ requests
    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if not self._ready or self._draining:
            raise EngineNotReady("the engine is starting or shutting down")
        stats = self.engine.stats()
        if stats.requests_waiting + self._num_waiting_cmds >= self.config.max_waiting:
            raise EngineBusy(f"{stats.requests_waiting} requests are waiting; retry later")
        if not request.request_id:
            request = replace(request, request_id=uuid.uuid4().hex)
        request = self.engine.validate(request)  # raises RequestRejected before anything is queued
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rid = request.request_id
        self._queues[rid] = (loop, q)
        with self._lock:
            self._num_waiting_cmds += 1
        self._cmds.put(("add", request))
        self._wake.set()
        finished = False
        try:
            while True:
                out: RequestOutput = await q.get()
                if out.finished:
                    finished = True
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self._cmds.put(("abort", rid))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        if self.engine is None:
            return EngineStats()
        return self.engine.stats()

    # ------------------------------------------------------------------ the loop
    def _emit(self, out: RequestOutput) -> None:
        target = self._queues.get(out.request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _drain_cmds(self) -> None:
        eng = self.engine
        while True:
            try:
                kind, arg = self._cmds.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._num_waiting_cmds -= 1
                if arg.request_id not in self._queues:
                    continue  # the client left before the engine saw it
                try:
                    eng.add_request(arg)
                except Exception as e:  # validated already; anything here is an engine fault
                    log.exception("request %s could not be added", arg.request_id)
                    self._emit(RequestOutput(arg.request_id, [], "", True, "error", error=str(e)))
            elif kind == "abort":
                out = eng.abort(arg)
                if out is not None:
                    self._emit(out)

    def _loop(self) -> None:
        eng = self.engine
        while not self._stop:
            self._drain_cmds()
            if not eng.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            running = [s.request_id for s in eng.scheduler.running] + [s.request_id for s in eng.scheduler.waiting]
            try:
                if self.fault_hook is not None:
                    self.fault_hook(eng)
                outputs = eng.step()
            except Exception as e:
                log.exception("engine step failed; failing the requests it ran")
                self._fail(running, e)
                continue
            for out in outputs:
                self._emit(out)

    def _fail(self, request_ids: list[str], err: Exception) -> None:
        """Fail the requests of a step that raised. A request named in the error (as
        `RequestFault.request_id`) fails alone; otherwise all requests of the step fail."""
        eng = self.engine
        target = getattr(err, "request_id", None)
        ids = [target] if target in request_ids else request_ids
        for rid in ids:
            out = eng.fail(rid, f"internal error while generating: {type(err).__name__}")
            if out is not None:
                self._emit(out)


class RequestFault(RuntimeError):
    """An error attributable to one request (tests inject it; the engine raises it where it
    knows which request a failure belongs to)."""

    def __init__(self, request_id: str, message: str = "injected fault"):
        super().__init__(message)
        self.request_id = request_id
