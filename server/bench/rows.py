"""Benchmark rows: which engine modes, drafters and peers run, and their names.

Names (DESIGN.md section 4): `off`; `binary` and `three_tier` with the engine's default drafter,
`<mode>_<drafter>` with another (`three_tier_head`); peers `hf`, `hf_pld`, `vllm`, `vllm_ngram`.
A sweep point of `three_tier` is named by the settings it changes, e.g. `three_tier[a=0.8,g=3]`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from server.engine.config import DRAFTERS, SPEC_MODES, SpecConfig

PEERS = ("hf", "hf_pld", "vllm", "vllm_ngram")
# Prompt lookup as Hugging Face documents it; 10 candidate tokens is its suggested setting.
HF_PLD_TOKENS = 10
VLLM_NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}
# sweep keys: short name, SpecConfig field
SWEEP_KEYS = {"accept_threshold": "a", "escalate_threshold": "e", "bonus_confidence": "b", "num_draft_tokens": "g"}
SWEEP_ALIASES = {"gamma": "num_draft_tokens", "g": "num_draft_tokens", "a": "accept_threshold",
                 "e": "escalate_threshold", "b": "bonus_confidence"}


class RowError(ValueError):
    """A bad --modes/--drafters/--peers value; the message says what is accepted."""


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # "engine" | "hf" | "vllm"
    mode: str | None = None  # engine rows: off | binary | three_tier
    drafter: str | None = None
    params: dict = field(default_factory=dict)  # SpecConfig overrides (sweep points)
    prompt_lookup_num_tokens: int | None = None
    speculative_config: dict | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}

    @property
    def drafts(self) -> bool:
        """Whether this row speculates at all."""
        if self.kind == "engine":
            return self.mode != "off"
        return bool(self.prompt_lookup_num_tokens or self.speculative_config)


def parse_list(value: str | None, allowed: tuple[str, ...], flag: str) -> list[str]:
    if value is None:
        return []
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise RowError(f"{flag}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def engine_row_name(mode: str, drafter: str | None, default_drafter: str | None = None) -> str:
    default_drafter = default_drafter or SpecConfig().drafter
    if mode == "off" or drafter in (None, default_drafter):
        return mode
    return f"{mode}_{drafter}"


def build_rows(modes: list[str], drafters: list[str], peers: list[str], *,
               pld_tokens: int = HF_PLD_TOKENS) -> list[Row]:
    """`off` first when asked for (the others are compared with it), then speculative modes times
    drafters, then peers."""
    for m in modes:
        if m not in SPEC_MODES:
            raise RowError(f"--modes: unknown {m}; choose from {', '.join(SPEC_MODES)}")
    for d in drafters:
        if d not in DRAFTERS:
            raise RowError(f"--drafters: unknown {d}; choose from {', '.join(DRAFTERS)}")
    drafters = drafters or [SpecConfig().drafter]
    rows: list[Row] = []
    if "off" in modes:
        rows.append(Row("off", "engine", mode="off"))
    for m in modes:
        if m == "off":
            continue
        for d in drafters:
            rows.append(Row(engine_row_name(m, d), "engine", mode=m, drafter=d))
    for p in peers:
        if p == "hf":
            rows.append(Row("hf", "hf"))
        elif p == "hf_pld":
            rows.append(Row("hf_pld", "hf", prompt_lookup_num_tokens=pld_tokens))
        elif p == "vllm":
            rows.append(Row("vllm", "vllm"))
        elif p == "vllm_ngram":
            rows.append(Row("vllm_ngram", "vllm", speculative_config=dict(VLLM_NGRAM)))
        else:
            raise RowError(f"--peers: unknown {p}; choose from {', '.join(PEERS)}")
    return rows


# ------------------------------------------------------------------ sweep
DEFAULT_SWEEP = {
    "accept_threshold": [0.5, 0.6, 0.7, 0.8, 0.9],
    "escalate_threshold": [0.2, 0.35, 0.5],
    "bonus_confidence": [0.8, 0.9, 0.97],
    "num_draft_tokens": [3, 5, 8],
}


def parse_sweep(spec: str | None) -> dict[str, list[float]]:
    """`"accept_threshold=0.6,0.8;gamma=3,5"` -> {"accept_threshold": [0.6, 0.8], "num_draft_tokens": [3, 5]}.
    An empty or `default` spec gives DEFAULT_SWEEP."""
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
        out[key] = [int(v) for v in nums] if key == "num_draft_tokens" else nums
    return out


def sweep_points(grid: dict[str, list[float]], mode: str = "full") -> list[dict]:
    """Settings to run. `one_at_a_time`: each key across its values with the others at the engine
    defaults (few points); `full`: the cartesian product. Points where escalate > accept are
    dropped (the engine rejects them)."""
    import itertools

    base = SpecConfig()
    defaults = {k: getattr(base, k) for k in SWEEP_KEYS}
    points: list[dict] = []
    if mode == "one_at_a_time":
        points.append({})
        for k, vals in grid.items():
            for v in vals:
                if v != defaults[k]:
                    points.append({k: v})
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
