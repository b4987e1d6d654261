"""Spec-Bench prompts: read `question.jsonl`, select categories, keep the first turn.

Spec-Bench reports its eight MT-Bench categories (writing, roleplay, ...) as one task,
"multi-turn conversation"; asking for the category `mt_bench` selects them under that one label,
so that the six Spec-Bench tasks are `mt_bench, translation, summarization, qa, math_reasoning, rag`.
A raw MT-Bench category name (e.g. `writing`) selects only that category under its own name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SPEC_BENCH_TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
# Where a checkout finds Spec-Bench: `shared/data/spec_bench/` beside the repository (DESIGN.md);
# the benchmark scripts and the tests read it from here, `via-sd bench` takes `--prompts`.
SPEC_BENCH_FILE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "spec_bench" / "question.jsonl"


class PromptFileError(ValueError):
    """The prompt file or the category selection cannot be used; the message says what to change."""


@dataclass(frozen=True)
class BenchPrompt:
    question_id: int | str
    category: str  # the label results are grouped by (`mt_bench` for the MT-Bench group)
    text: str  # the first user turn
    references: tuple[str, ...] = ()


def read_questions(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"prompt file {str(p)!r} does not exist; pass a Spec-Bench question.jsonl")
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{p}:{lineno}: not JSON ({e.msg})") from e
            if not isinstance(q, dict) or not isinstance(q.get("turns"), list) or not q["turns"]:
                raise PromptFileError(f"{p}:{lineno}: expected an object with a non-empty `turns` list")
            if not isinstance(q.get("category"), str):
                raise PromptFileError(f"{p}:{lineno}: expected a string `category`")
            rows.append(q)
    if not rows:
        raise PromptFileError(f"prompt file {str(p)!r} has no questions")
    return rows


def _label(category: str, wanted: list[str] | None) -> str | None:
    """The label a question of `category` is reported under, or None if not selected."""
    if wanted is None:
        return "mt_bench" if category in MT_BENCH else category
    if category in wanted:
        return category
    if category in MT_BENCH and "mt_bench" in wanted:
        return "mt_bench"
    return None


def select_prompts(questions: list[dict], categories: list[str] | None = None,
                   limit_per_category: int | None = None) -> list[BenchPrompt]:
    """The first turn of each selected question, in file order, at most `limit_per_category`
    per label. Raises PromptFileError naming unknown categories."""
    present = {q["category"] for q in questions}
    if categories is not None:
        known = present | ({"mt_bench"} if present & set(MT_BENCH) else set())
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise PromptFileError(f"unknown categories {', '.join(unknown)}; the file has {', '.join(sorted(known))}")
    counts: dict[str, int] = {}
    out = []
    for i, q in enumerate(questions):
        label = _label(q["category"], categories)
        if label is None:
            continue
        if limit_per_category is not None and counts.get(label, 0) >= limit_per_category:
            continue
        counts[label] = counts.get(label, 0) + 1
        refs = q.get("reference") or ()
        if isinstance(refs, str):
            refs = (refs,)
        out.append(BenchPrompt(q.get("question_id", i), label, str(q["turns"][0]), tuple(str(r) for r in refs)))
    return out


def interleave_categories(prompts: list[BenchPrompt]) -> list[BenchPrompt]:
    """Round robin over the categories, each in file order: a load run that sends the first N
    prompts then samples every task, not only the file's first (mt_bench's 80 questions)."""
    by_cat: dict[str, list[BenchPrompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    groups = list(by_cat.values())
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def categories_in_order(prompts: list[BenchPrompt]) -> list[str]:
    seen: list[str] = []
    for p in prompts:
        if p.category not in seen:
            seen.append(p.category)
    return seen
