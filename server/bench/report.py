"""From per-prompt worker results to the JSON runs, the printed table and the Markdown report.

Definitions (per run, and per category over that category's prompts):

- `tokens`: generated tokens (an eos that ends an output counts); `seconds`: the sum of the
  per-prompt wall times (warm-up and model load excluded); `tokens_per_s` = tokens / seconds.
- `speedup_vs_off` = tokens_per_s / tokens_per_s of `off` (None without an `off` row).
- `mean_accepted_tokens` = tokens / steps: tokens committed per decoding step (1.0 for `off`).
- `acceptance_rate` = accepted draft tokens / draft tokens.
- `tier_rates` = tier decisions / all decided draft positions, for accept (A), slim (B) and
  full (C); lossless peers that draft have everything decided by the full model; None for rows
  that do not draft.
- `full_passes_per_token` = full-model passes / tokens (1.0 for `off`; the lower, the more the
  speculation saved).
- `slim_tier_on`: share of `three_tier` steps with a draft where the controller kept the slim tier.
- `lenient_share`: share of the generated tokens that are drafts the full model kept by
  `full_accept_threshold` though they were not its own choice (0 with the exact rule; None for peers).
- `speedup_interval` (each run and each sweep point): a 95% interval for `speedup_vs_off` from a
  paired bootstrap over the prompts
  (`ratio_interval`): how far the ratio moves with the choice of prompts. It does not hold what
  the machine did between runs or processes; the engine's rows take turns prompt by prompt, which
  is what makes their pairing meaningful, so the peers' intervals are narrower than their truth.
- `three_tier_vs_binary` (the report's): per drafter, `three_tier`'s tokens/s over `binary`'s on
  the same prompts, with the same interval.
"""

from __future__ import annotations

import math
import random

from server.bench import quality as Q
from server.bench.prompts import categories_in_order


def _div(a, b):
    return a / b if b else None


def _sum(items, key):
    vals = [it.get(key) for it in items]
    if any(v is None for v in vals):
        return None
    return sum(vals)


def metrics(items: list[dict], drafts: bool, peer: bool) -> dict:
    """Speed and speculation numbers over `items` (one dict per prompt from the worker)."""
    tokens = sum(len(it["token_ids"]) for it in items)
    seconds = sum(it["seconds"] for it in items)
    steps = _sum(items, "steps")
    full = _sum(items, "full_passes")
    draft_tokens = _sum(items, "draft_tokens")
    accepted = _sum(items, "accepted")
    ta, ts, tf = (_sum(items, k) for k in ("tier_accept", "tier_slim", "tier_full"))
    if not drafts:
        tiers = None
    elif peer:
        tiers = {"accept": 0.0, "slim": 0.0, "full": 1.0}
    elif None not in (ta, ts, tf) and ta + ts + tf > 0:
        tot = ta + ts + tf
        tiers = {"accept": ta / tot, "slim": ts / tot, "full": tf / tot}
    else:
        tiers = {"accept": 0.0, "slim": 0.0, "full": 0.0}
    on, off = _sum(items, "slim_on") or 0, _sum(items, "slim_off") or 0
    lenient = _sum(items, "lenient")
    ttfts = [it["ttft"] for it in items if it.get("ttft") is not None]
    return {
        "prompts": len(items),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": _div(tokens, seconds),
        "mean_accepted_tokens": _div(tokens, steps) if steps is not None else None,
        "acceptance_rate": _div(accepted, draft_tokens) if drafts and draft_tokens else None,
        "tier_rates": tiers,
        "full_passes_per_token": _div(full, tokens) if full is not None else None,
        "slim_tier_on": _div(on, on + off) if on + off else None,
        "lenient_share": _div(lenient, tokens) if lenient is not None and drafts and not peer else None,
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
    }


def build_run(row, result: dict, prompts: list, texts: dict, off_ids: dict | None) -> dict:
    """One `runs[]` entry. `prompts` are the BenchPrompts in order; `texts` maps question id to the
    decoded output; `off_ids` maps question id to `off`'s token ids (None: no `off` row)."""
    by_id = {p.question_id: p for p in prompts}
    items = []
    for o in result["outputs"]:
        p = by_id[o["question_id"]]
        items.append({**o, "category": p.category, "references": p.references, "text": texts[o["question_id"]]})
    peer = row.kind != "engine"
    run = {"name": row.name, "kind": row.kind}
    for k in ("mode", "drafter", "params", "prompt_lookup_num_tokens", "speculative_config", "prompt_lookup", "engine"):
        v = getattr(row, k)
        if v not in (None, {}):
            run[k] = v
    run.update(metrics(items, row.drafts, peer))
    run["speedup_vs_off"] = None
    run["quality"] = Q.score(items, off_ids)
    run["per_category"] = {}
    for cat in categories_in_order(prompts):
        sub = [it for it in items if it["category"] == cat]
        if sub:
            m = metrics(sub, row.drafts, peer)
            m["speedup_vs_off"] = None
            m["quality"] = Q.score(sub, off_ids)
            run["per_category"][cat] = m
    run["load_seconds"] = result.get("load_seconds")
    for k in ("vllm_version", "llama_cpp_version"):
        if result.get(k):
            run[k] = result[k]
    return run


def add_speedups(runs: list[dict]) -> None:
    off = next((r for r in runs if r["name"] == "off"), None)
    if off is None:
        return
    for r in runs:
        r["speedup_vs_off"] = _div(r["tokens_per_s"], off["tokens_per_s"])
        for cat, m in r["per_category"].items():
            base = off["per_category"].get(cat)
            m["speedup_vs_off"] = _div(m["tokens_per_s"], base["tokens_per_s"]) if base else None


def ratio_interval(a: list[dict], b: list[dict], *, level: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float, float] | None:
    """tokens/s of the per-prompt results `a` over those of `b` on the prompts both ran, and a
    `level` interval for it: the prompts resampled with replacement `resamples` times (the same
    draw for both, so a prompt's own length and difficulty cancel out), the ratio of summed tokens
    over summed seconds each time, the interval's ends at the tails' quantiles. Fixed seed: the
    same results give the same interval. None without shared prompts or time."""
    sa = {o["question_id"]: (len(o["token_ids"]), o["seconds"]) for o in a}
    sb = {o["question_id"]: (len(o["token_ids"]), o["seconds"]) for o in b}
    ids = [q for q in sa if q in sb]

    def ratio(qs) -> float | None:
        ta, xa = sum(sa[q][0] for q in qs), sum(sa[q][1] for q in qs)
        tb, xb = sum(sb[q][0] for q in qs), sum(sb[q][1] for q in qs)
        return (ta / xa) / (tb / xb) if xa > 0 and xb > 0 and tb > 0 else None

    point = ratio(ids) if ids else None
    if point is None:
        return None
    rng = random.Random(seed)
    draws = sorted(r for r in (ratio(rng.choices(ids, k=len(ids))) for _ in range(resamples)) if r is not None)
    tail = (1.0 - level) / 2
    lo = draws[min(len(draws) - 1, int(tail * len(draws)))]
    hi = draws[max(0, math.ceil((1.0 - tail) * len(draws)) - 1)]
    return point, lo, hi


def add_intervals(runs: list[dict], outputs: dict[str, list[dict]]) -> list[dict]:
    """Each run's `speedup_interval` against `off` (where both ran), and the pairs of a
    `three_tier` run and the `binary` run of the same drafter and settings (names that differ
    only in the mode's prefix): `[{"three_tier", "binary", "ratio", "interval"}]`."""
    off = outputs.get("off")
    for r in runs:
        iv = ratio_interval(outputs[r["name"]], off) if off is not None and r["name"] in outputs else None
        r["speedup_interval"] = [iv[1], iv[2]] if iv else None
    pairs = []
    names = {r["name"] for r in runs}
    for r in runs:
        if r.get("mode") != "three_tier" or not r["name"].startswith("three_tier"):
            continue
        other = "binary" + r["name"][len("three_tier"):]
        if other in names and r["name"] in outputs and other in outputs:
            iv = ratio_interval(outputs[r["name"]], outputs[other])
            if iv:
                pairs.append({"three_tier": r["name"], "binary": other, "ratio": iv[0], "interval": [iv[1], iv[2]]})
    return pairs


def render_intervals(runs: list[dict], pairs: list[dict]) -> list[str]:
    """Lines for the printed summary: each run's speed-up with its interval, then each pair."""
    out = [f"{r['name']}: {r['speedup_vs_off']:.3f}x off [{r['speedup_interval'][0]:.3f}, {r['speedup_interval'][1]:.3f}]"
           for r in runs if r.get("speedup_interval") and r["name"] != "off"]
    out += [f"{p['three_tier']} / {p['binary']}: {p['ratio']:.3f}x [{p['interval'][0]:.3f}, {p['interval'][1]:.3f}]"
            for p in pairs]
    return out


# ------------------------------------------------------------------ rendering
def _f(v, fmt: str = ".2f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, fmt)


def _iv(iv: list[float] | None, fmt: str = ".3f") -> str:
    """An interval's ends as a table cell, '-' without one."""
    return f"{_f(iv[0], fmt)} - {_f(iv[1], fmt)}" if iv else "-"


COLUMNS = ("run", "tok/s", "speedup", "tok/step", "accept/slim/full", "slim on", "full/tok", "lenient", "=off", "BLEU",
           "ROUGE-L", "math", "rep-4")


def table_rows(runs: list[dict]) -> list[list[str]]:
    out = []
    for r in runs:
        q = r.get("quality", {})
        t = r.get("tier_rates")
        tiers = "/".join(_f(t[k], ".2f") for k in ("accept", "slim", "full")) if t else "-"
        out.append([
            r["name"], _f(r["tokens_per_s"], ".1f"), _f(r["speedup_vs_off"], ".2f") + ("x" if r["speedup_vs_off"] else ""),
            _f(r["mean_accepted_tokens"]), tiers, _f(r.get("slim_tier_on")), _f(r["full_passes_per_token"]),
            _f(r.get("lenient_share")), _f(q.get("match_off")),
            _f(q.get("bleu"), ".1f"), _f(q.get("rouge_l"), ".1f"), _f(q.get("math_accuracy")), _f(q.get("repetition")),
        ])
    return out


def render_table(runs: list[dict]) -> str:
    """Plain text, columns aligned; one line per run."""
    rows = [list(COLUMNS)] + table_rows(runs)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def describe_cpu(machine: dict) -> str:
    """The CPU's name with its generation and vector extensions where the report recorded them:
    "AMD EPYC (family 26 model 2; avx2 fma avx512f avx512_vnni avx512_bf16)"."""
    extra = [x for x in (machine.get("cpu_generation"), " ".join(machine.get("isa") or [])) if x]
    return f"{machine.get('cpu', '?')}" + (f" ({'; '.join(extra)})" if extra else "")


def describe_git(git: dict | None) -> str:
    """The report's commit line: the commit its rows ran from, and whether the tree had local
    changes then (such results are not reproducible from the commit alone)."""
    if not git or not git.get("commit"):
        return "- commit: not recorded"
    return f"- commit: `{git['commit'][:12]}`" + (" (with local changes)" if git.get("dirty") else "")


def describe_environment(env: dict | None) -> list[str]:
    """The report's environment line, where VIA_SD_* switches were set: none, no line."""
    return [f"- environment: {' '.join(f'`{k}={v}`' for k, v in env.items())}"] if env else []


def render_markdown(report: dict, plots: list[str] | None = None) -> str:
    runs = report["runs"]
    m = report["machine"]
    out = [
        "# via-sd bench",
        "",
        f"- date: {report['date']}",
        f"- machine: {describe_cpu(m)}, {m.get('cores', '?')} cores, {m.get('threads', '?')} threads, "
        f"{_f(m.get('memory_gb'), '.0f')} GiB, {m.get('platform', '')}",
        f"- model: {report['model']}",
        f"- settings: {report['settings']['prompts']} prompts, max {report['settings']['max_tokens']} tokens, "
        f"temperature {report['settings']['temperature']}, batch 1"
        + ("; the engine's rows interleaved prompt by prompt in one process, peers each in its own"
           if report["settings"].get("interleaved") else "; every row in its own process, one after another")
        + ("; our rows' K/V cache in fp16 (lossy)" if report["settings"].get("kv_cache_dtype") == "fp16" else "")
        + {"bfloat16": "; our rows' wide passes (the prompt) in bf16 (lossy)",
           "auto+bfloat16": "; rows named +bf16: their wide passes (the prompt) in bf16 (lossy)"}.get(
               report["settings"].get("prefill_dtype", "auto"), ""),
        f"- command: `{report['command']}`",
        describe_git(report.get("git")),
        *describe_environment(report.get("environment")),
        "",
        "## Overall",
        "",
        _md_table(list(COLUMNS), table_rows(runs)),
    ]
    cats = list(runs[0]["per_category"]) if runs else []
    if cats:
        out += ["", "## Speed-up over `off` per category", ""]
        rows = [[r["name"]] + [_f(r["per_category"].get(c, {}).get("speedup_vs_off")) for c in cats] for r in runs]
        out.append(_md_table(["run"] + cats, rows))
        out += ["", "## Tier rates per category (accept / slim / full)", ""]
        rows = []
        for r in runs:
            if r.get("kind") != "engine" or not r.get("tier_rates"):
                continue
            cells = []
            for c in cats:
                t = r["per_category"].get(c, {}).get("tier_rates")
                cells.append("/".join(_f(t[k]) for k in ("accept", "slim", "full")) if t else "-")
            rows.append([r["name"]] + cells)
        if rows:
            out.append(_md_table(["run"] + cats, rows))
    with_iv = [r for r in runs if r.get("speedup_interval") and r["name"] != "off"]
    pairs = report.get("three_tier_vs_binary") or []
    if with_iv or pairs:
        out += ["", "## Speed-ups with their 95% intervals", "",
                "Over the prompts, by a paired bootstrap (2,000 resamples, fixed seed); what the machine did "
                "between processes is not in them, so a peer's interval is narrower than its truth.", ""]
        if with_iv:
            out.append(_md_table(["run", "vs `off`", "95% interval"],
                                 [[r["name"], _f(r["speedup_vs_off"], ".3f") + "x",
                                   _iv(r["speedup_interval"])]
                                  for r in with_iv]))
        if pairs:
            out += ["", "`three_tier` against `binary`, the same drafter:", ""]
            out.append(_md_table(["runs", "ratio", "95% interval"],
                                 [[f"{p['three_tier']} / {p['binary']}", _f(p["ratio"], ".3f") + "x",
                                   _iv(p["interval"])] for p in pairs]))
    if report.get("skipped"):
        out += ["", "## Skipped", ""] + [f"- `{s['name']}`: {s['reason']}" for s in report["skipped"]]
    if report.get("sweep"):
        sw = report["sweep"]
        out += ["", "## Threshold sweep (three_tier)", ""]
        rows = [[p["name"], _f(p["tokens_per_s"], ".1f"), _f(p.get("speedup_vs_off")),
                 _iv(p.get("speedup_interval"), ".2f"),
                 _f(p.get("mean_accepted_tokens")),
                 _f(p.get("lenient_share")), _f(p["quality"].get("match_off")), _f(p["quality"].get("prefix_agreement")),
                 _f(p["quality"].get("bleu"), ".1f"), _f(p["quality"].get("rouge_l"), ".1f"),
                 _f(p["quality"].get("math_accuracy")), _f(p["quality"].get("repetition")),
                 "yes" if p.get("pareto") else ""] for p in sw["points"]]
        out.append(_md_table(["setting", "tok/s", "speedup", "95% interval", "tok/step", "lenient", "=off", "prefix agreement", "BLEU",
                              "ROUGE-L", "math", "rep-4", "frontier"], rows))
        if sw.get("best"):
            out += ["", f"Best setting (fastest with {sw['quality_key']} >= {sw['min_quality']}): `{sw['best']['name']}` "
                        f"{_f(sw['best']['tokens_per_s'], '.1f')} tok/s"]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"
