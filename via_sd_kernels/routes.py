"""Routes: which sub-layers of the model a forward pass runs.

A route is data, not a model: `attn[i]` / `mlp[i]` say whether layer i's attention / MLP sub-layer
runs (True) or is skipped (the residual stream passes through unchanged). The full model is the
route with everything on; the slim verifier (and the `self` drafter) are routes with some
sub-layers off, over the same weights and KV cache.

Forward order is attn0, mlp0, attn1, mlp1, ...; the sub-layers before the first skipped one
compute exactly what the full model computes, so a full pass that follows a slim pass can resume
from there (`shared_prefix_sublayers`).

Cost is relative to the full model: with per-sub-layer weights `SublayerCosts(attn, mlp, fixed)`
(e.g. parameter bytes, `fixed` for embeddings and head, which always run),

    cost = (fixed + attn * #attn on + mlp * #mlp on) / (fixed + L * (attn + mlp))

Example: L = 4, attn = 1, mlp = 2, fixed = 0, skipping attn 1 and mlp 2 gives (3*1 + 3*2) / 12 =
0.75; its shared prefix is 2 (attn0, mlp0 run; attn1 is the first skipped).

JSON (`to_json`): {"num_layers": 4, "attn": [true, false, true, true], "mlp": [...], "name": ""}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class SublayerCosts:
    attn: float  # cost of one attention sub-layer
    mlp: float  # cost of one MLP sub-layer
    fixed: float = 0.0  # cost paid by every route (embeddings, final norm, LM head)


@dataclass(frozen=True)
class Route:
    num_layers: int
    attn: tuple[bool, ...]  # [L] True = runs
    mlp: tuple[bool, ...]  # [L] True = runs
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn", tuple(bool(x) for x in self.attn))
        object.__setattr__(self, "mlp", tuple(bool(x) for x in self.mlp))
        if self.num_layers < 0 or len(self.attn) != self.num_layers or len(self.mlp) != self.num_layers:
            raise ValueError(
                f"route needs one attn and one mlp flag per layer: num_layers={self.num_layers}, "
                f"len(attn)={len(self.attn)}, len(mlp)={len(self.mlp)}"
            )

    @classmethod
    def full(cls, num_layers: int, name: str = "full") -> "Route":
        return cls(num_layers, (True,) * num_layers, (True,) * num_layers, name)

    @classmethod
    def from_skips(
        cls, num_layers: int, skip_attn: Iterable[int] = (), skip_mlp: Iterable[int] = (), name: str = ""
    ) -> "Route":
        skip_attn, skip_mlp = set(skip_attn), set(skip_mlp)
        for i in skip_attn | skip_mlp:
            if not 0 <= i < num_layers:
                raise ValueError(f"layer {i} out of range for {num_layers} layers")
        attn = tuple(i not in skip_attn for i in range(num_layers))
        mlp = tuple(i not in skip_mlp for i in range(num_layers))
        return cls(num_layers, attn, mlp, name)

    @property
    def skipped_attn(self) -> tuple[int, ...]:
        return tuple(i for i, on in enumerate(self.attn) if not on)

    @property
    def skipped_mlp(self) -> tuple[int, ...]:
        return tuple(i for i, on in enumerate(self.mlp) if not on)

    @property
    def num_skipped(self) -> int:
        """Sub-layers skipped (attention and MLP together)."""
        return len(self.skipped_attn) + len(self.skipped_mlp)

    @property
    def is_full(self) -> bool:
        return self.num_skipped == 0

    def sublayers(self) -> tuple[bool, ...]:
        """Flags in forward order: attn0, mlp0, attn1, mlp1, ..."""
        return tuple(flag for pair in zip(self.attn, self.mlp) for flag in pair)

    def shared_prefix_sublayers(self) -> int:
        """Sub-layers, in forward order, that run before the first skipped one (2L if none)."""
        flags = self.sublayers()
        return next((i for i, on in enumerate(flags) if not on), len(flags))

    def cost(self, costs: SublayerCosts) -> float:
        """Cost relative to the full model (full = 1.0)."""
        total = costs.fixed + self.num_layers * (costs.attn + costs.mlp)
        if total <= 0:
            raise ValueError(f"costs must give the full model a positive cost, got {costs}")
        on = costs.fixed + costs.attn * sum(self.attn) + costs.mlp * sum(self.mlp)
        return on / total

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "attn": list(self.attn), "mlp": list(self.mlp), "name": self.name}

    @classmethod
    def from_dict(cls, data: dict) -> "Route":
        return cls(int(data["num_layers"]), tuple(data["attn"]), tuple(data["mlp"]), str(data.get("name", "")))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Route":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Route":
        return cls.from_json(Path(path).read_text())

    def __str__(self) -> str:
        label = f"{self.name}: " if self.name else ""
        return f"{label}skip attn {list(self.skipped_attn)} mlp {list(self.skipped_mlp)} of {self.num_layers} layers"
