"""Predicted queue wait, time to first token, time per output token and completion, per (preset, worker).

Per worker snapshot (``WorkerView``, built once per snapshot, not per request)
the step time of its running batch and the *marginal* cost of one more row of
each mixer in each layer, linear in the new row's context:

    step(batch + row of placement p at context c) = base + shared_and_head + sum_l (A[l, p_l] + c * B[l, p_l])

Stacked over workers (``Fleet``, rebuilt when a snapshot changes), what is left
per request is one compiled loop over the [presets x workers] pairs
(``kernels.forecast_pairs``):

    tpot       = calibration * (base + marginal(p, c))
    queue wait = calibration * (waiting prompt tokens * prefill cost + wait for cache memory: rows finishing)
    ttft       = queue wait + calibration * (prefill(p, prompt) + chunks * current step time)
    completion = ttft + (max_tokens - 1) * tpot

Grids are read with the same rules as ``policies.cost.interpolate`` (linear
inside, along the last segment above, held at the edge below), vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policies.cost import SpeedModel
from policies.errors import TableMismatch
from policies.memory import AttentionShape
from policies.placement import MIXERS, Placement
from policies.routing.kernels import forecast_pairs
from policies.routing.types import PresetInfo, RoutingRequest, WorkerState

_M = {m: i for i, m in enumerate(MIXERS)}
_CONTEXT_PROBE = 4096.0  # tokens: the slope of a row's cost in its own context is measured over this span


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
    interference_ms: float  # the prefill of a request as long as those arriving there lately


@dataclass(frozen=True, slots=True, eq=False)
class Fleet:
    """All workers' views stacked, with every request-independent product precomputed ([presets x workers])."""

    views: tuple[WorkerView, ...]
    # [2, P, W]: the calibrated step with one more row of the preset at context 0, and its growth per token of
    # the row's context: tpot = tpot_terms[0] + context * tpot_terms[1].
    tpot_terms: np.ndarray
    calibration: np.ndarray  # [W]
    # [2, W]: calibrated waiting prompt tokens (times a mean prefill cost per token) and fixed cost of the
    # waiting requests' prefill chunks: queue = [prefill per token, 1] @ queue_terms.
    queue_terms: np.ndarray
    step_now: np.ndarray  # [W]: calibrated step of the running batch (one rides along each prefill chunk)
    free: np.ndarray  # [W] bytes
    idle: np.ndarray  # [W] bool: nothing queues for admission
    budget: np.ndarray  # [W] bytes
    # Release curves, worker w's in [release_start[w], release_start[w + 1]): an entry at 0 bytes, one per
    # running row in finishing order (cumulative bytes freed, calibrated ms until then), and one at infinite
    # bytes (the last finish: the longest wait there is).
    release_bytes: np.ndarray
    release_ms: np.ndarray
    release_start: np.ndarray  # [W + 1] int64
    arrivals_per_ms: np.ndarray  # [W]: requests reaching each worker (kernels.add_future_load)
    interference_ms: np.ndarray  # [W]: calibrated prefill of a typical arrival there, stretching every decode
    # [W]: the longest step the running rows there can still take within their TPOT budgets: the tightest
    # allowance among rows that today's step still meets (inf: none has a budget; rows already lost do not
    # hold the others back).
    step_cap: np.ndarray

    @classmethod
    def stack(cls, views: tuple[WorkerView, ...], onehot: np.ndarray, chunk_fixed_ms: float, chunk: int) -> "Fleet":
        def column(get) -> np.ndarray:
            return np.array([get(v) for v in views], dtype=float)

        calibration = column(lambda v: v.state.calibration)
        marginal = onehot @ np.stack([v.marginal for v in views], axis=1)
        slope = onehot @ np.stack([v.slope for v in views], axis=1)
        base = column(lambda v: v.base_ms)
        prompts = column(lambda v: v.state.waiting_prompt_tokens + v.state.prefill_backlog_tokens)
        waiting = column(lambda v: v.state.waiting_requests + v.state.in_flight)
        tpot_base = base + column(lambda v: v.marginal_fixed_ms) + marginal
        # Each queued prompt chunk rides along one decode step of the batch.
        queue_fixed = column(lambda v: v.state.waiting_requests) * chunk_fixed_ms + np.ceil(prompts / chunk) * base
        curves_bytes, curves_ms = [], []
        for v in views:
            last = v.release_ms[-1] if len(v.release_ms) else 0.0
            curves_bytes.append(np.concatenate([[0.0], v.release_bytes, [np.inf]]))
            curves_ms.append(np.concatenate([[0.0], v.release_ms, [last]]) * v.state.calibration)
        return cls(
            views,
            tpot_terms=calibration * np.stack([tpot_base, slope]),
            calibration=calibration,
            queue_terms=calibration * np.stack([prompts, queue_fixed]),
            step_now=calibration * base,
            free=column(lambda v: v.state.cache_free_bytes),
            idle=waiting == 0,
            budget=column(lambda v: v.state.cache_budget_bytes),
            release_bytes=np.concatenate(curves_bytes),
            release_ms=np.concatenate(curves_ms),
            release_start=np.cumsum([0] + [len(c) for c in curves_bytes]).astype(np.int64),
            arrivals_per_ms=column(lambda v: v.state.arrivals_per_s / 1000.0),
            interference_ms=calibration * column(lambda v: v.interference_ms),
            step_cap=np.array([_step_cap(v.state, now) for v, now in zip(views, calibration * base)]),
        )


def _step_cap(state: WorkerState, step_now_ms: float) -> float:
    savable = [r.step_allowance_ms for r in state.running if r.step_allowance_ms >= step_now_ms]
    return min(savable, default=np.inf)


@dataclass(frozen=True, slots=True, eq=False)
class Forecast:
    """One request's predictions on every (preset, worker) pair: [presets x workers] views, times in ms."""

    times: np.ndarray  # [4, P, W]: queue wait, ttft, tpot, completion
    flags: np.ndarray  # [2, P, W]: fits, admit_now

    @property
    def queue_wait(self) -> np.ndarray:
        """Prefill of the requests queued ahead, then the wait for cache memory."""
        return self.times[0]

    @property
    def ttft(self) -> np.ndarray:
        return self.times[1]

    @property
    def tpot(self) -> np.ndarray:
        return self.times[2]

    @property
    def completion(self) -> np.ndarray:
        return self.times[3]

    @property
    def fits(self) -> np.ndarray:
        """The cache fits the worker at all (once everything there has finished)."""
        return self.flags[0]

    @property
    def admit_now(self) -> np.ndarray:
        """No FIFO queue on the worker and the cache fits its free memory now."""
        return self.flags[1]

    def pair(self, p: int, w: int) -> tuple[float, float, float, float]:
        """(queue wait, ttft, tpot, completion) of one pair as Python floats."""
        times = self.times
        return times.item(0, p, w), times.item(1, p, w), times.item(2, p, w), times.item(3, p, w)


class Predictor:
    """``prefill_chunk``: prompt tokens the workers prefill per step (``worker.max_prefill_tokens``), which
    sets how many chunk steps a prompt takes; default: the chunk the table was profiled with."""

    def __init__(self, speed: SpeedModel, presets: list[PresetInfo], prefill_chunk: int | None = None):
        self.speed = speed
        self.presets = presets
        self.num_layers = speed.num_layers
        self._layer_index: dict[Placement, np.ndarray] = {}
        for preset in presets:
            speed.check_placement(preset.placement)
            if untimed := sorted(set(preset.placement) - set(speed.mixers)):
                raise TableMismatch(f"preset {preset.name!r} uses {', '.join(untimed)}, which the speed table "
                                    f"does not time: profile every mixer the presets use")
        self.onehot = np.zeros((len(presets), self.num_layers * len(MIXERS)))
        for i, preset in enumerate(presets):
            self.onehot[i, self._flat(preset.placement)] = 1.0
        self.quality = np.array([p.quality for p in presets])
        self.decode = {m: _Grid2D(speed.batches, speed.contexts, speed.decode_ms[m]) for m in speed.mixers}
        # Prefill cost per prompt token of each preset at each profiled context: [P, G].
        per_mixer = np.array([speed.prefill_ms_per_token[m] if m in speed.mixers  # untimed: no preset uses it
                              else np.zeros(len(speed.prefill_contexts)) for m in MIXERS])
        layer_mixers = self.onehot.reshape(len(presets), self.num_layers, len(MIXERS)).sum(1)  # [P, 4]
        self.prefill_per_token = layer_mixers @ per_mixer  # [P, G]
        self._mixer_counts = layer_mixers  # [P, 4]: layers per mixer
        self.prefill_contexts = np.asarray(speed.prefill_contexts, dtype=float)  # [G]
        self.chunk = prefill_chunk or speed.prefill_chunk
        # A prefill chunk's step: the shared layers on its tokens, one row's head and engine work.
        self.chunk_fixed_ms = self.num_layers * speed.shared(self.chunk).ms + speed.head(1).ms + speed.engine(1).ms
        self._bytes = _BytesModel(speed, presets)

    def _flat(self, placement: Placement) -> np.ndarray:
        """Indices into the flattened [L*4] (layer, mixer) axis."""
        index = self._layer_index.get(placement)
        if index is None:
            index = np.arange(self.num_layers) * len(MIXERS) + np.array([_M[m] for m in placement])
            self._layer_index[placement] = index
        return index

    def _shared_and_head(self, rows: int) -> float:
        """What a step of ``rows`` rows costs beside its mixers: shared layers, head and the engine's own work."""
        return self.speed.step_fixed(rows).ms if rows else 0.0

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
        return WorkerView(state, base, fixed, marginal, slope, release_ms, release_bytes,
                          self.prefill_ms(state.arrival_prompt_tokens))

    # ---- per request ----

    def predict(self, request: RoutingRequest, fleet: Fleet) -> Forecast:
        return Forecast(*forecast_pairs(
            float(request.prompt_tokens), float(request.max_tokens), float(self.chunk), self.chunk_fixed_ms,
            self.prefill_contexts, self.prefill_per_token, self._bytes.terms, self._bytes.windows,
            self._bytes.page_tokens,
            fleet.tpot_terms, fleet.calibration, fleet.queue_terms, fleet.step_now, fleet.free, fleet.idle,
            fleet.budget, fleet.release_bytes, fleet.release_ms, fleet.release_start))

    def sequence_bytes(self, context: int) -> np.ndarray:
        return self._bytes.sequence_bytes(context)

    def mixers_ms(self, preset: int, rows: float, context: float) -> float:
        """Uncalibrated decode time of the mixer layers alone for ``rows`` rows of a preset at ``context``
        (shared layers and head excluded): what a batch's rows of one placement cost a step."""
        counts = self._mixer_counts[preset]
        return float(sum(counts[_M[m]] * grid(np.array([rows], float), np.array([context], float))[0]
                         for m, grid in self.decode.items() if counts[_M[m]]))

    def prefill_ms(self, prompt_tokens: float) -> float:
        """Uncalibrated prefill of a prompt under no preset in particular (the presets' mean cost per token, as
        the queue is priced): what an arriving request of that length adds to the steps of everyone decoding."""
        if prompt_tokens <= 0:
            return 0.0
        per_token = float(np.interp(prompt_tokens / 2, self.prefill_contexts, self.prefill_per_token.mean(axis=0)))
        return prompt_tokens * per_token + np.ceil(prompt_tokens / self.chunk) * self.chunk_fixed_ms

    def prefill_ms_per_token(self, preset: int, context: float) -> float:
        """Uncalibrated prefill cost per token of a preset at a context (what a verify row's extra tokens and a
        draft's prefill cost), read along the profiled contexts."""
        return float(np.interp(context, self.prefill_contexts, self.prefill_per_token[preset]))


class _BytesModel:
    """Cache bytes of each preset at a context c, as the engine's pool reserves them (whole blocks):
    [1, pages(c), pages(min(c, window)) for each window] @ terms ([F, P]), pages(n) = ceil(n / page_tokens):
    the recurrent layers' blocks, full attention's block per page, each window's block per page."""

    def __init__(self, speed: SpeedModel, presets: list[PresetInfo]):
        memory = speed.memory
        block = memory.block_bytes
        const, per_page = np.zeros(len(presets)), np.zeros(len(presets))
        windowed: dict[int, np.ndarray] = {}
        for i, preset in enumerate(presets):
            for layer, mixer in enumerate(preset.placement):
                shape = memory.layers[layer][mixer]
                if isinstance(shape, AttentionShape):
                    if shape.window is None:
                        per_page[i] += block
                    else:
                        windowed.setdefault(shape.window, np.zeros(len(presets)))[i] += block
                else:
                    const[i] += block
        self.page_tokens = float(memory.page_tokens)
        self.windows = np.array(list(windowed), dtype=float)
        self.terms = np.stack([const, per_page, *windowed.values()])

    def sequence_bytes(self, context: int) -> np.ndarray:
        pages = [-(-n // int(self.page_tokens)) for n in [context] + [min(context, int(w)) for w in self.windows]]
        return np.dot([1] + pages, self.terms)
