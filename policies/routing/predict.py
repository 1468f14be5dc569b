"""Predicted queue wait, time to first token, time per output token and completion, per (preset, worker).

Per worker snapshot (``WorkerView``, built once per snapshot, not per request)
the step time of its running batch and the *marginal* cost of one more row of
each mixer in each layer, linear in the new row's context:

    step(batch + row of placement p at context c) = base + shared_and_head + sum_l (A[l, p_l] + c * B[l, p_l])

Per request everything is a few numpy operations over [presets x workers]:

    tpot       = calibration * (base + marginal(p, c))
    queue wait = calibration * (waiting prompt tokens * prefill cost + wait for cache memory: rows finishing)
    ttft       = queue wait + calibration * (prefill(p, prompt) + chunks * current step time)
    completion = ttft + (max_tokens - 1) * tpot

Grids are read with the same rules as ``policies.cost.interpolate`` (linear
inside, along the last segment above, held at the edge below), vectorised.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from policies.cost import SpeedModel
from policies.memory import AttentionShape
from policies.placement import MIXERS, Placement
from policies.routing.types import PresetInfo, RoutingRequest, WorkerState

_M = {m: i for i, m in enumerate(MIXERS)}
_CONTEXT_PROBE = 4096.0  # tokens: the slope of a row's cost in its own context is measured over this span
_SPAN = 2.0**44  # bytes: above any cache budget (16 TiB), so offset release curves never overlap


def _segments(xs: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment index and position in it for each x (t < 0 clamped: below the grid holds the edge)."""
    if len(xs) == 1:
        return np.zeros(x.shape, dtype=int), np.zeros(x.shape)
    i = np.searchsorted(xs, x) - 1
    np.minimum(np.maximum(i, 0, out=i), len(xs) - 2, out=i)  # np.clip costs more than the search here
    t = np.maximum((x - xs[i]) / (xs[i + 1] - xs[i]), 0.0)
    return i, t


class _Grid2D:
    """A [batches, contexts] decode grid, evaluated at arrays of (batch, context)."""

    def __init__(self, batches, contexts, values: np.ndarray):
        self.b, self.c, self.v = np.asarray(batches, float), np.asarray(contexts, float), np.asarray(values, float)

    def __call__(self, batch: np.ndarray, context: np.ndarray) -> np.ndarray:
        ib, tb = _segments(self.b, batch)
        ic, tc = _segments(self.c, context)
        jb, jc = np.minimum(ib + 1, len(self.b) - 1), np.minimum(ic + 1, len(self.c) - 1)
        low = self.v[ib, ic] + tc * (self.v[ib, jc] - self.v[ib, ic])
        high = self.v[jb, ic] + tc * (self.v[jb, jc] - self.v[jb, ic])
        return low + tb * (high - low)


def _interp_columns(xs: list[float], ys: np.ndarray, x: float) -> np.ndarray:
    """Every row of ``ys`` [P, G] at one scalar ``x`` (the request path: plain Python for the index)."""
    if len(xs) == 1:
        return ys[:, 0]
    i = min(max(bisect.bisect_left(xs, x) - 1, 0), len(xs) - 2)
    t = max((x - xs[i]) / (xs[i + 1] - xs[i]), 0.0)
    return ys[:, i] + t * (ys[:, i + 1] - ys[:, i])


@dataclass(frozen=True, slots=True, eq=False)
class WorkerView:
    """A worker snapshot turned into the numbers predictions need."""

    state: WorkerState
    base_ms: float  # one decode step of the running batch, grown by the rows about to join it
    marginal_fixed_ms: float  # shared layers and head, one more row
    marginal: np.ndarray  # [L*4]: one more row of mixer m at layer l, context 0
    slope: np.ndarray  # [L*4]: per token of that row's context
    release_ms: np.ndarray  # sorted: when each running row finishes
    release_bytes: np.ndarray  # cumulative bytes freed by then


@dataclass(frozen=True, slots=True, eq=False)
class Fleet:
    """All workers' views stacked, with every request-independent product precomputed ([presets x workers])."""

    views: tuple[WorkerView, ...]
    tpot_base: np.ndarray  # [P, W]: calibrated step with one more row of the preset, context 0
    tpot_slope: np.ndarray  # [P, W]: its growth per token of the row's context
    calibration: np.ndarray  # [W]
    step_now: np.ndarray  # [W]: calibrated step of the running batch (a prefill chunk rides along each)
    queue_per_token: np.ndarray  # [W]: calibrated waiting prompt tokens (times a prefill cost per token)
    queue_fixed: np.ndarray  # [W]: calibrated fixed cost of the waiting requests' prefill chunks
    free: np.ndarray  # [W] bytes
    budget: np.ndarray  # [W] bytes
    waiting: np.ndarray  # [W]: requests queued for admission
    # Release curves of all workers in one sorted array: worker w's cumulative bytes offset by w * _SPAN,
    # so one searchsorted answers every (preset, worker) pair.
    release_ms: np.ndarray
    release_key: np.ndarray
    release_first: np.ndarray  # [W]: where each worker's rows start
    release_last: np.ndarray  # [W]: its last row (first - 1: none)

    @classmethod
    def stack(cls, views: tuple[WorkerView, ...], onehot: np.ndarray, chunk_fixed_ms: float, chunk: int) -> "Fleet":
        def column(get) -> np.ndarray:
            return np.array([get(v) for v in views], dtype=float)

        calibration = column(lambda v: v.state.calibration)
        marginal = onehot @ np.stack([v.marginal for v in views], axis=1)
        slope = onehot @ np.stack([v.slope for v in views], axis=1)
        sizes = np.array([len(v.release_ms) for v in views])
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return cls(
            views,
            tpot_base=calibration * (column(lambda v: v.base_ms + v.marginal_fixed_ms) + marginal),
            tpot_slope=calibration * slope,
            calibration=calibration,
            step_now=calibration * column(lambda v: v.base_ms),
            queue_per_token=calibration * column(lambda v: v.state.waiting_prompt_tokens
                                                 + v.state.prefill_backlog_tokens),
            # Each queued prompt chunk rides along one decode step of the batch.
            queue_fixed=calibration * (column(lambda v: v.state.waiting_requests) * chunk_fixed_ms
                                       + np.ceil(column(lambda v: v.state.waiting_prompt_tokens
                                                        + v.state.prefill_backlog_tokens) / chunk)
                                       * column(lambda v: v.base_ms)),
            free=column(lambda v: v.state.cache_free_bytes),
            waiting=column(lambda v: v.state.waiting_requests + v.state.in_flight),
            budget=column(lambda v: v.state.cache_budget_bytes),
            release_ms=np.concatenate([v.release_ms for v in views] + [np.zeros(0)]),
            release_key=np.concatenate([v.release_bytes + w * _SPAN for w, v in enumerate(views)] + [np.zeros(0)]),
            release_first=first,
            release_last=first + sizes - 1,
        )


class Predictor:
    def __init__(self, speed: SpeedModel, presets: list[PresetInfo]):
        self.speed = speed
        self.presets = presets
        self.num_layers = speed.num_layers
        self._layer_index: dict[Placement, np.ndarray] = {}
        for preset in presets:
            speed.check_placement(preset.placement)
        self.onehot = np.zeros((len(presets), self.num_layers * len(MIXERS)))
        for i, preset in enumerate(presets):
            self.onehot[i, self._flat(preset.placement)] = 1.0
        self.quality = np.array([p.quality for p in presets])
        self.decode = {m: _Grid2D(speed.batches, speed.contexts, speed.decode_ms[m]) for m in speed.mixers}
        # Prefill cost per prompt token of each preset at each profiled context: [P, G].
        per_mixer = np.array([speed.prefill_ms_per_token[m] if m in speed.mixers
                              else np.full(len(speed.prefill_contexts), np.inf) for m in MIXERS])
        layer_mixers = self.onehot.reshape(len(presets), self.num_layers, len(MIXERS)).sum(1)  # [P, 4]
        self.prefill_per_token = layer_mixers @ per_mixer
        self.prefill_contexts = [float(c) for c in speed.prefill_contexts]
        self.chunk = speed.prefill_chunk
        self.chunk_fixed_ms = self._shared_and_head(self.chunk) - speed.head(self.chunk).ms + speed.head(1).ms
        self._bytes = _BytesModel(speed, presets)

    def _flat(self, placement: Placement) -> np.ndarray:
        """Indices into the flattened [L*4] (layer, mixer) axis."""
        index = self._layer_index.get(placement)
        if index is None:
            index = np.arange(self.num_layers) * len(MIXERS) + np.array([_M[m] for m in placement])
            self._layer_index[placement] = index
        return index

    def _shared_and_head(self, rows: int) -> float:
        return self.num_layers * self.speed.shared(rows).ms + self.speed.head(rows).ms if rows else 0.0

    # ---- per snapshot ----

    def view(self, state: WorkerState) -> WorkerView:
        width = self.num_layers * len(MIXERS)
        counts, totals = np.zeros(width), np.zeros(width)
        for row in state.running:
            index = self._flat(row.placement)
            counts[index] += 1
            totals[index] += row.context_tokens
        base = self._shared_and_head(len(state.running)) if state.running else 0.0
        marginal, slope = np.zeros(width), np.zeros(width)
        for mixer, grid in self.decode.items():
            cells = slice(_M[mixer], width, len(MIXERS))
            n, total = counts[cells], totals[cells]
            busy = n > 0
            now = np.where(busy, grid(np.maximum(n, 1), total / np.maximum(n, 1)), 0.0)
            base += float(now[busy].sum())
            at0 = grid(n + 1, total / (n + 1))
            marginal[cells] = at0 - now
            slope[cells] = (grid(n + 1, (total + _CONTEXT_PROBE) / (n + 1)) - at0) / _CONTEXT_PROBE
        # Rows about to join (dispatched since the snapshot, or queued there) slow every later step: assume
        # they cost what the running rows cost on average.
        # Rows about to join (dispatched since the snapshot, or queued there) slow every later step:
        # costed like an average running row (its marginal mixer cost, shared layers and head).
        joining = state.in_flight + state.waiting_requests
        if state.running and joining:
            per_row = np.mean([marginal[self._flat(r.placement)].sum() + r.context_tokens * slope[
                self._flat(r.placement)].sum() for r in state.running])
            rows_after = len(state.running) + joining
            shared = self._shared_and_head(rows_after) - self._shared_and_head(len(state.running))
            base += joining * per_row + shared
        rows = len(state.running) + joining
        fixed = self._shared_and_head(rows + 1) - self._shared_and_head(rows)
        order = sorted(state.running, key=lambda r: r.remaining_tokens)
        step = max(base, 1e-3)
        release_ms = np.array([r.remaining_tokens * step for r in order])
        release_bytes = np.cumsum([r.cache_bytes for r in order]).astype(float) if order else np.zeros(0)
        return WorkerView(state, base, fixed, marginal, slope, release_ms, release_bytes)

    # ---- per request ----

    def predict(self, request: RoutingRequest, fleet: Fleet) -> dict[str, np.ndarray]:
        """Arrays of shape [presets, workers]: queue_wait, ttft, tpot, completion (ms), fits and admit_now (bool)."""
        n_prompt = request.prompt_tokens
        context = n_prompt + request.max_tokens / 2  # the row's mean context while it decodes
        tpot = fleet.tpot_base + context * fleet.tpot_slope
        per_token = _interp_columns(self.prefill_contexts, self.prefill_per_token, n_prompt / 2)  # [P]
        chunks = math.ceil(n_prompt / self.chunk)
        prefill = chunks * self.chunk_fixed_ms + n_prompt * per_token  # [P]
        queue = fleet.queue_per_token * (per_token.sum() / len(per_token)) + fleet.queue_fixed  # [W]
        need = self._bytes.sequence_bytes(n_prompt + request.max_tokens)  # [P]
        memory_wait, fits = self._memory_wait(need, fleet)
        queue_wait = queue + memory_wait if memory_wait is not None else np.broadcast_to(queue, tpot.shape)
        ttft = queue_wait + chunks * fleet.step_now + np.multiply.outer(prefill, fleet.calibration)
        completion = ttft + max(request.max_tokens - 1, 0) * tpot
        # Admitted at once: no FIFO queue on the worker and the cache fits its free memory now.
        admit_now = (need[:, None] <= fleet.free) & (fleet.waiting == 0)
        return {"queue_wait": queue_wait, "ttft": ttft, "tpot": tpot, "completion": completion, "fits": fits,
                "admit_now": admit_now}

    @staticmethod
    def _memory_wait(need: np.ndarray, fleet: Fleet):
        """Calibrated wait until enough running rows finish to free ``need`` bytes (None: no wait anywhere),
        and ``fits``: whether the cache fits each worker at all."""
        fits = need[:, None] <= fleet.budget
        largest = need.max() - fleet.free  # the preset needing most bytes is short wherever any is
        workers = np.flatnonzero(largest > 0)
        if not len(workers) or not len(fleet.release_key):
            return None, fits
        missing = need[:, None] - fleet.free[workers]  # [P, Ws]
        first, last = fleet.release_first[workers], fleet.release_last[workers]
        index = np.searchsorted(fleet.release_key, missing + workers * _SPAN)  # the row whose finish frees enough
        index = np.minimum(np.maximum(index, first), np.maximum(last, first))
        waited = fleet.release_ms[np.minimum(index, len(fleet.release_ms) - 1)]
        wait = np.zeros(fits.shape)
        wait[:, workers] = np.where((missing > 0) & (last >= first), waited, 0.0) * fleet.calibration[workers]
        return wait, fits

    def sequence_bytes(self, context: int) -> np.ndarray:
        return self._bytes.sequence_bytes(context)


class _BytesModel:
    """Cache bytes of each preset at a context, as const + attention slope * c + window slope * min(c, window)."""

    def __init__(self, speed: SpeedModel, presets: list[PresetInfo]):
        memory = speed.memory
        self.const = np.zeros(len(presets))
        self.per_token = np.zeros(len(presets))
        self.windowed: dict[int, np.ndarray] = {}
        for i, preset in enumerate(presets):
            for layer, mixer in enumerate(preset.placement):
                shape = memory.layers[layer][mixer]
                if isinstance(shape, AttentionShape):
                    token = shape.token_bytes(memory.kv_bytes)
                    if shape.window is None:
                        self.per_token[i] += token
                    else:
                        self.windowed.setdefault(shape.window, np.zeros(len(presets)))[i] += token
                else:
                    self.const[i] += shape.cache_bytes(0, memory.kv_bytes, memory.state_bytes)

    def sequence_bytes(self, context: int) -> np.ndarray:
        total = self.const + self.per_token * context
        for window, per_token in self.windowed.items():
            total = total + per_token * min(context, window)
        return total
