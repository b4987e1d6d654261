"""Route search: the skip set with the best matchness at a target cost.

Matchness of a route is the fraction of calibration positions where the slim verifier's argmax
equals the full model's (`matchness`). It is what the gate relies on: tier A and B decisions are
only as good as q' agrees with q.

The search space is the set of attention and MLP sub-layers of layers max(1, min_prefix_layers)
.. L-2 (the first and last layers always run; the first `min_prefix_layers` layers are kept so
an escalating full pass can reuse at least that prefix). A candidate is a binary skip mask x over
those D sub-layers. It is *feasible* when its cost is <= target_cost, and *tight* when no skipped
sub-layer can be turned back on without exceeding the target. Only tight feasible masks are
proposed: turning a sub-layer back on never costs matchness in expectation, so the optimum lies on
that boundary, and the search does not waste evaluations inside it.

Why this search. Each evaluation is a forward pass over calibration text, so the budget is tens
of evaluations over a space of up to 2^D masks. The search therefore
1. evaluates `init` random tight masks (a random order of sub-layers skipped until the target is
   met, then re-enabled greedily in random order while it stays met), then
2. runs Bayesian optimisation: a Gaussian process with an RBF kernel on the masks (squared
   distance = Hamming distance; length scale chosen by marginal likelihood on a small grid; targets
   standardised) scores a pool of fresh random tight masks and of local moves around the best
   masks so far (swap one skipped sub-layer for a kept one, then repair to tight), and the
   candidate with the highest upper confidence bound mu + beta * sigma is evaluated next.
Masks that share skipped sub-layers have correlated matchness (skipping a sensitive layer hurts
every route that skips it), which is what the kernel captures; the local moves give it the same
reach as a swap-based local search. Everything is driven by one numpy Generator, so a seed and a
deterministic `evaluate` give the same result every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .routes import Route, SublayerCosts


def matchness(slim_argmax: torch.Tensor, full_argmax: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of positions where the slim and full argmax agree (over `mask` if given)."""
    if slim_argmax.shape != full_argmax.shape:
        raise ValueError(f"shapes differ: {tuple(slim_argmax.shape)} vs {tuple(full_argmax.shape)}")
    same = slim_argmax == full_argmax
    if mask is not None:
        same = same[mask]
    return float(same.float().mean().item()) if same.numel() else 0.0


@dataclass(frozen=True)
class Evaluation:
    route: Route
    matchness: float
    cost: float


@dataclass(frozen=True)
class SearchResult:
    route: Route  # the best route evaluated
    matchness: float
    cost: float
    history: tuple[Evaluation, ...]  # every evaluation, in order


class _Space:
    """Skip masks over the eligible sub-layers and their costs."""

    def __init__(self, num_layers: int, costs: SublayerCosts, target_cost: float, min_prefix_layers: int):
        self.num_layers = num_layers
        self.layers = list(range(max(1, min_prefix_layers), num_layers - 1))
        self.weights = np.array([w for _ in self.layers for w in (costs.attn, costs.mlp)], dtype=np.float64)
        self.total = costs.fixed + num_layers * (costs.attn + costs.mlp)
        self.costs = costs
        # skipped weight needed to reach the target (tolerant to rounding)
        self.need = self.total * (1.0 - target_cost) - 1e-9 * self.total
        if self.weights.sum() < self.need:
            lowest = (self.total - self.weights.sum()) / self.total
            raise ValueError(
                f"target_cost {target_cost} is below the cheapest route that keeps the first "
                f"{max(1, min_prefix_layers)} and the last layer ({lowest:.3f})"
            )

    @property
    def dim(self) -> int:
        return self.weights.shape[0]

    def feasible(self, x: np.ndarray) -> bool:
        return float(self.weights @ x) >= self.need

    def tighten(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = x.copy()
        for k in rng.permutation(np.flatnonzero(x)):
            x[k] = 0
            if not self.feasible(x):
                x[k] = 1
        return x

    def fill(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Skip more sub-layers, in random order, until feasible; then tighten."""
        x = x.copy()
        for k in rng.permutation(np.flatnonzero(x == 0)):
            if self.feasible(x):
                break
            x[k] = 1
        return self.tighten(x, rng)

    def random(self, rng: np.random.Generator) -> np.ndarray:
        return self.fill(np.zeros(self.dim, dtype=np.int8), rng)

    def neighbor(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        y = x.copy()
        on, off = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        if len(on):
            y[rng.choice(on)] = 0
        if len(off) and (len(on) == 0 or rng.random() < 0.8):
            y[rng.choice(off)] = 1
        return self.fill(y, rng)

    def route(self, x: np.ndarray) -> Route:
        skip_attn = [layer for layer, s in zip(self.layers, x[0::2]) if s]
        skip_mlp = [layer for layer, s in zip(self.layers, x[1::2]) if s]
        return Route.from_skips(self.num_layers, skip_attn, skip_mlp)


class _GP:
    """Exact GP regression with an RBF kernel on binary masks, standardised targets."""

    def __init__(self, x: np.ndarray, y: np.ndarray, noise: float = 1e-3):
        self.x = x.astype(np.float64)
        self.mean, self.std = float(y.mean()), float(y.std()) or 1.0
        yn = (y - self.mean) / self.std
        d = self.x.shape[1]
        best = None
        for scale in (0.15, 0.25, 0.4, 0.6, 1.0, 1.5):
            ell = scale * np.sqrt(d)
            k = self._kernel(self.x, self.x, ell) + noise * np.eye(len(yn))
            chol = np.linalg.cholesky(k)
            alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, yn))
            lml = -0.5 * yn @ alpha - np.log(np.diag(chol)).sum()
            if best is None or lml > best[0]:
                best = (lml, ell, chol, alpha)
        _, self.ell, self.chol, self.alpha = best

    @staticmethod
    def _kernel(a: np.ndarray, b: np.ndarray, ell: float) -> np.ndarray:
        sq = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T  # Hamming for 0/1
        return np.exp(-0.5 * np.maximum(sq, 0) / ell**2)

    def ucb(self, cand: np.ndarray, beta: float) -> np.ndarray:
        ks = self._kernel(cand.astype(np.float64), self.x, self.ell)  # [C, N]
        mu = ks @ self.alpha
        v = np.linalg.solve(self.chol, ks.T)
        var = np.maximum(1.0 - (v**2).sum(0), 1e-12)
        return mu + beta * np.sqrt(var)


def search_route(
    num_layers: int,
    evaluate: Callable[[Route], float],
    costs: SublayerCosts,
    target_cost: float,
    *,
    budget: int = 48,
    seed: int = 0,
    min_prefix_layers: int = 0,
    init: int | None = None,
    beta: float = 2.0,
    pool: int = 256,
) -> SearchResult:
    """Find the route with the highest matchness among tight routes of cost <= target_cost.

    `evaluate(route) -> matchness` is called at most `budget` times, never twice for one route.
    `init` random routes come first (default: a third of the budget, at least 4), the rest are
    chosen by GP-UCB (see the module docstring).
    """
    if num_layers < 3:
        raise ValueError("route search needs at least 3 layers (the first and last always run)")
    if budget < 1:
        raise ValueError("budget must be >= 1")
    space = _Space(num_layers, costs, target_cost, min_prefix_layers)
    rng = np.random.default_rng(seed)
    seen: dict[bytes, float] = {}
    xs: list[np.ndarray] = []
    history: list[Evaluation] = []

    def run(x: np.ndarray) -> None:
        route = space.route(x)
        score = float(evaluate(route))
        seen[x.tobytes()] = score
        xs.append(x)
        history.append(Evaluation(route, score, route.cost(costs)))

    n_init = min(budget, init if init is not None else max(4, budget // 3))
    for _ in range(50 * n_init):
        if len(xs) >= n_init:
            break
        x = space.random(rng)
        if x.tobytes() not in seen:
            run(x)

    while len(xs) < budget:
        scores = np.array([h.matchness for h in history])
        top = [xs[i] for i in np.argsort(-scores, kind="stable")[:5]]
        cands: dict[bytes, np.ndarray] = {}
        for i in range(pool):
            x = space.neighbor(top[i % len(top)], rng) if i % 2 == 0 else space.random(rng)
            if x.tobytes() not in seen:
                cands.setdefault(x.tobytes(), x)
        if not cands:
            break  # the space of tight routes is exhausted (or nearly so)
        pool_x = np.stack(list(cands.values()))
        gp = _GP(np.stack(xs), scores)
        run(pool_x[int(np.argmax(gp.ucb(pool_x, beta)))])

    best = max(history, key=lambda h: h.matchness)  # first of equals: max keeps the earliest
    return SearchResult(best.route, best.matchness, best.cost, tuple(history))
