"""The exact Pareto frontier of (cost, predicted quality) over all 4^L placements.

Quality is the surrogate's cluster expansion, whose terms reach at most two
layers back, so a dynamic program over layers whose state is the last two
mixers sees every term. Cost is additive per (layer, mixer). Each state keeps
its full set of non-dominated (cost, quality) points with back-pointers:
nothing is quantised, so the frontier is exact in floating point (costs are
summed in layer order, as ``placement_cost`` does).

Decimal cost coefficients are not exact in binary, so placements with equal
counts but different layer orders (or 3 GDN against 2 KDA at 0.14/0.21) can
differ in the last bit and both stay on the frontier. Pass an integer cost
array (e.g. hundredths of an FA layer) to make such ties exact: integer costs
are summed exactly in int64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from policies.errors import ConfigError
from policies.placement import MIXERS, Mixer, Placement
from policies.surrogate import ClusterExpansion

_NUM = len(MIXERS)


class FrontierPoint(NamedTuple):
    cost: float
    quality: float
    placement: Placement


def linear_count_cost(coefficients: Mapping[Mixer | str, float], num_layers: int) -> np.ndarray:
    """The [L, 4] cost array of a model linear in per-mixer counts (every layer costs the same)."""
    row = np.array([_coefficient(coefficients, m) for m in MIXERS], dtype=np.float64)
    if num_layers < 1:
        raise ConfigError(f"num_layers must be positive, got {num_layers}")
    return np.tile(row, (num_layers, 1))


def published_budget(placement_or_counts: Placement | Mapping[Mixer | str, int], coefficients: Mapping) -> float:
    """A placement's cost in FA-layer units under a linear count model (the number in the paper's preset names)."""
    if isinstance(placement_or_counts, Placement):
        counts = placement_or_counts.counts()
    else:
        counts = {m if isinstance(m, Mixer) else Mixer.parse(m): n for m, n in placement_or_counts.items()}
    return float(sum(n * _coefficient(coefficients, m) for m, n in counts.items()))


def _coefficient(coefficients: Mapping, mixer: Mixer) -> float:
    for key in (mixer, mixer.value):
        if key in coefficients:
            return float(coefficients[key])
    raise ConfigError(f"cost coefficients have no entry for {mixer.value}: give one per mixer")


def placement_cost(placement: Placement, cost: np.ndarray) -> float:
    """Cost of one placement, summed in layer order exactly as the DP sums it."""
    total = 0.0
    for layer, mixer in enumerate(placement):
        total += float(cost[layer, MIXERS.index(mixer)])
    return total


def _pareto_keep(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Mask of non-dominated points, given ``cost`` sorted ascending; one point per (cost, quality)."""
    keep = np.zeros(len(cost), dtype=bool)
    if not len(cost):
        return keep
    keep[0] = True
    keep[1:] = quality[1:] > np.maximum.accumulate(quality)[:-1]
    kept = np.flatnonzero(keep)
    # Kept qualities rise strictly, so of two kept points with equal cost the later wins.
    keep[kept[:-1][cost[kept[:-1]] == cost[kept[1:]]]] = False
    return keep


def pareto_frontier(
    surrogate: ClusterExpansion, cost: np.ndarray, *, max_layer_points: int = 1_000_000
) -> list[FrontierPoint]:
    """Every placement no other placement beats on both cost and quality, sorted by cost.

    Quality rises strictly along the result. Of placements tied on both, one is returned.
    When quality tracks cost too closely the exact frontier grows exponentially with depth:
    past ``max_layer_points`` kept points in one layer this raises ``ConfigError``.
    """
    num_layers = surrogate.num_layers
    cost = _checked_cost(cost, num_layers)
    if num_layers == 1:
        totals, qualities = cost[0], surrogate.intercept + surrogate.unary[0]
        order = np.argsort(totals, kind="stable")
        keep = order[_pareto_keep(totals[order], qualities[order])]
        return [FrontierPoint(float(totals[i]), float(qualities[i]), Placement((MIXERS[i],))) for i in keep]

    unary, pair, triple = surrogate.unary, surrogate.pair, surrogate.triple
    # After layers 0 and 1: state s = 4*a + b holds exactly one point.
    totals = (cost[0][:, None] + cost[1][None, :]).ravel()
    qualities = (surrogate.intercept + unary[0][:, None] + unary[1][None, :] + pair[0]).ravel()
    offsets = np.arange(_NUM * _NUM + 1)
    history = []  # per layer >= 2: (offsets of its states, back-pointer per point)
    for layer in range(2, num_layers):
        new_totals, new_qualities, new_back, sizes = [], [], [], []
        for b in range(_NUM):
            # States (a, b) for every a feed (b, c): their merged cost order is the same for every c.
            sources = [(offsets[a * _NUM + b], offsets[a * _NUM + b + 1]) for a in range(_NUM)]
            index = np.concatenate([np.arange(lo, hi) for lo, hi in sources])
            previous_a = np.repeat(np.arange(_NUM), [hi - lo for lo, hi in sources])
            order = np.argsort(totals[index], kind="stable")
            index, previous_a = index[order], previous_a[order]
            base_totals, base_qualities = totals[index], qualities[index]
            for c in range(_NUM):
                gain = unary[layer, c] + pair[layer - 1, b, c] + triple[layer - 2, :, b, c]
                step_totals = base_totals + cost[layer, c]
                step_qualities = base_qualities + gain[previous_a]
                keep = _pareto_keep(step_totals, step_qualities)
                new_totals.append(step_totals[keep])
                new_qualities.append(step_qualities[keep])
                new_back.append(index[keep])
                sizes.append(len(new_back[-1]))
        totals, qualities = np.concatenate(new_totals), np.concatenate(new_qualities)
        if len(totals) > max_layer_points:
            raise ConfigError(
                f"the exact frontier holds {len(totals)} points at layer {layer}, over max_layer_points "
                f"{max_layer_points}: quality tracks cost too closely for an exact search; "
                "use coarser integer costs"
            )
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        history.append((offsets, np.concatenate(new_back)))

    order = np.argsort(totals, kind="stable")
    points = order[_pareto_keep(totals[order], qualities[order])]
    codes = _trace_back(points, offsets, history, num_layers)
    return [
        FrontierPoint(float(totals[p]), float(qualities[p]), Placement(tuple(MIXERS[m] for m in row)))
        for p, row in zip(points, codes)
    ]


def _checked_cost(cost: np.ndarray, num_layers: int) -> np.ndarray:
    cost = np.asarray(cost)
    if cost.shape != (num_layers, _NUM):
        raise ConfigError(f"cost must be a [{num_layers}, {_NUM}] array, got shape {cost.shape}")
    if np.issubdtype(cost.dtype, np.integer):
        if np.abs(cost).max() > 2**52 // num_layers:
            raise ConfigError("integer costs too large to sum exactly: keep each below 2^52 / num_layers")
        return cost.astype(np.int64)
    cost = cost.astype(np.float64)
    if not np.all(np.isfinite(cost)):
        raise ConfigError("cost holds non-finite values")
    return cost


def _trace_back(points: np.ndarray, offsets: np.ndarray, history: list, num_layers: int) -> np.ndarray:
    """Mixer indices [points, layers] of the placements behind final-layer points."""
    codes = np.empty((len(points), num_layers), dtype=np.int64)
    index = points
    for layer in range(num_layers - 1, 1, -1):
        layer_offsets, back = history[layer - 2]
        codes[:, layer] = (np.searchsorted(layer_offsets, index, side="right") - 1) % _NUM
        index = back[index]
    codes[:, 1], codes[:, 0] = index % _NUM, index // _NUM  # layer-1 states hold one point each
    return codes


def pick_presets(frontier: Sequence[FrontierPoint], k: int) -> list[FrontierPoint]:
    """``k`` distinct frontier points spread evenly in cost, cheapest and dearest included, sorted by cost.

    ``k == 1`` gives the best-quality (dearest) point.
    """
    points = sorted(frontier, key=lambda p: p.cost)
    if not 1 <= k <= len(points):
        raise ConfigError(f"asked for {k} presets from a frontier of {len(points)} points: need 1 <= k <= that")
    if k == 1:
        return [points[-1]]
    costs = np.array([p.cost for p in points])
    targets = np.linspace(costs[0], costs[-1], k)
    chosen: list[int] = []
    for i, target in enumerate(targets):
        # Nearest in cost, clamped so every later pick still has a distinct point left.
        lowest = chosen[-1] + 1 if chosen else 0
        highest = len(points) - (k - i)
        nearest = int(np.argmin(np.abs(costs - target)))
        chosen.append(min(max(nearest, lowest), highest))
    return [points[i] for i in chosen]
