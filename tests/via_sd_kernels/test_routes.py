import json

import numpy as np
import pytest
import torch

from via_sd_kernels import Route, SublayerCosts, matchness, search_route


def test_json_round_trip_and_files(tmp_path):
    r = Route.from_skips(6, skip_attn=[2, 4], skip_mlp=[3], name="slim-0.8")
    assert Route.from_json(r.to_json()) == r
    data = json.loads(r.to_json())
    assert data == {
        "num_layers": 6,
        "attn": [True, True, False, True, False, True],
        "mlp": [True, True, True, False, True, True],
        "name": "slim-0.8",
    }
    path = tmp_path / "route.json"
    r.save(path)
    assert Route.load(path) == r
    assert hash(r) == hash(Route.load(path))  # frozen, usable as a key


def test_counts_prefix_and_cost():
    full = Route.full(4)
    assert full.num_skipped == 0 and full.is_full and full.shared_prefix_sublayers() == 8
    r = Route.from_skips(4, skip_attn=[1], skip_mlp=[2])
    assert r.num_skipped == 2 and r.skipped_attn == (1,) and r.skipped_mlp == (2,)
    assert r.shared_prefix_sublayers() == 2  # attn0, mlp0, then attn1 is skipped
    assert Route.from_skips(4, skip_mlp=[0]).shared_prefix_sublayers() == 1
    assert Route.from_skips(4, skip_attn=[0]).shared_prefix_sublayers() == 0
    costs = SublayerCosts(attn=1.0, mlp=2.0)
    assert r.cost(costs) == pytest.approx(9 / 12)  # the module docstring's example
    assert full.cost(costs) == 1.0
    with_head = SublayerCosts(attn=1.0, mlp=2.0, fixed=4.0)
    assert r.cost(with_head) == pytest.approx(13 / 16)


def test_invalid_routes_are_rejected():
    with pytest.raises(ValueError):
        Route(3, (True, True), (True, True, True))
    with pytest.raises(ValueError):
        Route.from_skips(3, skip_attn=[3])


def test_matchness():
    a = torch.tensor([1, 2, 3, 4])
    assert matchness(a, torch.tensor([1, 2, 0, 4])) == 0.75
    assert matchness(a, a, mask=torch.tensor([True, False, False, False])) == 1.0


def _planted(num_layers=10, seed=123):
    """Additive synthetic matchness with a planted optimum at cost exactly 0.8."""
    planted = Route.from_skips(num_layers, skip_attn=[2, 5], skip_mlp=[4, 7])
    rng = np.random.default_rng(seed)
    pen_attn, pen_mlp = rng.uniform(0.05, 0.15, num_layers), rng.uniform(0.05, 0.15, num_layers)
    pen_attn[list(planted.skipped_attn)] = 0.01
    pen_mlp[list(planted.skipped_mlp)] = 0.01
    calls = []

    def evaluate(route: Route) -> float:
        calls.append(route)
        return 1.0 - pen_attn[list(route.skipped_attn)].sum() - pen_mlp[list(route.skipped_mlp)].sum()

    return planted, evaluate, calls


def test_search_finds_the_planted_optimum_within_budget():
    costs = SublayerCosts(attn=1.0, mlp=2.0)
    for seed in (0, 1, 2):
        planted, evaluate, calls = _planted()
        res = search_route(10, evaluate, costs, target_cost=0.8, budget=40, seed=seed)
        assert (res.route.skipped_attn, res.route.skipped_mlp) == (planted.skipped_attn, planted.skipped_mlp)
        assert res.cost == pytest.approx(0.8) and res.matchness == pytest.approx(0.96)
        assert len(calls) == len(res.history) <= 40
        assert len(set(calls)) == len(calls)  # never evaluates a route twice
        for h in res.history:
            assert h.cost <= 0.8 + 1e-9
            assert h.route.attn[0] and h.route.mlp[0] and h.route.attn[-1] and h.route.mlp[-1]


def test_search_is_deterministic_and_respects_the_prefix():
    costs = SublayerCosts(attn=1.0, mlp=2.0, fixed=3.0)
    runs = []
    for _ in range(2):
        _, evaluate, _ = _planted()
        runs.append(search_route(10, evaluate, costs, 0.85, budget=20, seed=5, min_prefix_layers=3))
    assert [h.route for h in runs[0].history] == [h.route for h in runs[1].history]
    for h in runs[0].history:
        assert h.route.shared_prefix_sublayers() >= 6
    with pytest.raises(ValueError):
        search_route(10, lambda r: 0.0, costs, 0.1, budget=5)
