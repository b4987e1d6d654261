"""Slim routes for the vLLM worker: which sub-layers (attention, MLP of each decoder layer) the
slim verifier runs.

A route is data, not a subclass (STYLE.md habit 2): `attn[i]` / `mlp[i]` say whether layer i's
attention / MLP sub-layer runs, the same convention as the embedded engine's routes. JSON forms
accepted by `SlimRoute.from_json`:

    {"attn": [true, ...], "mlp": [true, ...]}         one flag per layer
    {"num_layers": 30, "skip": ["attn.14", "mlp.15"]}  the sub-layers to skip

The default route (no route file) skips 8 sub-layers in the upper middle of the network, keeping
the first and last layers: a hand-picked starting point, to be replaced by `via-sd calibrate`'s
searched routes. Skipping late sub-layers keeps the shared prefix of the slim and full routes long.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SlimRoute:
    attn: tuple[bool, ...]
    mlp: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.attn) != len(self.mlp):
            raise ValueError(f"a route needs one attn and one mlp flag per layer, got {len(self.attn)} and {len(self.mlp)}")

    @property
    def num_layers(self) -> int:
        return len(self.attn)

    @property
    def num_skipped(self) -> int:
        return sum(not a for a in self.attn) + sum(not m for m in self.mlp)

    @property
    def cost(self) -> float:
        """Share of the sub-layers the route runs (a crude cost model: attention and MLP alike)."""
        n = 2 * self.num_layers
        return (n - self.num_skipped) / n if n else 1.0

    @classmethod
    def full(cls, num_layers: int) -> "SlimRoute":
        return cls((True,) * num_layers, (True,) * num_layers)

    @classmethod
    def skipping(cls, num_layers: int, skip: list[str] | tuple[str, ...]) -> "SlimRoute":
        attn, mlp = [True] * num_layers, [True] * num_layers
        for name in skip:
            kind, _, idx = name.partition(".")
            i = int(idx)
            if kind not in ("attn", "mlp") or not 0 <= i < num_layers:
                raise ValueError(f"bad sub-layer name {name!r}: use 'attn.I' or 'mlp.I' with 0 <= I < {num_layers}")
            (attn if kind == "attn" else mlp)[i] = False
        return cls(tuple(attn), tuple(mlp))

    @classmethod
    def default(cls, num_layers: int) -> "SlimRoute":
        if num_layers < 8:
            # tiny test models: skip one MLP in the middle
            return cls.skipping(num_layers, [f"mlp.{num_layers // 2}"])
        a = num_layers // 2 - 1
        skip = [f"attn.{a + 3 * k}" for k in range(4)] + [f"mlp.{a + 1 + 3 * k}" for k in range(4)]
        return cls.skipping(num_layers, [s for s in skip if int(s.split(".")[1]) < num_layers - 1])

    @classmethod
    def from_obj(cls, obj: dict, num_layers: int) -> "SlimRoute":
        if "attn" in obj and "mlp" in obj:
            route = cls(tuple(bool(x) for x in obj["attn"]), tuple(bool(x) for x in obj["mlp"]))
        elif "skip" in obj:
            route = cls.skipping(int(obj.get("num_layers", num_layers)), list(obj["skip"]))
        else:
            raise ValueError("a route JSON needs 'attn' and 'mlp' lists, or a 'skip' list")
        if route.num_layers != num_layers:
            raise ValueError(f"the route has {route.num_layers} layers, the model {num_layers}")
        return route

    @classmethod
    def from_json(cls, path: str | Path, num_layers: int) -> "SlimRoute":
        return cls.from_obj(json.loads(Path(path).read_text()), num_layers)

    def to_obj(self) -> dict:
        return {"attn": list(self.attn), "mlp": list(self.mlp)}


def resolve_route(spec: str | dict | None, num_layers: int) -> SlimRoute:
    """A route from a JSON path, an inline dict, or None (the default route)."""
    if spec is None:
        return SlimRoute.default(num_layers)
    if isinstance(spec, dict):
        return SlimRoute.from_obj(spec, num_layers)
    return SlimRoute.from_json(spec, num_layers)
