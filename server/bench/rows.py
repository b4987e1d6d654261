"""Benchmark rows: which engine modes, drafters and peers run, and their names.

Names (DESIGN.md section 4): `off`; `binary` and `three_tier` with the engine's default drafter,
`<mode>_<drafter>` with another (`three_tier_head`); peers `hf`, `hf_pld`, `vllm`, `vllm_ngram`,
`vllm_three_tier` (our vLLM plugin, server/vllm_plugin, on vLLM's engine, with the same n-gram
drafts as `vllm_ngram` and the slim tier's skip schedule), and `llamacpp`, `llamacpp_pld`:
llama.cpp (through llama-cpp-python) on the model's GGUF file, plain and with its prompt-lookup
drafts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from server.engine.config import DRAFTERS, SPEC_MODES, SpecConfig

PEERS = ("hf", "hf_pld", "vllm", "vllm_ngram", "vllm_three_tier", "llamacpp", "llamacpp_pld")
# Prompt lookup as Hugging Face documents it; 10 candidate tokens is its suggested setting.
HF_PLD_TOKENS = 10
VLLM_NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}
# llama-cpp-python's prompt-lookup drafter (`LlamaPromptLookupDecoding`) at its defaults
LLAMACPP_PLD = {"num_pred_tokens": 10, "max_ngram_size": 2}


class RowError(ValueError):
    """A bad --modes/--drafters/--peers value; the message says what is accepted."""


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # "engine" | "hf" | "vllm" | "llamacpp"
    mode: str | None = None  # engine rows: off | binary | three_tier
    drafter: str | None = None
    params: dict = field(default_factory=dict)  # SpecConfig overrides (sweep points)
    prompt_lookup_num_tokens: int | None = None
    speculative_config: dict | None = None
    vllm_kwargs: dict | None = None  # more keyword arguments of vLLM's LLM (the plugin's worker)
    prompt_lookup: dict | None = None  # llama.cpp rows: LlamaPromptLookupDecoding's arguments
    engine: dict = field(default_factory=dict)  # EngineConfig overrides of an engine row (prefill_dtype)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}

    @property
    def drafts(self) -> bool:
        """Whether this row speculates at all."""
        if self.kind == "engine":
            return self.mode != "off"
        return bool(self.prompt_lookup_num_tokens or self.speculative_config or self.prompt_lookup)


def parse_list(value: str | None, allowed: tuple[str, ...], flag: str) -> list[str]:
    if value is None:
        return []
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise RowError(f"{flag}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def engine_row_name(mode: str, drafter: str | None, default_drafter: str | None = None) -> str:
    """`binary`, `three_tier_head`, ...: rows with n-gram drafts keep the short names they had in
    every earlier report (when n-gram was the engine's default), whatever the default is now."""
    default_drafter = default_drafter or "ngram"
    if mode == "off" or drafter in (None, default_drafter):
        return mode
    return f"{mode}_{drafter}"


def vllm_plugin_kwargs() -> dict:
    """What `server.vllm_plugin.backend.engine_kwargs` adds for `three_tier` on the CPU: the
    plugin's worker and its settings (the engine's defaults)."""
    spec = SpecConfig()
    return {
        "worker_cls": "server.vllm_plugin.worker.ViaSDCPUWorker",
        "enable_prefix_caching": False,
        "additional_config": {"via_sd": {
            "mode": "three_tier", "schedule": "skip", "accept_threshold": spec.accept_threshold,
            "escalate_threshold": spec.escalate_threshold, "bonus_confidence": spec.bonus_confidence,
            "slim_confidence": spec.slim_confidence, "max_slim_backlog": spec.max_slim_backlog}},
    }


# suffix of the engine rows that run with `--prefill-dtype bfloat16` beside the default ones
BF16_PREFILL = "+bf16"


def with_prefill_dtypes(rows: list[Row], dtypes: list[str]) -> list[Row]:
    """`--prefill-dtype auto,bfloat16`: every engine row also as `<name>+bf16`, right after the
    engine rows (the peers keep their own arithmetic). One value: the rows as they are (the job
    carries it)."""
    if len(dtypes) < 2:
        return rows
    engine = [r for r in rows if r.kind == "engine"]
    return _after_engine_rows(rows, [replace(r, name=r.name + BF16_PREFILL,
                                             engine={**r.engine, "prefill_dtype": "bfloat16"}) for r in engine])


def _after_engine_rows(rows: list[Row], extra: list[Row]) -> list[Row]:
    """`rows` with `extra` placed after the engine rows, before the peers."""
    return [r for r in rows if r.kind == "engine"] + extra + [r for r in rows if r.kind != "engine"]


# drafters whose rows read the draft head, and so run once per `--draft-head` given
HEAD_DRAFTERS = ("head", "hybrid")


def head_labels(paths: list[str]) -> list[str]:
    """A short, distinct name per head file: its name less `.safetensors` (and `.head`), numbered
    where two read alike."""
    labels: list[str] = []
    for i, path in enumerate(paths):
        name = Path(path).name.removesuffix(".safetensors").removesuffix(".head") or f"head{i}"
        labels.append(name if name not in labels else f"{name}{i}")
    return labels


def with_draft_heads(rows: list[Row], heads: list[str]) -> list[Row]:
    """`--draft-head A,B,...`: the rows of the drafters that read a head (`HEAD_DRAFTERS`) draft
    with A (the job carries it); each further head adds those rows again as `<name>@<label>`, right
    after the engine rows, so that two heads are compared in one run on the same prompts."""
    if len(heads) < 2:
        return rows
    return _after_engine_rows(rows, [replace(r, name=f"{r.name}@{label}", params={**r.params, "head_path": path})
                                     for path, label in zip(heads[1:], head_labels(heads)[1:])
                                     for r in rows if r.kind == "engine" and r.drafter in HEAD_DRAFTERS])


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
        elif p == "vllm_three_tier":
            rows.append(Row("vllm_three_tier", "vllm", speculative_config=dict(VLLM_NGRAM),
                            vllm_kwargs=vllm_plugin_kwargs()))
        elif p == "llamacpp":
            rows.append(Row("llamacpp", "llamacpp"))
        elif p == "llamacpp_pld":
            rows.append(Row("llamacpp_pld", "llamacpp", prompt_lookup=dict(LLAMACPP_PLD)))
        else:
            raise RowError(f"--peers: unknown {p}; choose from {', '.join(PEERS)}")
    return rows
