"""The full model's threshold (`full_accept_threshold`, θ): where the full model decides a draft
token d of a `three_tier` request, d is kept when q(d) >= θ max q at temperature 1, that is
logit(d) >= max logit + log θ. θ = 1 is the exact rule. The embedded engine
(server/engine/spec_step.py) and the vLLM plugin (server/vllm_plugin/runner.py) both decide with
these functions and then make each kept row one-hot at its draft before verification, so the
verification code keeps it, greedy or sampled, and decides every other row as before.

The repetition guard: a kept draft that is not the full model's argmax is refused where it would
complete an n-gram the output already holds (a lookup draft copying the output's own earlier
text, kept by a near tie, is how the rule makes outputs loop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def log_threshold(theta: float) -> float:
    """log θ, -inf for θ = 0 (every draft kept)."""
    return math.log(theta) if theta > 0 else -math.inf


def repeats(tokens: Sequence[int], d: int, n: int) -> bool:
    """Whether `tokens` + [d] ends with an n-gram that already occurs in `tokens`."""
    if len(tokens) < n:
        return False
    tail = tuple(tokens[len(tokens) - n + 1:]) + (d,)
    return any(tuple(tokens[i:i + n]) == tail for i in range(len(tokens) - n + 1))


def keep(logits: torch.Tensor, ids: torch.Tensor, log_theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` [R, V] the full model's rows at R draft positions, `ids` [R] their draft tokens,
    `log_theta` [R] each row's log θ. Returns (kept, forced) [R] bool: kept by the rule, and kept
    though d is not the row's argmax (the tokens the rule changes for a greedy request). A token
    the logits rule out (-inf: a grammar's mask, a ban) is never kept."""
    sub = logits.float()
    best, am = sub.max(-1)
    own = sub.gather(1, ids.long()[:, None]).squeeze(1)
    kept = (own >= best + log_theta.to(sub.device)) & torch.isfinite(own)
    return kept, kept & (am != ids.long())


def guard(forced: list[bool], seqs: Sequence[tuple[Sequence[int], Sequence[int]]], n: int) -> list[int]:
    """Positions of `forced` (the rows of `seqs`' drafts, in order) the repetition guard refuses:
    `seqs` gives each sequence's (output so far, drafts); a forced draft j of a sequence is refused
    where output + drafts[:j] + [d_j] ends with an n-gram the output + drafts[:j] already holds."""
    if n <= 0:
        return []
    blocked, i = [], 0
    for out, drafts in seqs:
        if any(forced[i:i + len(drafts)]):
            out = list(out)
            blocked += [i + j for j, d in enumerate(drafts) if forced[i + j] and repeats(out + list(drafts[:j]), d, n)]
        i += len(drafts)
    return blocked


def force(target: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, kept: torch.Tensor, *, off: float,
          on: float) -> torch.Tensor:
    """`target` with each kept row (`rows[kept]`) set to `off` everywhere but `on` at its draft
    (`ids[kept]`): a copy, or `target` itself when nothing is kept. Probabilities and argmax-read
    logits take (0, 1); logits a softmax will read take (-inf, 0)."""
    if not bool(kept.any()):
        return target
    out = target.clone()
    r, d = rows[kept], ids[kept]
    out[r] = off
    out[r, d] = on
    return out
