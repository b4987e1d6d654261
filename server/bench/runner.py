"""Run rows in worker processes on the same prompts and collect their per-prompt results.

`run_row` runs one row in its own process; `run_interleaved` runs several engine rows in one
process, taking turns prompt by prompt (`server.bench.worker.run_engines`). The engine and
Hugging Face rows run `python -m server.bench.worker` with this interpreter; vLLM rows run
`server/bench/vllm_worker.py` with the vLLM environment's interpreter. Every row is bounded by
`row_timeout_s`; a row that fails or times out comes back as `Skipped` with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from server.bench.rows import Row

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_WORKER = Path(__file__).with_name("vllm_worker.py")


@dataclass
class Skipped:
    name: str
    reason: str


def short_reason(text: str, limit: int = 300) -> str:
    """One line: a worker's exception message can span many (pydantic's do)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def find_vllm_python(explicit: str | None = None) -> Path | None:
    """The vLLM environment's interpreter: `--vllm-python`, `$VIA_SD_VLLM_PYTHON`, or
    `.venv-vllm/bin/python` in the working directory or the repository root."""
    cands = [explicit, os.environ.get("VIA_SD_VLLM_PYTHON"), ".venv-vllm/bin/python", str(REPO_ROOT / ".venv-vllm/bin/python")]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c).absolute()
    return None


def worker_command(row: Row, job_path: Path, result_path: Path, vllm_python: Path | None) -> list[str] | str:
    """The argv of the row's worker, or a string saying why it cannot run."""
    if row.kind == "vllm":
        if vllm_python is None:
            return "no vLLM environment (.venv-vllm/bin/python not found; create it or pass --vllm-python)"
        return [str(vllm_python), str(VLLM_WORKER), str(job_path), str(result_path)]
    return [sys.executable, "-m", "server.bench.worker", str(job_path), str(result_path)]


def run_row(row: Row, job: dict, *, vllm_python: Path | None = None, row_timeout_s: float = 3600.0,
            workdir: Path | None = None) -> dict | Skipped:
    """Run one row; return the worker's result dict (`ok` true) or Skipped."""
    return _run_worker(row, {**job, "row": {**row.to_dict(), "name": row.name}}, vllm_python=vllm_python,
                       timeout_s=row_timeout_s, workdir=workdir)


def run_interleaved(rows: list[Row], job: dict, *, row_timeout_s: float = 3600.0,
                    workdir: Path | None = None) -> dict[str, dict | Skipped]:
    """Engine rows in one process, taking turns prompt by prompt; per row its result dict or
    Skipped. The time limit is `row_timeout_s` per row."""
    if not rows:
        return {}
    if any(r.kind != "engine" for r in rows):
        raise ValueError("only engine rows run interleaved")
    res = _run_worker(rows[0], {**job, "rows": [{**r.to_dict(), "name": r.name} for r in rows]},
                       vllm_python=None, timeout_s=row_timeout_s * len(rows), workdir=workdir)
    if isinstance(res, Skipped):  # the process itself failed: every row with its reason
        return {r.name: Skipped(r.name, res.reason) for r in rows}
    got = {r.name: res["rows"].get(r.name) or {"ok": False, "error": "no result"} for r in rows}
    return {name: g if g.get("ok") else Skipped(name, short_reason(g.get("error", "failed"))) for name, g in got.items()}


def _run_worker(row: Row, job: dict, *, vllm_python: Path | None, timeout_s: float,
                workdir: Path | None) -> dict | Skipped:
    """The worker process of `row`'s kind on `job`; its result dict or Skipped."""
    with tempfile.TemporaryDirectory(prefix="via-sd-bench-", dir=workdir) as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        cmd = worker_command(row, job_path, result_path, vllm_python)
        if isinstance(cmd, str):
            return Skipped(row.name, cmd)
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if row.kind == "vllm":
            env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
            # the same cores as the other rows' torch threads (vLLM binds its OpenMP threads)
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, int(job.get('threads', 1))) - 1}")
        else:
            env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        try:
            # the worker's stdout goes to our stderr: our stdout carries only the table
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, stderr=sys.stderr, env=env,
                                  timeout=timeout_s, cwd=os.getcwd())
        except subprocess.TimeoutExpired:
            return Skipped(row.name, f"timed out after {timeout_s:.0f} s")
        except OSError as e:
            return Skipped(row.name, f"could not start its worker: {e}")
        if not result_path.is_file():
            return Skipped(row.name, f"its worker exited with code {proc.returncode} and wrote no result")
        res = json.loads(result_path.read_text())
        if not res.get("ok"):
            return Skipped(row.name, short_reason(res.get("error", "failed")))
        return res
