"""The plugin's settings: engine-wide ones from `vllm_config.additional_config["via_sd"]`,
per-request ones from `SamplingParams.extra_args["via_sd"]`.

Both reach every worker process through vLLM's own config and request plumbing, so nothing is
passed through globals or environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# The plugin's schedule variants (see server/vllm_plugin/runner.py):
#   "prune":   the slim pass runs under vLLM's own verification step and only gates; vLLM's full
#              forward runs every step and verifies every token (output exact, no pass saved).
#   "skip":    sequences of a (greedy, pure-decode) batch whose gate needs no full pass emit the
#              slim verifier's tokens; vLLM's full forward runs only over the sequences that
#              escalate (a sub-batch with its own attention metadata; `sub_batch=False`: only
#              when none escalates, else over the whole batch). A sequence's next full pass first
#              rewrites the skipped layers' K/V (backfill). Lossy, as VIA-SD is.
SCHEDULES = ("prune", "skip")


@dataclass(frozen=True)
class PluginSettings:
    mode: str = "three_tier"  # "binary" (no slim pass) | "three_tier"
    schedule: str = "skip"
    accept_threshold: float = 0.7
    escalate_threshold: float = 0.5
    bonus_confidence: float = 0.9
    slim_confidence: float = 0.7  # positions where max q' is below this escalate (README: design changes)
    max_slim_backlog: int = 32
    sub_batch: bool = True  # "skip": full forward over the escalating sub-batch only
    # where the full model decides a draft token of a three_tier request, keep it when
    # q(d) >= θ max q (via_sd_kernels/lenient.py); 1 = the exact rule (vLLM's rejection sampler)
    full_accept_threshold: float = 1.0
    lenient_no_repeat: int = 4  # the rule's repetition guard (n-gram length; 0 = off)
    slim_route: Any = None  # path to a route JSON, an inline dict, or None (default route)

    @classmethod
    def from_dict(cls, d: dict | None) -> "PluginSettings":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown via_sd plugin settings {unknown}; known: {sorted(names)}")
        s = cls(**d)
        if s.mode not in ("binary", "three_tier"):
            raise ValueError(f"via_sd plugin mode must be 'binary' or 'three_tier', got {s.mode!r}")
        if not 0.0 <= s.full_accept_threshold <= 1.0:
            raise ValueError(f"via_sd plugin full_accept_threshold must be in [0, 1], got {s.full_accept_threshold}")
        if s.schedule not in SCHEDULES:
            raise ValueError(f"via_sd plugin schedule must be one of {SCHEDULES}, got {s.schedule!r}")
        return s


@dataclass(frozen=True)
class RequestSettings:
    """What one request asks for (`extra_args["via_sd"]`), resolved against the engine's."""

    mode: str
    accept_threshold: float
    escalate_threshold: float
    bonus_confidence: float
    num_draft_tokens: int | None
    full_accept_threshold: float = 1.0

    @classmethod
    def resolve(cls, engine: PluginSettings, extra_args: dict | None) -> "RequestSettings":
        r = (extra_args or {}).get("via_sd") or {}
        return cls(
            mode=r.get("mode") or engine.mode,
            accept_threshold=engine.accept_threshold if r.get("accept_threshold") is None else float(r["accept_threshold"]),
            escalate_threshold=engine.escalate_threshold if r.get("escalate_threshold") is None else float(r["escalate_threshold"]),
            bonus_confidence=engine.bonus_confidence,
            num_draft_tokens=r.get("num_draft_tokens"),
            full_accept_threshold=(engine.full_accept_threshold if r.get("full_accept_threshold") is None
                                   else float(r["full_accept_threshold"])),
        )

    @property
    def lenient(self) -> bool:
        """The full model keeps near-ties of this request's drafts (three_tier, θ < 1)."""
        return self.mode == "three_tier" and self.full_accept_threshold < 1.0

    @property
    def slim(self) -> bool:
        return self.mode == "three_tier"
