"""Load driver: many concurrent streaming clients against a via-sd server, every stream checked.

Each of `clients` asyncio workers takes the next of `requests` mixed requests (chat or
completion; via_sd mode off, binary or three_tier; greedy or sampled; short or long prompt; small
max_tokens; some with ignore_eos) and streams it. A stream is correct when it ends with
`data: [DONE]`, its last choice chunk has finish_reason "stop" or "length", and its usage chunk
agrees: "length" means exactly max_tokens tokens, "stop" at most max_tokens (with ignore_eos
only "length" is correct). 429s are counted apart (the queue was full); anything else is an
error. `run_load` returns a `LoadReport` with requests/s and TTFT percentiles.

    python -m tests.reliability.load_run --clients 128 --requests 512            # own server
    python -m tests.reliability.load_run --url http://127.0.0.1:8000 --api-key K  # a running one

Without --url it starts `via-sd serve` on the tiny random model on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

MODES = ("off", "binary", "three_tier")
WORDS = "the cat sat on a mat and then it ran far away to see the sea".split()


@dataclass(frozen=True)
class LoadSpec:
    """One request of the mix."""

    index: int
    kind: str  # "chat" or "completion"
    mode: str
    temperature: float
    prompt: str
    max_tokens: int
    ignore_eos: bool

    def body(self, model: str | None) -> dict:
        body: dict = {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "stream": True,
            "stream_options": {"include_usage": True}, "via_sd": {"mode": self.mode},
            "ignore_eos": self.ignore_eos,
        }
        if self.temperature > 0:
            body["seed"] = self.index
        if model is not None:
            body["model"] = model
        if self.kind == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body


def make_specs(n: int, seed: int = 0, max_tokens: tuple[int, int] = (2, 12), long_words: int = 60) -> list[LoadSpec]:
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        words = rng.randint(long_words // 2, long_words) if i % 4 == 3 else rng.randint(2, 8)
        specs.append(LoadSpec(
            index=i,
            kind="chat" if i % 2 == 0 else "completion",
            mode=MODES[i % 3],
            temperature=0.0 if (i // 3) % 2 == 0 else 0.8,
            prompt=" ".join(rng.choice(WORDS) for _ in range(words)),
            max_tokens=rng.randint(*max_tokens),
            ignore_eos=i % 5 == 0,
        ))
    return specs


@dataclass
class Outcome:
    spec: LoadSpec
    status: int = 0
    ok: bool = False
    problem: str = ""
    ttft_s: float | None = None
    latency_s: float = 0.0
    retry_after: str | None = None


@dataclass
class LoadReport:
    outcomes: list[Outcome]
    wall_s: float
    statuses: Counter = field(default_factory=Counter)

    @property
    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def problems(self) -> list[str]:
        return [f"#{o.spec.index} {o.status}: {o.problem}" for o in self.outcomes if not o.ok and o.status != 429]

    @property
    def requests_per_s(self) -> float:
        return len(self.completed) / self.wall_s if self.wall_s > 0 else 0.0

    def ttft_percentile(self, q: float) -> float:
        values = sorted(o.ttft_s for o in self.completed if o.ttft_s is not None)
        if not values:
            return float("nan")
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]

    def summary(self) -> str:
        return (
            f"{len(self.completed)}/{len(self.outcomes)} streams correct in {self.wall_s:.1f} s: "
            f"{self.requests_per_s:.2f} requests/s, TTFT p50 {self.ttft_percentile(0.5) * 1000:.0f} ms, "
            f"p99 {self.ttft_percentile(0.99) * 1000:.0f} ms; statuses {dict(sorted(self.statuses.items()))}"
        )


def check_stream(spec: LoadSpec, frames: list[str]) -> str:
    """'' when the SSE frames of `spec` form a correct stream, else what is wrong."""
    if not frames or frames[-1] != "[DONE]":
        return f"does not end with [DONE] (last {frames[-1:]!r})"
    chunks = [json.loads(f) for f in frames[:-1]]
    if any("error" in c for c in chunks):
        return f"error event {next(c for c in chunks if 'error' in c)!r}"
    finishes = [ch["finish_reason"] for c in chunks for ch in c.get("choices", []) if ch.get("finish_reason")]
    usage = chunks[-1].get("usage") if chunks else None
    if len(finishes) != 1 or usage is None:
        return f"expected one finish_reason and a usage chunk, got {finishes!r}, usage {usage!r}"
    finish, tokens = finishes[0], usage["completion_tokens"]
    if finish == "length" and tokens != spec.max_tokens:
        return f"finish 'length' after {tokens} of {spec.max_tokens} tokens"
    if finish == "stop" and (spec.ignore_eos or not 1 <= tokens <= spec.max_tokens):
        return f"finish 'stop' after {tokens} tokens (max {spec.max_tokens}, ignore_eos {spec.ignore_eos})"
    if finish not in ("stop", "length"):
        return f"finish_reason {finish!r}"
    return ""


async def one_stream(client: httpx.AsyncClient, url: str, spec: LoadSpec, model: str | None,
                     headers: dict, timeout_s: float) -> Outcome:
    path = "/v1/chat/completions" if spec.kind == "chat" else "/v1/completions"
    out = Outcome(spec)
    t0 = time.perf_counter()
    frames: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url + path, json=spec.body(model), headers=headers) as r:
                out.status = r.status_code
                if r.status_code != 200:
                    out.retry_after = r.headers.get("retry-after")
                    out.problem = (await r.aread()).decode(errors="replace")[:200]
                    return out
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    frames.append(data)
                    if out.ttft_s is None and data != "[DONE]":
                        ch = json.loads(data).get("choices") or [{}]
                        if ch[0].get("text") or (ch[0].get("delta") or {}).get("content"):
                            out.ttft_s = time.perf_counter() - t0
    except (TimeoutError, httpx.HTTPError) as e:
        out.problem = f"{type(e).__name__}: {e}"
        return out
    finally:
        out.latency_s = time.perf_counter() - t0
    out.problem = check_stream(spec, frames)
    out.ok = not out.problem
    return out


async def run_load(url: str, specs: list[LoadSpec], clients: int, *, model: str | None = None,
                   api_key: str | None = None, request_timeout_s: float = 120.0) -> LoadReport:
    """Drive `specs` through `clients` concurrent workers; bounded by `request_timeout_s` per
    request."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    pending = list(reversed(specs))
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=30), limits=limits) as client:
        async def worker() -> None:
            while pending:
                outcomes.append(await one_stream(client, url, pending.pop(), model, headers, request_timeout_s))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    outcomes.sort(key=lambda o: o.spec.index)
    return LoadReport(outcomes, wall, Counter(o.status for o in outcomes))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server; default: start one on the tiny model")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="the `model` field to send")
    p.add_argument("--clients", type=int, default=128)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32, help="own server: running batch size")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    specs = make_specs(a.requests, a.seed, max_tokens=(2, a.max_tokens))
    if a.url:
        report = asyncio.run(run_load(a.url, specs, a.clients, model=a.model, api_key=a.api_key))
    else:
        import tempfile
        from pathlib import Path

        from tests.reliability.conftest import serve_subprocess
        from server.engine.testing import write_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            folder = write_tiny_model(Path(tmp) / "tiny", num_layers=4)
            args = ["--max-num-seqs", str(a.max_num_seqs), "--max-waiting", str(max(256, a.clients * 2))]
            with serve_subprocess(folder, args, cwd=Path(tmp)) as srv:
                report = asyncio.run(run_load(srv.url, specs, a.clients))
    load = ", ".join(f"{x:.2f}" for x in __import__("os").getloadavg())
    print(f"clients {a.clients}, requests {a.requests}, load average {load}")
    print(report.summary())
    for problem in report.problems[:10]:
        print("  problem:", problem)
    return 0 if not report.problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
