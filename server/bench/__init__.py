"""`via-sd bench`: the Spec-Bench harness (DESIGN.md section 4).

One row of the benchmark (an engine mode with a drafter, or a peer) runs in its own process
(`server.bench.worker`, or `server/bench/vllm_worker.py` under the vLLM environment) on the same
token ids; the parent (`server.bench.cli`) collects per-output results, scores quality
(`server.bench.quality`), aggregates (`server.bench.report`) and draws plots (`server.bench.plots`).
`--load` drives a live gateway instead (`server.bench.load`).
"""
