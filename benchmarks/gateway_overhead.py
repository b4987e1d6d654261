"""What the gateway itself costs per streamed token: the OpenAI-compatible app over an engine
that costs nothing (the gateway tests' `FakeEngine`: one token a step, detokenized as the real
engine does), under uvicorn, loaded by streaming chat requests on loopback.

It reports the server process's CPU time per streamed chunk (user + system, from /proc), an
upper bound on the gateway's share of a real server's CPU (the fake engine's own per-token work,
detokenizing and one event-loop turn, is in it), for each event loop and HTTP parser asked for
that is installed (`uvloop` and `httptools` are not dependencies of the project; a missing one is
skipped and said so):

    python benchmarks/gateway_overhead.py --loops asyncio,uvloop --https h11,httptools --out X.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def serve(loop: str, http: str, port: int) -> None:
    """The server process: the gateway over `FakeEngine` on 127.0.0.1:`port`."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "gateway")]
    import uvicorn
    from fake_engine import FakeEngine

    from server.gateway.app import create_app

    engine = FakeEngine(max_model_len=8192, max_num_seqs=256, max_waiting=1024, num_blocks=1 << 20, block_size=16)
    app = create_app(engine, api_key=None, served_model_names=["fake-model"], lifespan_start=True)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            loop=loop, http=http, lifespan="on")
    uvicorn.Server(config).run()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(port: int, pid: int, requests: int, concurrency: int, max_tokens: int) -> dict:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    chunks = 0
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            nonlocal chunks
            body = {"model": "fake-model", "messages": [{"role": "user", "content": f"request {i}"}],
                    "max_tokens": max_tokens, "stream": True, "temperature": 0, "via_sd": {"mode": "off"}}
            async with gate, client.stream("POST", url, json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        choices = json.loads(line[6:]).get("choices")
                        chunks += bool(choices and choices[0]["delta"].get("content"))

        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm-up: connections, first calls
        chunks = 0
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - c0
    return {"chunks": chunks, "wall_s": round(wall, 2), "chunks_per_s": round(chunks / wall, 1),
            "server_cpu_s": round(cpu, 2), "server_cpu_us_per_chunk": round(cpu / max(chunks, 1) * 1e6, 1)}


def measure(loop: str, http: str, args) -> dict:
    """One server process (started and awaited as `via-sd bench --load` starts its servers), loaded once."""
    import tempfile

    from server.bench.load import free_port, start_server, wait_healthy

    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        server = start_server(f"{loop}-{http}", [sys.executable, __file__, "--serve", loop, http, str(port)], port,
                              Path(logs))
        try:
            why = wait_healthy(server, 60)
            if why is not None:
                raise SystemExit(f"the server ({loop}, {http}) did not start: {why}")
            return {"loop": loop, "http": http,
                    **asyncio.run(load(port, server.proc.pid, args.requests, args.concurrency, args.max_tokens))}
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loops", default="asyncio", help="comma-separated: asyncio, uvloop")
    p.add_argument("--https", default="h11", help="comma-separated: h11, httptools")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="passes over the combinations, in turn")
    p.add_argument("--out", default=None)
    p.add_argument("--serve", nargs=3, metavar=("LOOP", "HTTP", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve[0], args.serve[1], int(args.serve[2]))
        return 0
    installed = {"asyncio": True, "h11": True}
    combos, skipped = [], []
    for loop in args.loops.split(","):
        for http in args.https.split(","):
            missing = [m for m in (loop, http) if not installed.get(m, importlib.util.find_spec(m) is not None)]
            (skipped.append({"loop": loop, "http": http, "missing": missing}) if missing
             else combos.append((loop, http)))
    rows = []
    for _ in range(args.repeats):
        for loop, http in combos:
            rows.append(measure(loop, http, args))
            print(json.dumps(rows[-1]), flush=True)
    for s in skipped:
        print(f"skipped {s['loop']} + {s['http']}: {', '.join(s['missing'])} not installed")
    if args.out:
        report = {"command": "python benchmarks/gateway_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "date": time.strftime("%Y-%m-%d"), "requests": args.requests, "concurrency": args.concurrency,
                  "max_tokens": args.max_tokens, "rows": rows, "skipped": skipped}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
