"""Quality of one run's outputs: agreement with `off`, and task metrics against references.

- `match_off`: share of outputs whose token ids equal the `off` row's for the same prompt
  (greedy `binary` must score 1.0; lossy `three_tier` less).
- `prefix_agreement`: mean over prompts of (common-prefix length with `off`) / (length of `off`'s
  output); smoother than `match_off` when a lossy step changes one token late.
- `bleu`: sacreBLEU corpus BLEU (default 13a tokenization) on `translation`, 0-100.
- `rouge_l`: mean ROUGE-L F1 on `summarization`, 0-100, on lower-cased alphanumeric tokens
  (the `rouge-score` package's tokenization, without stemming).
- `math_accuracy`: share of `math_reasoning` outputs whose final number equals the reference's
  (GSM8K references end in `#### N`; otherwise the reference's last number).
- `repetition`: mean over outputs of the share of token 4-grams that repeat an earlier 4-gram of
  the same output (seq-rep-4, Welleck et al. 2019); needs no reference, and shows the loops a
  lossy setting can fall into.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUM = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_TOKEN = re.compile(r"[a-z0-9]+")


# ------------------------------------------------------------------ ROUGE-L
def rouge_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1]. Example: hyp "the cat sat", ref "the cat sat down": LCS 3,
    precision 3/3, recall 3/4, F1 = 2 * 1 * 0.75 / 1.75 = 0.857."""
    h, r = rouge_tokens(hypothesis), rouge_tokens(reference)
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 2 * p * rec / (p + rec)


def rouge_l(hypotheses: list[str], references: list[list[str]]) -> float:
    """Mean ROUGE-L F1 (best over each prompt's references), 0-100."""
    if not hypotheses:
        return float("nan")
    scores = [max(rouge_l_f1(h, r) for r in refs) for h, refs in zip(hypotheses, references)]
    return 100.0 * sum(scores) / len(scores)


# ------------------------------------------------------------------ BLEU
def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """sacreBLEU corpus BLEU, 0-100. Only each prompt's first reference is used (Spec-Bench's
    translation rows have one)."""
    import sacrebleu

    if not hypotheses:
        return float("nan")
    # sacreBLEU wants one stream per reference set; a model's answer is one line
    hyps = [" ".join(h.split()) for h in hypotheses]
    refs = [" ".join(r[0].split()) for r in references]
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


# ------------------------------------------------------------------ final numbers
def extract_final_number(text: str) -> float | None:
    """The answer number of a math solution: after the last `####` if there is one, else the
    last number in the text; `$`, thousands separators and a trailing period are ignored.
    "so 600+400=$1,000." -> 1000.0; "no number" -> None."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = _NUM.findall(tail)
        if m:
            return _to_float(m[0])
    m = _NUM.findall(text)
    return _to_float(m[-1]) if m else None


def _to_float(s: str) -> float | None:
    s = s.replace("$", "").replace(",", "")
    try:
        return float(s)
    except ValueError:
        return None


def same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def math_accuracy(hypotheses: list[str], references: list[list[str]]) -> float:
    if not hypotheses:
        return float("nan")
    ok = sum(same_number(extract_final_number(h), extract_final_number(r[0])) for h, r in zip(hypotheses, references))
    return ok / len(hypotheses)


# ------------------------------------------------------------------ repetition
def repeated_ngrams(ids: Sequence, n: int = 4) -> float:
    """1 - distinct n-grams / n-grams of one output (0 when it has no n-gram)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repetition(outputs: list[Sequence], n: int = 4) -> float:
    return sum(repeated_ngrams(o, n) for o in outputs) / len(outputs) if outputs else float("nan")


# ------------------------------------------------------------------ agreement with off
def common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(outputs: list[list[int]], off_outputs: list[list[int]]) -> dict[str, float]:
    """`match_off` and `prefix_agreement` of token-id outputs against `off`'s, prompt by prompt."""
    if not outputs:
        return {"match_off": float("nan"), "prefix_agreement": float("nan")}
    same = sum(a == b for a, b in zip(outputs, off_outputs))
    pref = [common_prefix(a, b) / max(1, len(b)) if a != b else 1.0 for a, b in zip(outputs, off_outputs)]
    return {"match_off": same / len(outputs), "prefix_agreement": sum(pref) / len(pref)}


# ------------------------------------------------------------------ one run
TASK_METRICS = {"translation": ("bleu", bleu), "summarization": ("rouge_l", rouge_l),
                "math_reasoning": ("math_accuracy", math_accuracy)}


def score(items: list[dict], off_by_id: dict | None) -> dict:
    """Quality of `items` (dicts with `question_id`, `category`, `token_ids`, `text`,
    `references`). `off_by_id` maps question id to `off`'s token ids, or is None when there is
    no `off` row. Task metrics are present only when their category has references."""
    q: dict = {"n": len(items), "repetition": repetition([it["token_ids"] for it in items])}
    if off_by_id is not None:
        pairs = [(it["token_ids"], off_by_id[it["question_id"]]) for it in items if it["question_id"] in off_by_id]
        q.update(agreement([a for a, _ in pairs], [b for _, b in pairs]))
    for cat, (key, fn) in TASK_METRICS.items():
        rows = [it for it in items if it["category"] == cat and it.get("references")]
        if rows:
            try:
                q[key] = fn([it["text"] for it in rows], [list(it["references"]) for it in rows])
            except ImportError:  # sacrebleu is in the `bench` extra; without it BLEU is left out
                q[key] = None
    return q
