"""Step time, time to first token and cache memory of any batch, from a measured speed table.

The model (all times in ms, one decoder layer's worth of each part measured by ``profile``):

    decode step  = L * shared(B) + head(B) + engine(B) + sum over layers l, over mixer groups g at l: decode[m_g](|g|, c_g)
    prefill      = for each chunk of n <= prefill_chunk prompt tokens starting at context s:
                   L * shared(n) + head(1) + engine(1) + n * sum over layers l: prefill[m_l](s)

``engine(B)`` is what a whole engine step costs beyond its model parts (scheduling, the step's metadata,
sampling, detokenizing): on a CPU with a small model it was a third to a half of a one-row step (1.5 ms of
parts in a 2.6-3.0 ms step of the default checkpoint), which every prediction missed before the table measured it.

``B`` is the number of rows in the step; a layer's rows are grouped by the mixer
their placement gives that layer, and each group costs what a homogeneous group
of its size costs at the mean context of its rows (exact for equal contexts;
attention cost is close to linear in context, so the mean is a fair summary).
Not modelled: the gather/scatter of rows between groups in a mixed layer.

Grids are interpolated piecewise-linearly in batch (or tokens) and context:
between measured points a prediction lies between its neighbours, so a grid
that never decreases gives predictions that never decrease. Outside the grid a
prediction is extrapolated along the last measured segment above the grid and
held at the edge value below it, and says so (``Estimate.extrapolated`` with
the reasons).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from policies.errors import TableMismatch
from policies.frontier import FrontierPoint, pareto_frontier, pick_presets
from policies.memory import CacheMemoryModel
from policies.placement import MIXERS, Mixer, Placement
from policies.surrogate import ClusterExpansion

if TYPE_CHECKING:
    from policies.tables import SpeedFile


@dataclass(frozen=True, slots=True)
class Estimate:
    ms: float
    extrapolated: bool = False
    reasons: tuple[str, ...] = ()

    @staticmethod
    def total(parts: Iterable["Estimate"]) -> "Estimate":
        parts = list(parts)
        reasons = tuple(dict.fromkeys(r for p in parts for r in p.reasons))  # unique, in order
        return Estimate(float(sum(p.ms for p in parts)), any(p.extrapolated for p in parts), reasons)

    def times(self, factor: float) -> "Estimate":
        return Estimate(self.ms * factor, self.extrapolated, self.reasons)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float, what: str) -> tuple[float, str | None]:
    """Piecewise-linear ``ys(x)``; above the grid along the last segment, below it the first value.

    Returns the value and, outside the grid, why it is not measured.
    """
    if x < xs[0]:
        return float(ys[0]), f"{what} {x:g} is below the measured {xs[0]:g} (held at the edge)"
    if x > xs[-1]:
        if len(xs) == 1:
            return float(ys[0]), f"{what} {x:g} is above the measured {xs[0]:g} (held at the edge)"
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + slope * (x - xs[-1])), f"{what} {x:g} is above the measured {xs[-1]:g} (extrapolated)"
    return float(np.interp(x, xs, ys)), None


def check_grid(name: str, grid: list, axes: list[tuple[str, list[int]]]) -> None:
    """Shape, missing points (null) and monotonicity of a measured grid; ``ValueError`` says what is wrong.

    ``axes``: (name, grid values) per dimension. No value may decrease along any axis: that is what
    keeps interpolated predictions monotone.
    """
    shape = tuple(len(values) for _, values in axes)
    try:
        array = np.array(grid, dtype=np.float64)  # null -> nan
    except ValueError:  # ragged
        array = None
    if array is None or array.shape != shape:
        raise ValueError(f"{name} is not a " + " x ".join(f"{len(v)} {a}" for a, v in axes) + " grid (one value per "
                         + " per ".join(f"{a} of {v}" for a, v in axes) + ")")
    where = lambda index: ", ".join(f"{axis}={values[i]}" for (axis, values), i in zip(axes, index))  # noqa: E731
    if missing := np.argwhere(np.isnan(array)).tolist():
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{name} is missing the grid point {where(missing[0])}{more}")
    for axis, (axis_name, values) in enumerate(axes):
        if falls := np.argwhere(np.diff(array, axis=axis) < 0).tolist():
            after = list(falls[0])
            after[axis] += 1
            raise ValueError(f"{name} falls from {array[tuple(falls[0])]:.6g} at {where(falls[0])} to "
                             f"{array[tuple(after)]:.6g} at {axis_name}={values[after[axis]]}: "
                             "a measured grid must not decrease along any axis")


def _estimate(value: float, *reasons: str | None) -> Estimate:
    kept = tuple(r for r in reasons if r)
    return Estimate(value, bool(kept), kept)


@dataclass(frozen=True, slots=True, eq=False)
class SpeedModel:
    """A validated speed table as numbers; see the module docstring for what each part means."""

    num_layers: int
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    decode_ms: Mapping[Mixer, np.ndarray]  # [batches, contexts]
    prefill_chunk: int
    prefill_contexts: tuple[int, ...]
    prefill_ms_per_token: Mapping[Mixer, np.ndarray]  # [prefill_contexts]
    tokens: tuple[int, ...]
    shared_ms: np.ndarray  # [tokens]
    head_ms: np.ndarray  # [tokens]
    engine_ms: np.ndarray | None  # [batches]; None: a table made before it was measured (counted as 0)
    memory: CacheMemoryModel

    @classmethod
    def from_file(cls, table: SpeedFile) -> "SpeedModel":
        def array(values) -> np.ndarray:
            out = np.array(values, dtype=np.float64)
            out.setflags(write=False)
            return out

        return cls(
            num_layers=table.fingerprint.num_layers,
            batches=tuple(table.batches),
            contexts=tuple(table.contexts),
            decode_ms={Mixer(m): array(g) for m, g in table.decode_ms.items()},
            prefill_chunk=table.prefill_chunk,
            prefill_contexts=tuple(table.prefill_contexts),
            prefill_ms_per_token={Mixer(m): array(g) for m, g in table.prefill_ms_per_token.items()},
            tokens=tuple(table.tokens),
            shared_ms=array(table.shared_ms),
            head_ms=array(table.head_ms),
            engine_ms=None if table.engine_ms is None else array(table.engine_ms),
            memory=CacheMemoryModel.from_dict(table.memory.model_dump()),
        )

    @property
    def mixers(self) -> tuple[Mixer, ...]:
        return tuple(m for m in MIXERS if m in self.decode_ms)

    def _grid(self, table: Mapping[Mixer, np.ndarray], mixer: Mixer) -> np.ndarray:
        try:
            return table[mixer]
        except KeyError:
            have = ", ".join(m.value for m in self.mixers)
            raise TableMismatch(f"the speed table has no times for {mixer.value} (it times: {have})") from None

    def check_placement(self, placement: Placement) -> None:
        if len(placement) != self.num_layers:
            raise TableMismatch(f"placement {placement.code} has {len(placement)} layers but the speed table "
                                f"was measured for {self.num_layers}")

    # ---- the parts ----
    def mixer_decode(self, mixer: Mixer, batch: int, context: float) -> Estimate:
        """One layer's ``mixer`` stepping a group of ``batch`` rows at ``context`` cached tokens."""
        grid = self._grid(self.decode_ms, mixer)
        # Along context within each measured batch row, then along batch: bilinear inside the grid.
        column = [interpolate(self.contexts, row, context, "context") for row in grid]
        value, batch_reason = interpolate(self.batches, [v for v, _ in column], batch, "batch")
        return _estimate(value, batch_reason, column[0][1])

    def mixer_prefill_per_token(self, mixer: Mixer, context: float) -> Estimate:
        grid = self._grid(self.prefill_ms_per_token, mixer)
        return _estimate(*interpolate(self.prefill_contexts, grid, context, "prefill context"))

    def shared(self, tokens: int) -> Estimate:
        """One layer's MLP, norms and residual adds on ``tokens`` tokens."""
        return _estimate(*interpolate(self.tokens, self.shared_ms, tokens, "tokens"))

    def head(self, rows: int) -> Estimate:
        """Embedding lookup, final norm and lm_head for ``rows`` rows."""
        return _estimate(*interpolate(self.tokens, self.head_ms, rows, "head rows"))

    def engine(self, rows: int) -> Estimate:
        """The engine's own work in a step of ``rows`` rows, beside the model's (0 where the table has none)."""
        if self.engine_ms is None:
            return Estimate(0.0)
        return _estimate(*interpolate(self.batches, self.engine_ms, rows, "engine rows"))

    def step_fixed(self, rows: int) -> Estimate:
        """What a step of ``rows`` rows costs whatever their mixers: shared layers, head and the engine's work."""
        return Estimate.total([self.shared(rows).times(self.num_layers), self.head(rows), self.engine(rows)])

    # ---- whole steps ----
    def step(self, rows: Sequence[tuple[Placement, int]]) -> Estimate:
        """One decode step of ``rows`` (placement, cached context) pairs, each adding one token."""
        if not rows:
            return Estimate(0.0)
        for placement, _ in rows:
            self.check_placement(placement)
        parts = [self.step_fixed(len(rows))]
        for layer in range(self.num_layers):
            groups: dict[Mixer, list[int]] = {}
            for placement, context in rows:
                groups.setdefault(placement[layer], []).append(context)
            for mixer, contexts in groups.items():
                parts.append(self.mixer_decode(mixer, len(contexts), float(np.mean(contexts))))
        return Estimate.total(parts)

    def homogeneous_step(self, placement: Placement, batch: int, context: int) -> Estimate:
        """A decode step of ``batch`` rows that all run ``placement`` at ``context``."""
        return self.step([(placement, context)] * batch)

    def ttft(self, placement: Placement, prompt_tokens: int, chunk: int | None = None) -> Estimate:
        """Time to first token: the prompt in chunks of ``chunk`` (default: the profiled chunk) tokens."""
        self.check_placement(placement)
        chunk = chunk or self.prefill_chunk
        parts, start = [], 0
        while start < prompt_tokens:
            n = min(chunk, prompt_tokens - start)
            parts += [self.shared(n).times(self.num_layers), self.head(1), self.engine(1)]
            parts += [self.mixer_prefill_per_token(m, start).times(n) for m in placement]
            start += n
        return Estimate.total(parts)

    def layer_costs(self, batch: int, context: int) -> tuple[np.ndarray, Estimate]:
        """[L, 4] ms of each mixer (``MIXERS`` order) in each layer for a homogeneous step at (batch, context).

        The Estimate carries the extrapolation flags (its ms is the all-attention mixer total).
        """
        estimates = [self.mixer_decode(m, batch, context) for m in MIXERS]
        row = np.array([e.ms for e in estimates])
        flags = Estimate.total(estimates)
        return np.tile(row, (self.num_layers, 1)), Estimate(row[0] * self.num_layers, flags.extrapolated, flags.reasons)

    # ---- memory ----
    def sequence_bytes(self, placement: Placement, context: int) -> int:
        return self.memory.sequence_bytes(placement, context)

    def max_sequences(self, placement: Placement, context: int, budget_bytes: int) -> int:
        """How many sequences of ``placement`` at ``context`` tokens fit ``budget_bytes`` of cache memory."""
        return self.memory.max_sequences(placement, context, budget_bytes)


def quantise(cost: np.ndarray, steps: int = 10_000) -> tuple[np.ndarray, float]:
    """Integer costs for the exact frontier DP (equal counts then tie exactly), and the unit they are in.

    The dearest entry becomes ``steps`` units.
    """
    top = float(np.max(cost))
    unit = top / steps if top > 0 else 1.0
    return np.rint(cost / unit).astype(np.int64), unit


# ---- presets at an operating point ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class OperatingCost:
    """Decode-step cost of any placement at one operating point: ``offset + sum_l per_layer[l, mixer_l]``."""

    per_layer: np.ndarray  # [L, 4] in MIXERS order
    offset: float  # shared layers, head and the engine's own work (0 for the linear count models)
    unit: str  # "ms" or "fa-layers"
    estimate: Estimate = Estimate(0.0)  # extrapolation flags of the operating point

    @classmethod
    def from_speed(cls, speed: SpeedModel, batch: int, context: int) -> "OperatingCost":
        per_layer, flags = speed.layer_costs(batch, context)
        offset = speed.step_fixed(batch)
        both = Estimate.total([flags, offset])
        return cls(per_layer, offset.ms, "ms", Estimate(offset.ms, both.extrapolated, both.reasons))

    def __call__(self, placement: Placement) -> float:
        return self.offset + float(sum(self.per_layer[i, MIXERS.index(m)] for i, m in enumerate(placement)))


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    placement: Placement
    predicted_quality: float
    retention: float  # exp(quality - all-attention quality): the per-token likelihood ratio
    cost: float
    speedup: float  # all-attention cost / cost


def spread_presets(surrogate: ClusterExpansion, cost: OperatingCost, k: int) -> tuple[list[FrontierPoint], Preset, list[Preset]]:
    """The exact frontier under ``cost``, the all-attention baseline, and ``k`` presets spread along it.

    Costs enter the DP as integers (``quantise``) so placements with equal counts tie exactly;
    all reported costs (frontier and presets) are ``cost(placement)`` in full precision, in ``cost.unit``.
    ``k`` is capped at the frontier's size.
    """
    frontier = [FrontierPoint(cost(p.placement), p.quality, p.placement)
                for p in pareto_frontier(surrogate, quantise(cost.per_layer)[0])]
    base = Placement.uniform(Mixer.ATTENTION, surrogate.num_layers)
    base_quality, base_cost = surrogate.predict(base), cost(base)

    def preset(placement: Placement, quality: float) -> Preset:
        retention, speedup = float(np.exp(quality - base_quality)), base_cost / cost(placement)
        return Preset(f"q{100 * retention:.0f}-x{speedup:.2f}", placement, quality, retention, cost(placement), speedup)

    picked = [preset(p.placement, p.quality) for p in pick_presets(frontier, min(k, len(frontier)))]
    seen: dict[str, int] = {}
    for i, p in enumerate(picked):  # rounding can give two presets one name: number the later ones
        seen[p.name] = seen.get(p.name, 0) + 1
        if seen[p.name] > 1:
            picked[i] = replace(p, name=f"{p.name}-{seen[p.name]}")
    return frontier, preset(base, base_quality), picked
