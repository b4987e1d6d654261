"""The vLLM backend of the gateway: `VLLMAsyncEngine(config)` wraps vLLM's `AsyncLLM` with the
plugin's three-tier worker behind via-sd's `AsyncEngineClient`.

`via-sd serve --backend vllm` constructs `VLLMAsyncEngine(config: EngineConfig)` with
`config.model` a prepared model folder (or the bundled model's name) and calls `start()`. It runs
in the vLLM environment (`.venv-vllm`, `make vllm-env`): vLLM's engine core and the worker are
child processes of the gateway.

Translation, once, at the edge:
- `EngineConfig.spec.mode`: `off` = no speculative_config (plain vLLM); `binary` = vLLM's n-gram
  speculation through the plugin worker with the slim tier off; `three_tier` = the plugin's
  three-tier schedule (`PluginSettings`, server/vllm_plugin/runner.py): `schedule="skip"` (the
  default), whose shipping variant skips vLLM's full forward per sequence (the full forward runs
  over the escalating sub-batch only), or `"prune"` (exact, counts only). Only n-gram lookup
  exists here: `ngram`, or `hybrid` (the engine's default), which is lookup without its head.
- Per request, `SpecParams` travel in `SamplingParams.extra_args["via_sd"]` to the worker.
- Outputs are vLLM's `RequestOutputKind.DELTA` outputs turned into `RequestOutput` deltas. The
  request's exact cumulative `via_sd` counts are read from the worker (`collective_rpc`) when it
  finishes and sent on the **final** delta; earlier deltas carry the latest snapshot of the
  running counts (polled about once a second with the totals, so they lag and start at zeros).
  Only the final delta's counts are final: the gateway reports usage (JSON `usage`, the streamed
  usage chunk) from it alone.
- `stats()` = a stat logger's last scheduler snapshot (running, waiting, KV usage), its summed
  iteration and spec-decode counters (vLLM's own `spec_decode_num_*`), plus the worker's tier
  counters, refreshed about once a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from pathlib import Path
from typing import AsyncIterator

from server.engine.api import (
    AsyncEngineClient,
    EngineBusy,
    EngineNotReady,
    EngineStats,
    GenerationRequest,
    RequestOutput,
    RequestRejected,
    SpecUsage,
    TokenLogprob,
)
from server.engine.config import ConfigError, EngineConfig, SamplingParams

logger = logging.getLogger("via_sd.vllm_backend")

CPU_WORKER = "server.vllm_plugin.worker.ViaSDCPUWorker"
GPU_WORKER = "server.vllm_plugin.worker.ViaSDGPUWorker"
_STATS_PERIOD_S = 1.0


def engine_env(config: EngineConfig) -> None:
    """Environment vLLM reads at start (inherited by its engine and worker processes)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(config.kv_cache_memory_gb))))
    if config.num_threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(config.num_threads))


def plugin_settings(config: EngineConfig, schedule: str = "skip") -> dict:
    s = config.spec
    return {
        "mode": "binary" if s.mode == "binary" else "three_tier",
        "schedule": schedule,
        "accept_threshold": s.accept_threshold,
        "escalate_threshold": s.escalate_threshold,
        "bonus_confidence": s.bonus_confidence,
        "slim_confidence": s.slim_confidence,
        "max_slim_backlog": s.max_slim_backlog,
        "slim_route": s.slim_route,
        "full_accept_threshold": s.full_accept_threshold,
        "lenient_no_repeat": s.lenient_no_repeat,
    }


def engine_kwargs(config: EngineConfig, folder: Path, max_model_len: int, schedule: str = "skip") -> dict:
    """Keyword arguments of vLLM's (Async)EngineArgs for `config` (also used by tests and bench)."""
    s = config.spec
    # `hybrid` (the engine's default) is n-gram lookup plus a head that reads hidden states; the
    # plugin has the lookup part only, which is what `hybrid` is for a model without a head
    if s.mode != "off" and s.drafter not in ("ngram", "hybrid"):
        raise ConfigError(f"the vLLM backend supports the ngram drafter only, got {s.drafter!r}", "drafter")
    kw: dict = dict(
        model=str(folder),
        dtype=config.dtype,
        enforce_eager=True,
        max_model_len=max_model_len,
        max_num_seqs=config.max_num_seqs,
        disable_log_stats=False,
        tensor_parallel_size=config.tensor_parallel_size,
        pipeline_parallel_size=config.pipeline_parallel_size,
        enable_prefix_caching=config.enable_prefix_caching,
    )
    if s.mode != "off":
        from vllm.platforms import current_platform

        kw["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": s.num_draft_tokens,
            "prompt_lookup_max": s.ngram_max,
            "prompt_lookup_min": s.ngram_min,
        }
        # said, not left to vLLM's default rule: the runner reads each request's output as of
        # the last step, which async scheduling fills with placeholders
        kw["async_scheduling"] = False
        kw["worker_cls"] = CPU_WORKER if current_platform.is_cpu() else GPU_WORKER
        kw["additional_config"] = {"via_sd": plugin_settings(config, schedule)}
        if s.mode == "three_tier" and schedule == "skip":
            # slim-only K/V must never be shared through the prefix cache
            kw["enable_prefix_caching"] = False
    return kw


def to_vllm_sampling(sp: SamplingParams, spec_extra: dict, logprobs: int | None):
    from vllm import SamplingParams as VSP
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    so, structured = sp.structured_outputs, None
    if so is not None:
        structured = StructuredOutputsParams(
            json=so.json, regex=so.regex, choice=None if so.choice is None else list(so.choice), grammar=so.grammar,
            json_object=True if so.json_object else None, disable_any_whitespace=so.disable_any_whitespace)

    return VSP(
        n=1,
        max_tokens=sp.max_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        seed=sp.seed,
        stop=list(sp.stop) or None,
        stop_token_ids=list(sp.stop_token_ids) or None,
        ignore_eos=sp.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=sp.prompt_logprobs,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        logit_bias=dict(sp.logit_bias) or None,
        repetition_penalty=sp.repetition_penalty,
        min_p=sp.min_p,
        min_tokens=sp.min_tokens,
        allowed_token_ids=None if sp.allowed_token_ids is None else list(sp.allowed_token_ids),
        bad_words=list(sp.bad_words) or None,
        skip_special_tokens=sp.skip_special_tokens,
        include_stop_str_in_output=sp.include_stop_str_in_output,
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA,
        extra_args={"via_sd": spec_extra},
    )


class _StatLogger:
    """A vLLM stat logger (front-end process) keeping the latest gauges and summed counters."""

    def __init__(self, sink: "VLLMAsyncEngine"):
        self.sink = sink

    def __call__(self, vllm_config, engine_index: int = 0):  # the factory vLLM calls
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self.sink

        class ViaSDStatLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0, *a, **kw):
                st = sink._vllm_stats
                if scheduler_stats is not None:
                    st.requests_running = scheduler_stats.num_running_reqs
                    st.requests_waiting = scheduler_stats.num_waiting_reqs
                    st.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                    pc = getattr(scheduler_stats, "prefix_cache_stats", None)
                    if pc is not None:
                        st.prefix_cache_queries += int(pc.queries)
                        st.prefix_cache_hits += int(pc.hits)
                    sd = scheduler_stats.spec_decoding_stats
                    if sd is not None:
                        st.num_drafts += sd.num_drafts
                        st.draft_tokens += sd.num_draft_tokens
                        st.accepted_tokens += sd.num_accepted_tokens
                if iteration_stats is not None:
                    st.generation_tokens += iteration_stats.num_generation_tokens
                    pts = getattr(iteration_stats, "prompt_token_stats", None)
                    st.prompt_tokens += int(getattr(pts, "total", 0) or getattr(iteration_stats, "num_prompt_tokens", 0) or 0)
                    st.preemptions += getattr(iteration_stats, "num_preempted_reqs", 0)
                    st.num_steps += 1

            def log_engine_initialized(self):
                pass

        return ViaSDStatLogger(vllm_config, engine_index)


class VLLMAsyncEngine(AsyncEngineClient):
    def __init__(self, config: EngineConfig, *, schedule: str = "skip"):
        from server.engine.model_files import prepare_model
        from server.engine.tokenizer import Tokenizer

        self.config = config
        self.schedule = schedule
        self.folder = Path(prepare_model(config.model, progress=False))
        self._tokenizer = Tokenizer.from_folder(self.folder)
        self.model_name = self.folder.name
        cfg = json.loads((self.folder / "config.json").read_text())
        self.max_model_len = int(config.max_model_len or min(cfg.get("max_position_embeddings", 2048), 8192))
        self._llm = None
        self._ready = False
        self._draining = False
        self._inflight: set[str] = set()
        self._vllm_stats = EngineStats()
        self._worker_totals: dict = {}
        self._live_usage: dict[str, dict] = {}  # in-flight request id -> last polled counts
        self._poll_task: asyncio.Task | None = None

    @property
    def tokenizer(self):
        return self._tokenizer

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._llm is not None:
            return
        engine_env(self.config)
        import server.vllm_plugin as plugin

        plugin.check_vllm_version()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from vllm.config import StructuredOutputsConfig

        kw = engine_kwargs(self.config, self.folder, self.max_model_len, self.schedule)
        # the embedded engine's library (llguidance): the same grammars (Lark) and the same masks
        kw["structured_outputs_config"] = StructuredOutputsConfig(backend="guidance")
        self._uses_plugin = "worker_cls" in kw
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw), stat_loggers=[_StatLogger(self)])
        self._ready = True
        if self._uses_plugin:
            self._poll_task = asyncio.create_task(self._poll_worker_stats())

    async def shutdown(self, grace_s: float = 30.0) -> None:
        self._draining = True
        self._ready = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._inflight and self._llm is not None:
            await self._llm.abort(list(self._inflight))
        if self._poll_task is not None:
            self._poll_task.cancel()
            self._poll_task = None
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def is_ready(self) -> bool:
        return self._ready and self._llm is not None

    # ---- requests ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if not self.is_ready():
            raise EngineNotReady("the vLLM engine is not running (starting or draining)")
        prompt = list(request.prompt_token_ids)
        sp = request.sampling
        if not prompt:
            raise RequestRejected("the prompt is empty", "messages")
        if len(prompt) + sp.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({sp.max_tokens}) exceeds the model's "
                f"context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens",
                "max_tokens", "context_length_exceeded",
            )
        if len(self._inflight) - self._vllm_stats.requests_running >= self.config.max_waiting:
            raise EngineBusy()
        spec = self.config.spec.resolve(request.spec)
        extra = {
            "mode": spec.mode,
            "accept_threshold": spec.accept_threshold,
            "escalate_threshold": spec.escalate_threshold,
            "num_draft_tokens": spec.num_draft_tokens,
            "full_accept_threshold": spec.full_accept_threshold,
            "request_id": request.request_id,
        }
        vsp = to_vllm_sampling(sp, extra, sp.logprobs)
        rid = request.request_id
        self._inflight.add(rid)
        finished = False
        completion = 0
        try:
            from vllm.exceptions import VLLMValidationError
            from vllm.inputs import TokensPrompt

            try:
                outs = aiter(self._llm.generate(TokensPrompt(prompt_token_ids=prompt), vsp, rid))
                head = await anext(outs)
            except VLLMValidationError as e:
                # vLLM's own checks, before any output: a 400 with its words (e.g. logit_bias and
                # min_p, which its speculative decoding does not take; its message names both)
                named = [p for p, used in (("logit_bias", sp.logit_bias), ("min_p", sp.min_p)) if used and p in str(e)]
                param = e.parameter or next(iter(named), None)
                raise RequestRejected(f"vLLM rejected the request: {e}", param) from None
            except StopAsyncIteration:
                return

            async def rest():
                yield head
                async for o in outs:
                    yield o

            async for out in rest():
                c = out.outputs[0]
                ids = list(c.token_ids)
                completion += len(ids)
                finished = out.finished
                usage = await self._usage(rid) if finished else SpecUsage(**self._live_usage.get(rid, {}))
                yield RequestOutput(
                    request_id=rid,
                    token_ids=ids,
                    text=c.text,
                    finished=finished,
                    finish_reason=_finish_reason(c.finish_reason) if finished else None,
                    prompt_tokens=len(prompt),
                    completion_tokens=completion,
                    cached_tokens=int(getattr(out, "num_cached_tokens", None) or 0),
                    via_sd=usage,
                    logprobs=_logprobs(ids, c.logprobs) if sp.logprobs is not None else None,
                    # vLLM's prompt logprobs come with the first output
                    prompt_logprobs=(_prompt_logprobs(prompt, out)
                                     if out is head and sp.prompt_logprobs is not None else None),
                )
        finally:
            self._inflight.discard(rid)
            self._live_usage.pop(rid, None)
            if not finished and self._llm is not None:
                await self._llm.abort(rid)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    # ---- counters ----------------------------------------------------------------------------

    async def _usage(self, rid: str) -> SpecUsage:
        if not self._uses_plugin:
            return SpecUsage()
        try:
            res = await self._llm.collective_rpc("via_sd_take_usage", args=([rid],))
        except Exception as e:  # stats must never fail a request
            logger.warning("via-sd: reading request counts failed: %s", e)
            return SpecUsage()
        u = SpecUsage()
        for per_worker in res:
            if rid in per_worker:
                u.add(SpecUsage(**per_worker[rid]))
                break
        return u

    async def _poll_worker_stats(self) -> None:
        while True:
            try:
                res = await self._llm.collective_rpc("via_sd_stats", args=(sorted(self._inflight),))
                if res:
                    self._worker_totals = res[0].get("totals", {})
                    live = res[0].get("usage", {})
                    for rid in list(live):
                        if rid in self._inflight:
                            self._live_usage[rid] = live[rid]
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.debug("via-sd: worker stats poll failed: %s", e)
            await asyncio.sleep(_STATS_PERIOD_S)

    async def refresh_stats(self) -> EngineStats:
        """Read the worker's counters now (tests, shutdown), then return `stats()`."""
        if self._llm is not None and self._uses_plugin:
            res = await self._llm.collective_rpc("via_sd_stats")
            self._worker_totals = res[0].get("totals", {})
        return self.stats()

    def stats(self) -> EngineStats:
        v, w = self._vllm_stats, self._worker_totals
        return EngineStats(
            requests_running=v.requests_running,
            requests_waiting=v.requests_waiting,
            kv_cache_usage=v.kv_cache_usage,
            prompt_tokens=v.prompt_tokens,
            generation_tokens=v.generation_tokens,
            num_drafts=v.num_drafts,
            draft_tokens=v.draft_tokens,
            accepted_tokens=v.accepted_tokens,
            tier_accept=w.get("tier_accept", 0),
            tier_slim=w.get("tier_slim", 0),
            tier_full=w.get("tier_full", 0),
            slim_passes=w.get("slim_passes", 0),
            full_passes=w.get("full_passes", 0),
            slim_regenerated=w.get("slim_regenerated", 0),
            controller_slim_on=w.get("controller_slim_on", 0),
            controller_slim_off=w.get("controller_slim_off", 0),
            lenient_accepted=w.get("lenient_accepted", 0),
            preemptions=v.preemptions,
            num_steps=v.num_steps,
            prefix_cache_queries=v.prefix_cache_queries,
            prefix_cache_hits=v.prefix_cache_hits,
        )


def _finish_reason(r: str | None) -> str:
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(r or "", "error" if r else "stop")


def _prompt_logprobs(prompt: list[int], out) -> list[TokenLogprob | None] | None:
    """vLLM's `RequestOutput.prompt_logprobs` (None, then one {token id: Logprob} per prompt
    token) as the engine's list."""
    lps = getattr(out, "prompt_logprobs", None)
    if lps is None:
        return None
    return [None] + (_logprobs(list(prompt[1:]), list(lps[1:])) or [])


def _logprobs(ids: list[int], lps) -> list[TokenLogprob] | None:
    if lps is None:
        return None
    out = []
    for tid, d in zip(ids, lps):
        chosen = d.get(tid)
        top = sorted(((t, lp.logprob) for t, lp in d.items()), key=lambda x: -x[1])
        out.append(TokenLogprob(tid, chosen.logprob if chosen else float("-inf"), tuple(top),
                                getattr(chosen, "rank", None)))
    return out
