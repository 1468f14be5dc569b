"""The DP frontier equals a brute-force search over every placement."""

import numpy as np
import pytest

from policies.errors import ConfigError
from policies.frontier import (
    FrontierPoint,
    linear_count_cost,
    pareto_frontier,
    pick_presets,
    placement_cost,
)
from policies.placement import Placement
from policies.surrogate import ClusterExpansion


def random_surrogate(rng, num_layers, max_range=3):
    shapes = [(num_layers, 4), (max(num_layers - 1, 0), 4, 4), (max(num_layers - 2, 0), 4, 4, 4)]
    scales = [1.0, 0.5, 0.3]
    arrays = [
        rng.normal(0, scale, shape) if order <= max_range else np.zeros(shape)
        for order, (shape, scale) in enumerate(zip(shapes, scales), start=1)
    ]
    return ClusterExpansion(num_layers, max_range, rng.normal(), *arrays)


def brute_force(surrogate, cost):
    """(cost, quality) of the non-dominated placements, by enumerating all 4^L of them."""
    num_layers = surrogate.num_layers
    codes = np.indices((4,) * num_layers).reshape(num_layers, -1).T
    quality = surrogate.predict_many(codes)
    total = np.zeros(len(codes), dtype=cost.dtype)
    for layer in range(num_layers):  # layer order, as the DP sums
        total = total + cost[layer, codes[:, layer]]
    frontier, best = [], -np.inf
    for i in np.lexsort((-quality, total)):  # by cost, then best quality first
        if quality[i] > best:
            frontier.append((float(total[i]), float(quality[i])))
            best = quality[i]
    return frontier


def assert_matches_brute_force(surrogate, cost):
    frontier = pareto_frontier(surrogate, cost)
    expected = brute_force(surrogate, cost)
    assert [p.cost for p in frontier] == [c for c, _ in expected]
    assert np.allclose([p.quality for p in frontier], [q for _, q in expected], rtol=0, atol=1e-9)
    for point in frontier:
        assert placement_cost(point.placement, cost) == point.cost
        assert surrogate.predict(point.placement) == pytest.approx(point.quality, abs=1e-9)
    assert all(np.diff([p.quality for p in frontier]) > 0)


@pytest.mark.parametrize("seed", range(4))
def test_equals_brute_force_with_random_costs(seed):
    rng = np.random.default_rng(seed)
    assert_matches_brute_force(random_surrogate(rng, 6), rng.uniform(0.1, 1.0, (6, 4)))


@pytest.mark.parametrize("max_range", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_equals_brute_force_with_tied_costs(max_range, dtype):
    """Integer count costs make many placements tie on cost: the best of each tie is kept."""
    rng = np.random.default_rng(10 + max_range)
    cost = linear_count_cost({"attention": 6, "sliding_window": 3, "kda": 2, "gdn": 1}, 6).astype(dtype)
    assert_matches_brute_force(random_surrogate(rng, 6, max_range), cost)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_equals_brute_force_for_shallow_models(num_layers):
    rng = np.random.default_rng(num_layers)
    assert_matches_brute_force(random_surrogate(rng, num_layers), rng.uniform(0.1, 1.0, (num_layers, 4)))


def test_single_point_when_the_cheapest_is_also_the_best():
    surrogate = ClusterExpansion(2, 1, 0.0, [[0, 0, 1, 0]] * 2, np.zeros((1, 4, 4)), np.zeros((0, 4, 4, 4)))
    cost = linear_count_cost({"attention": 3, "sliding_window": 2, "gdn": 1, "kda": 2}, 2)
    assert pareto_frontier(surrogate, cost) == [FrontierPoint(2.0, 2.0, Placement.parse("GG"))]


def test_refuses_misshapen_costs_and_runaway_frontiers():
    rng = np.random.default_rng(0)
    surrogate = random_surrogate(rng, 6)
    with pytest.raises(ConfigError, match="shape"):
        pareto_frontier(surrogate, np.ones((5, 4)))
    with pytest.raises(ConfigError, match="non-finite"):
        pareto_frontier(surrogate, np.full((6, 4), np.nan))
    # Quality proportional to cost: every placement is on the frontier.
    cost = rng.uniform(0.1, 1.0, (6, 4))
    proportional = ClusterExpansion(6, 1, 0.0, cost, np.zeros((5, 4, 4)), np.zeros((4, 4, 4, 4)))
    with pytest.raises(ConfigError, match="max_layer_points"):
        pareto_frontier(proportional, cost, max_layer_points=100)


def fake_frontier(costs):
    return [FrontierPoint(float(c), float(i), Placement.parse("A")) for i, c in enumerate(costs)]


@pytest.mark.parametrize(
    "costs, k, expected",
    [
        ([0, 1, 2, 3, 4, 5, 6, 7, 8], 3, [0, 4, 8]),
        ([0, 1, 2, 3, 4, 5, 6, 7, 8], 5, [0, 2, 4, 6, 8]),
        ([0, 0.1, 0.2, 0.3, 10], 3, [0, 0.3, 10]),  # clusters: nearest pick, still distinct
        ([0, 0.1, 0.2, 0.3, 10], 4, [0, 0.2, 0.3, 10]),
        ([0, 0.1, 0.2, 0.3, 10], 5, [0, 0.1, 0.2, 0.3, 10]),
        ([1, 2], 2, [1, 2]),
        ([1, 2, 3], 1, [3]),
    ],
)
def test_pick_presets(costs, k, expected):
    picked = pick_presets(fake_frontier(costs), k)
    assert [p.cost for p in picked] == expected


def test_pick_presets_on_a_real_frontier():
    rng = np.random.default_rng(3)
    cost = linear_count_cost({"attention": 1.0, "sliding_window": 0.48, "kda": 0.21, "gdn": 0.14}, 12)
    frontier = pareto_frontier(random_surrogate(rng, 12), cost)
    for k in range(2, min(len(frontier), 8) + 1):
        picked = pick_presets(frontier, k)
        assert len({p.placement for p in picked}) == k
        assert picked[0] == frontier[0] and picked[-1] == frontier[-1]
        assert [p.cost for p in picked] == sorted(p.cost for p in picked)
    with pytest.raises(ConfigError, match="presets"):
        pick_presets(frontier, len(frontier) + 1)
    with pytest.raises(ConfigError):
        pick_presets(frontier, 0)
