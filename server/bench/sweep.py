"""The three_tier settings sweep: a grid over accept_threshold, escalate_threshold,
bonus_confidence, gamma (num_draft_tokens), slim_confidence and the controller; one row per point;
the speed-quality frontier.

With the controller on (the default) the slim tier runs only where it measures that it pays, so
the thresholds act on a few steps; `controller=0` runs it at every step, which is where the
thresholds show what the lossy tiers trade.

A point is named by the settings it changes from the engine defaults, e.g. `three_tier[a=0.8,g=3]`.
Quality is agreement with `off` (`prefix_agreement` by default, or `match_off`), since the lossy
tiers are what the thresholds trade against speed. The best setting is the fastest point whose
quality reaches a floor.
"""

from __future__ import annotations

from server.bench.rows import Row, RowError, engine_row_name
from server.engine.config import SpecConfig

# sweep keys: SpecConfig field -> short name
SWEEP_KEYS = {"accept_threshold": "a", "escalate_threshold": "e", "bonus_confidence": "b", "num_draft_tokens": "g",
              "slim_confidence": "c", "controller": "ctl", "full_accept_threshold": "f", "lenient_no_repeat": "r"}
SWEEP_ALIASES = {"gamma": "num_draft_tokens", "g": "num_draft_tokens", "a": "accept_threshold",
                 "e": "escalate_threshold", "b": "bonus_confidence", "c": "slim_confidence", "ctl": "controller",
                 "f": "full_accept_threshold", "r": "lenient_no_repeat"}

# `--sweep` alone: the slim tier at every drafted step (the controller off, escalation low), so
# that the thresholds act, and each threshold and γ varied from there one at a time
DEFAULT_SWEEP = {
    "controller": [False],
    "escalate_threshold": [0.2],
    "accept_threshold": [0.3, 0.5, 0.7, 0.9],
    "slim_confidence": [0.3, 0.5, 0.7, 0.9],
    "bonus_confidence": [0.8, 0.9, 0.97],
    "num_draft_tokens": [3, 5, 8],
}


def parse_sweep(spec: str | None) -> dict[str, list[float]]:
    """`"accept_threshold=0.6,0.8;gamma=3,5"` -> {"accept_threshold": [0.6, 0.8], "num_draft_tokens": [3, 5]}.
    `controller` takes 0 and 1 (False, True). An empty or `default` spec gives DEFAULT_SWEEP."""
    if spec is None or spec.strip() in ("", "default"):
        return {k: list(v) for k, v in DEFAULT_SWEEP.items()}
    out: dict[str, list[float]] = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise RowError(f"--sweep: expected KEY=V1,V2 parts separated by ';', got {part!r}")
        key, vals = part.split("=", 1)
        key = SWEEP_ALIASES.get(key.strip(), key.strip())
        if key not in SWEEP_KEYS:
            raise RowError(f"--sweep: unknown key {key!r}; choose from {', '.join(SWEEP_KEYS)} (or gamma)")
        try:
            nums = [float(v) for v in vals.split(",") if v.strip()]
        except ValueError as e:
            raise RowError(f"--sweep: {key} values must be numbers, got {vals!r}") from e
        if not nums:
            raise RowError(f"--sweep: {key} has no values")
        if key == "controller":
            if any(v not in (0, 1) for v in nums):
                raise RowError(f"--sweep: controller takes 0 or 1, got {vals!r}")
            nums = [bool(v) for v in nums]
        elif key in ("num_draft_tokens", "lenient_no_repeat"):
            nums = [int(v) for v in nums]
        out[key] = nums
    return out


def sweep_points(grid: dict[str, list[float]], mode: str = "full") -> list[dict]:
    """Settings to run. `one_at_a_time`: a key given one value holds it for every point, and each
    other key runs across its values with the rest at those settings or the engine defaults (few
    points); `full`: the cartesian product. Points where escalate > accept are dropped (the engine
    rejects them)."""
    import itertools

    base = SpecConfig()
    defaults = {k: getattr(base, k) for k in SWEEP_KEYS}
    points: list[dict] = []
    if mode == "one_at_a_time":
        given = {k: vals[0] for k, vals in grid.items() if len(vals) == 1 and vals[0] != defaults[k]}
        start = {**defaults, **given}
        points.append(dict(given))
        for k, vals in grid.items():
            if len(vals) == 1:
                continue
            for v in vals:
                if v != start[k]:
                    points.append({**given, k: v})
    else:
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            points.append({k: v for k, v in zip(keys, combo) if v != defaults[k]})
    seen, out = set(), []
    for p in points:
        full = {**defaults, **p}
        if full["escalate_threshold"] > full["accept_threshold"]:
            continue
        key = tuple(sorted(p.items()))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def sweep_row(point: dict, drafter: str | None = None) -> Row:
    label = ",".join(f"{SWEEP_KEYS[k]}={v:g}" for k, v in sorted(point.items(), key=lambda kv: list(SWEEP_KEYS).index(kv[0])))
    base = engine_row_name("three_tier", drafter)
    return Row(f"{base}[{label}]" if label else base, "engine", mode="three_tier", drafter=drafter, params=dict(point))


def pareto(points: list[dict], key: str) -> None:
    """Mark points that no other point beats on both tokens/s and quality."""
    for p in points:
        q = p["quality"].get(key)
        p["pareto"] = q is not None and not any(
            o is not p and o["quality"].get(key) is not None and o["tokens_per_s"] >= p["tokens_per_s"]
            and o["quality"][key] >= q and (o["tokens_per_s"] > p["tokens_per_s"] or o["quality"][key] > q)
            for o in points)


def best_setting(points: list[dict], key: str, min_quality: float) -> dict | None:
    """The fastest point whose quality `key` is at least `min_quality`, or None."""
    ok = [p for p in points if (p["quality"].get(key) or 0) >= min_quality]
    return max(ok, key=lambda p: p["tokens_per_s"]) if ok else None
