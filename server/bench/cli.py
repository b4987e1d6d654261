"""`via-sd bench`: Spec-Bench prompts through every row; a table, JSON, per-output texts, Markdown
and plots. The engine's rows run in one process taking turns prompt by prompt (so that the
machine's drift falls on all of them alike), each peer in a process of its own.
`via-sd bench --load ...` is the load test (`server.bench.load`).

    via-sd bench --prompts question.jsonl [--categories a,b] [--limit-per-category N]
        [--max-tokens N] [--modes off,binary,three_tier] [--drafters ngram,...]
        [--peers hf,hf_pld,vllm,vllm_ngram,vllm_three_tier,llamacpp,llamacpp_pld] [--temperature T] [--sweep [SPEC]] --out FILE.json

Writes FILE.json (`{"machine", "model", "command", "date", "settings", "runs", "skipped",
"sweep"?, "outputs"}`), FILE.outputs.jsonl (one line per run and prompt: the text and token ids),
FILE.md and FILE_*.png beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from server.bench import report as R
from server.bench.prompts import PromptFileError, read_questions, select_prompts
from server.bench.rows import (BF16_PREFILL, PEERS, Row, RowError, build_rows, parse_list, with_draft_heads,
                               with_prefill_dtypes)
from server.bench.sweep import best_setting, pareto, parse_sweep, sweep_points, sweep_row
from server.bench.runner import Skipped, find_vllm_python, run_interleaved, run_row
from server.engine.config import DRAFTERS, KV_CACHE_DTYPES, PREFILL_DTYPES, SPEC_MODES


def _die(msg: str, code: int = 2) -> int:
    print(f"via-sd bench: error: {msg}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="via-sd bench", description="Spec-Bench benchmark of via-sd against peers")
    p.add_argument("--prompts", help="Spec-Bench question.jsonl")
    p.add_argument("--categories", default=None, help="comma-separated; `mt_bench` = the eight MT-Bench categories")
    p.add_argument("--limit-per-category", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampled request i of our rows carries seed + i")
    p.add_argument("--unseeded", action="store_true",
                   help="our rows' sampled requests carry no seed, as most API clients send them (peers keep theirs)")
    p.add_argument("--modes", default="off,binary,three_tier", help=f"of {', '.join(SPEC_MODES)}")
    p.add_argument("--drafters", default=None, help=f"of {', '.join(DRAFTERS)}; default: the engine's default drafter")
    p.add_argument("--peers", default=",".join(PEERS), help=f"of {', '.join(PEERS)} (default: all); '' for none")
    p.add_argument("--pld-tokens", type=int, default=10, help="prompt_lookup_num_tokens of the hf_pld row")
    p.add_argument("--model", default=None, help="bundled model name or a local folder (default: the bundled model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every row (default: all cores)")
    p.add_argument("--out", default="benchmarks/results/latest.json")
    p.add_argument("--vllm-python", default=None, help="interpreter of the vLLM environment (default .venv-vllm/bin/python)")
    p.add_argument("--row-timeout", type=float, default=3600.0, help="seconds one row may take")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="run the engine's rows one after another, each in its own process, instead of taking turns "
                        "prompt by prompt in one process")
    p.add_argument("--repeats", type=int, default=1, help="run every row this many times; each prompt keeps its fastest")
    p.add_argument("--peer-repeats", type=int, default=None,
                   help="runs of the peer rows (hf, vllm, llamacpp); default: --repeats (a peer row takes minutes)")
    p.add_argument("--sweep", nargs="?", const="default", default=None,
                   help="sweep three_tier settings: 'accept_threshold=0.6,0.8;escalate_threshold=...;slim_confidence=...;"
                        "bonus_confidence=...;gamma=3,5;controller=0;full_accept_threshold=0.1,0.3;lenient_no_repeat=0,4' "
                        "(no value: the controller off, escalate 0.2, and each threshold and gamma varied; controller=0 "
                        "runs the slim tier at every step)")
    p.add_argument("--sweep-mode", choices=("one_at_a_time", "full"), default="one_at_a_time",
                   help="one key at a time (keys given one value hold for every point), or the full product")
    p.add_argument("--sweep-quality", choices=("prefix_agreement", "match_off"), default="prefix_agreement")
    p.add_argument("--min-quality", type=float, default=0.9, help="quality floor of the best sweep setting")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="our engine rows' K/V cache type (fp16: lossy; the peers keep theirs)")
    p.add_argument("--prefill-dtype", default="auto",
                   help="our engine rows' products in wide passes (the prompt): auto (the model's dtype, lossless), "
                        "bfloat16 (lossy), or auto,bfloat16: every engine row in both, the bf16 ones named <row>+bf16")
    p.add_argument("--draft-head", default=None,
                   help="our head and hybrid rows' draft head (.safetensors from via-sd train-head); default: the one "
                        "shipped for the model. Several, comma-separated: the head and hybrid rows run once per head, "
                        "those of the second and later named <row>@<file name>")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--load", action="store_true", help="load test of `via-sd serve` instead (see --help with --load)")
    return p


# the vector extensions that decide how fast the engine's kernels and bf16 matrix products run
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def machine_info(threads: int) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
            "threads": threads, "cpu": platform.processor() or platform.machine()}
    try:
        cpuinfo = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            cpuinfo.setdefault(key.strip(), value.strip())
        if "model name" in cpuinfo:
            info["cpu"] = cpuinfo["model name"]
        if "cpu family" in cpuinfo:
            # the same name ("AMD EPYC") covers generations whose kernels run at different speeds
            info["cpu_generation"] = f"family {cpuinfo['cpu family']} model {cpuinfo.get('model', '?')}"
        flags = set(cpuinfo.get("flags", "").split())
        info["isa"] = [f for f in ISA_FLAGS if f in flags]
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    try:
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def model_eos_ids(folder: Path) -> list[int]:
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        f = folder / name
        if f.is_file():
            v = json.loads(f.read_text()).get("eos_token_id")
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, list):
                ids.update(int(x) for x in v)
    return sorted(ids)


def git_state() -> dict | None:
    """The commit the rows ran from, and whether the tree had local changes (results from a
    dirty tree are not reproducible from the commit alone)."""
    import subprocess

    from server.bench.runner import REPO_ROOT

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit or None, "dirty": bool(dirty)} if commit else None


def via_sd_environment() -> dict[str, str]:
    """The VIA_SD_* switches set for this run (they change what the engine does: kernels, weight
    forms, pacing), so that a report says what ran beyond its command."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("VIA_SD_")}


def runnable_others(samples: int = 10, interval_s: float = 0.1, path: str = "/proc/loadavg") -> float | None:
    """How many other tasks are ready to run right now: the median over about a second of the
    running count in /proc/loadavg, less this process (Linux; None where the file cannot be read).
    The 1-minute load average lags by minutes: right after a benchmark ends it still reads ~2 on
    an idle 2-core machine, as it did at the start of `make bench`'s second command."""
    counts = []
    for i in range(samples):
        try:
            running = int(Path(path).read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(max(running - 1, 0))
        if i + 1 < samples:
            time.sleep(interval_s)
    return float(statistics.median(counts))


def busy_warning(threads: int, busy: float | None = None) -> str | None:
    """A warning when other work already occupies the cores: OpenMP threads that wait on each
    other's barriers slow down by orders of magnitude on an oversubscribed machine (measured on a
    2-core machine at load 10: 2 threads ran a tiny model 200x slower than 1 thread). `busy`: the
    tasks running beside this one (`runnable_others`); None where that could not be read, and the
    1-minute load average stands in."""
    what = "other tasks running"
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            return None
        what = "load average"
    cores = os.cpu_count() or 1
    if busy + threads > cores + 0.5 and threads > 1:
        return (f"via-sd bench: warning: {what} {busy:.1f} on {cores} cores; with {threads} threads per row the "
                f"timings will be badly skewed; wait for a quiet machine or pass --threads 1")
    return None


def merge_fastest(a: dict, b: dict) -> dict:
    """Two repeats of one row: per prompt, the faster one (outputs and counts come with it)."""
    by_id = {o["question_id"]: o for o in b["outputs"]}
    outs = [min(o, by_id.get(o["question_id"], o), key=lambda x: x["seconds"]) for o in a["outputs"]]
    return {**a, "outputs": outs, "repeats": a.get("repeats", 1) + 1}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--load" in argv:
        from server.bench import load

        return load.main([a for a in argv if a != "--load"])
    args = build_parser().parse_args(argv)
    if not args.prompts:
        return _die("--prompts is required (a Spec-Bench question.jsonl)")
    if args.max_tokens <= 0:
        return _die(f"--max-tokens must be a positive integer, got {args.max_tokens}")
    if args.limit_per_category is not None and args.limit_per_category <= 0:
        return _die(f"--limit-per-category must be positive, got {args.limit_per_category}")
    if not 1 <= args.repeats <= 20:
        return _die(f"--repeats must be in [1, 20], got {args.repeats}")
    if args.peer_repeats is None:
        args.peer_repeats = args.repeats
    if not 1 <= args.peer_repeats <= args.repeats:
        return _die(f"--peer-repeats must be in [1, --repeats], got {args.peer_repeats}")
    if args.temperature < 0:
        return _die(f"--temperature must be >= 0, got {args.temperature}")
    heads = [h.strip() for h in (args.draft_head or "").split(",") if h.strip()]
    for h in heads:
        if not Path(h).is_file():
            return _die(f"--draft-head: no such file {h!r}")
    try:
        modes = parse_list(args.modes, SPEC_MODES, "--modes")
        drafters = parse_list(args.drafters, DRAFTERS, "--drafters")
        peers = parse_list(args.peers, PEERS, "--peers")
        grid = parse_sweep(args.sweep) if args.sweep is not None else None
        if grid is not None and "off" not in modes:
            modes = ["off"] + modes  # the sweep's quality is agreement with off
        asked = parse_list(args.prefill_dtype, PREFILL_DTYPES, "--prefill-dtype")
        prefill_dtypes = [d for d in PREFILL_DTYPES if d in asked] or ["auto"]
        rows = build_rows(modes, drafters, peers, pld_tokens=args.pld_tokens)
        rows = with_prefill_dtypes(with_draft_heads(rows, heads), prefill_dtypes)
        categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
        prompts = select_prompts(read_questions(args.prompts), categories, args.limit_per_category)
    except (RowError, PromptFileError) as e:
        return _die(str(e))
    if not rows and grid is None:
        return _die("nothing to run: give --modes or --peers")
    if not prompts:
        return _die("no prompt selected")

    from server.engine.model_files import model_gguf, prepare_model
    from server.engine.tokenizer import Tokenizer

    try:
        folder = Path(prepare_model(args.model, progress=not args.no_progress))
    except (ValueError, FileNotFoundError) as e:
        return _die(str(e))
    eos = model_eos_ids(folder)
    tok = Tokenizer.from_folder(folder, extra_eos=tuple(eos))
    eos = sorted(set(eos) | set(tok.eos_token_ids))
    if not tok.has_chat_template:
        return _die(f"the model folder {folder} has no chat template; the benchmark applies it to every prompt")
    token_prompts = [{"question_id": p.question_id, "category": p.category,
                      "prompt_token_ids": tok.apply_chat_template([{"role": "user", "content": p.text}])} for p in prompts]
    threads = args.threads or os.cpu_count() or 1
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    git = git_state()
    others_at_start = runnable_others()
    busy = busy_warning(threads, others_at_start)
    if busy:
        print(busy, file=sys.stderr)
    model_max = json.loads((folder / "config.json").read_text()).get("max_position_embeddings", 4096)
    longest = max(len(p["prompt_token_ids"]) for p in token_prompts)
    if longest + args.max_tokens > model_max:
        return _die(f"the longest prompt has {longest} tokens; with --max-tokens {args.max_tokens} it exceeds the model's "
                    f"{model_max}; lower --max-tokens or drop that category")
    gguf = model_gguf(args.model)
    job = {"model": str(folder), "prompts": token_prompts, "max_tokens": args.max_tokens,
           "temperature": args.temperature, "seed": args.seed, "unseeded": args.unseeded, "threads": threads,
           "eos_token_ids": eos,
           "warmup_tokens": min(16, args.max_tokens), "progress": not args.no_progress,
           # the rows' setting when one is asked for; with both, the +bf16 rows carry their own
           "kv_cache_dtype": args.kv_cache_dtype, "prefill_dtype": prefill_dtypes[0],
           "head_path": heads[0] if heads else None,
           "gguf": str(gguf) if gguf else None,  # for the llama.cpp rows
           "max_model_len": min(model_max, -(-(longest + args.max_tokens + 16) // 256) * 256)}
    vllm_python = find_vllm_python(args.vllm_python)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    results: list[tuple[Row, dict]] = []
    skipped: list[Skipped] = []

    def run_all(todo: list[Row]) -> None:
        """Every row `--repeats` times, the order reversed on odd rounds so that a drift in the
        machine's load does not always hit the same row; a prompt keeps its fastest repeat. With
        interleaving (the default) the engine's rows run as one group, taking turns prompt by
        prompt, and each peer after it in its own process."""
        got: dict[str, dict] = {}
        failed: set[str] = set()

        def record(tag: str, row: Row, res: dict | Skipped) -> None:
            if isinstance(res, Skipped):
                print(f"{tag} {row.name}: skipped: {res.reason}", file=sys.stderr, flush=True)
                skipped.append(res)
                failed.add(row.name)
                got.pop(row.name, None)
            elif row.name in got:
                got[row.name] = merge_fastest(got[row.name], res)
            else:
                got[row.name] = res

        for rep in range(args.repeats):
            order = todo if rep % 2 == 0 else todo[::-1]
            rnd = f" round {rep + 1}/{args.repeats}]" if args.repeats > 1 else "]"
            group = [r for r in order if r.kind == "engine" and r.name not in failed] if args.interleave else []
            if group:
                order = [r for r in order if r.kind != "engine"]
                tag = f"[row {len(group)} engine rows interleaved" + rnd
                print(f"{tag} {', '.join(r.name for r in group)} ...", file=sys.stderr, flush=True)
                res = run_interleaved(group, job, row_timeout_s=args.row_timeout)
                for row in group:
                    record(tag, row, res[row.name])
            for i, row in enumerate(order, 1):
                if row.name in failed or (row.kind != "engine" and rep >= args.peer_repeats):
                    continue
                tag = f"[row {i}/{len(order)}" + rnd
                print(f"{tag} {row.name} ...", file=sys.stderr, flush=True)
                record(tag, row, run_row(row, job, vllm_python=vllm_python, row_timeout_s=args.row_timeout))
        results.extend((row, got[row.name]) for row in todo if row.name in got)

    sweep_rows: list[Row] = []
    if grid is not None:
        drafter = drafters[0] if drafters else None
        # the main three_tier row is the sweep's default point; it is not run twice
        has_main = any(r.name == sweep_row({}, drafter).name for r in rows)
        sweep_rows = [sweep_row(p, drafter) for p in sweep_points(grid, args.sweep_mode)
                      if not (p == {} and has_main)]
        # with `--prefill-dtype auto,bfloat16` each point also runs with bf16 prompts (`+bf16`)
        sweep_rows = with_prefill_dtypes(sweep_rows, prefill_dtypes)
    # the sweep's points run with the rows (interleaved: taking turns with `off` prompt by prompt)
    run_all(rows + sweep_rows)

    # texts and runs
    texts: dict[str, dict] = {}
    for row, res in results:
        texts[row.name] = {o["question_id"]: tok.decode([t for t in o["token_ids"] if t not in eos]) for o in res["outputs"]}
    off = next((res for row, res in results if row.name == "off"), None)
    off_ids = {o["question_id"]: o["token_ids"] for o in off["outputs"]} if off else None
    sweep_names = {r.name for r in sweep_rows}
    all_runs = [R.build_run(row, res, prompts, texts[row.name], off_ids) for row, res in results]
    R.add_speedups(all_runs)
    pairs = R.add_intervals(all_runs, {row.name: res["outputs"] for row, res in results})
    runs = [r for r in all_runs if r["name"] not in sweep_names]

    report = {
        "machine": {**machine_info(threads), "load_average_start": list(load_at_start) if load_at_start else None,
                    "others_running_start": others_at_start},
        "model": str(folder),
        "command": "via-sd bench " + shlex.join(argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"prompts": len(prompts), "categories": list(dict.fromkeys(p.category for p in prompts)),
                     "max_tokens": args.max_tokens, "temperature": args.temperature,
                     "seed": None if args.unseeded and args.temperature else args.seed,
                     "batch_size": 1, "threads": threads, "repeats": args.repeats,
                     "peer_repeats": args.peer_repeats, "prompt_file": str(args.prompts),
                     "interleaved": args.interleave, "kv_cache_dtype": args.kv_cache_dtype,
                     "prefill_dtype": "+".join(prefill_dtypes), "draft_head": args.draft_head},
        "git": git,
        "environment": via_sd_environment(),
        "runs": runs,
        "three_tier_vs_binary": pairs,
        "skipped": [{"name": s.name, "reason": s.reason} for s in skipped],
    }
    if grid is not None:
        default_name = sweep_row({}, drafters[0] if drafters else None).name
        defaults = {default_name, default_name + BF16_PREFILL}
        pts = [r for r in all_runs if r["name"] in sweep_names or r["name"] in defaults]
        pareto(pts, args.sweep_quality)
        best = best_setting(pts, args.sweep_quality, args.min_quality)
        report["sweep"] = {"grid": grid, "mode": args.sweep_mode, "quality_key": args.sweep_quality,
                           "min_quality": args.min_quality, "points": pts,
                           "best": {"name": best["name"], "params": best.get("params", {}), "tokens_per_s": best["tokens_per_s"],
                                    "speedup_vs_off": best["speedup_vs_off"], "quality": best["quality"]} if best else None}

    outputs_path = out.with_suffix(".outputs.jsonl")
    with outputs_path.open("w", encoding="utf-8") as f:
        by_id = {p.question_id: p for p in prompts}
        for row, res in results:
            for o in res["outputs"]:
                f.write(json.dumps({"run": row.name, "question_id": o["question_id"], "category": by_id[o["question_id"]].category,
                                    "text": texts[row.name][o["question_id"]], "token_ids": o["token_ids"],
                                    "finish_reason": o.get("finish_reason"), "seconds": o["seconds"]}, ensure_ascii=False) + "\n")
    report["outputs"] = outputs_path.name
    plots: list[Path] = []
    if not args.no_plots and results:
        try:
            from server.bench.plots import write_plots

            plots = write_plots(report, out.with_suffix(""))
            report["plots"] = [p.name for p in plots]
        except ImportError as e:  # matplotlib is in the `bench` extra
            print(f"no plots: {e} (pip install -e '.[bench]')", file=sys.stderr)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(R.render_markdown(report, [p.name for p in plots]))

    print(R.render_table(runs))
    for line in R.render_intervals(runs + [r for r in all_runs if r["name"] in sweep_names], pairs):
        print(line)
    for s in skipped:
        print(f"skipped {s.name}: {s.reason}")
    if report.get("sweep"):
        b = report["sweep"]["best"]
        if b:
            print(f"best three_tier setting ({args.sweep_quality} >= {args.min_quality}): {b['name']} "
                  f"{b['tokens_per_s']:.1f} tok/s, params {b['params'] or 'defaults'}")
        else:
            print(f"no three_tier setting reached {args.sweep_quality} >= {args.min_quality}")
    print(f"wrote {out}, {outputs_path.name}, {out.with_suffix('.md').name}" + "".join(f", {p.name}" for p in plots))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
