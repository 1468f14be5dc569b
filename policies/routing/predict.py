"""Predicted queue wait, time to first token, time per output token and completion, per (preset, worker).

Per worker snapshot (``WorkerView``, computed once per snapshot, not per
request) the step time of its running batch and the *marginal* cost of one
more row of each mixer in each layer, linear in the new row's context:

    step(batch + row of placement p at context c) = base + shared_and_head + sum_l (A[l, p_l] + c * B[l, p_l])

Per request everything is a few numpy operations over [presets x workers]:

    tpot       = calibration * (base + marginal(p, c))
    queue wait = calibration * waiting prompt tokens * prefill cost + wait for cache memory (rows finishing)
    ttft       = queue wait + prefill(p, prompt) + chunks * current step time
    completion = ttft + (max_tokens - 1) * tpot
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from policies.cost import SpeedModel
from policies.memory import AttentionShape
from policies.placement import MIXERS, Mixer, Placement
from policies.routing.types import PresetInfo, RoutingRequest, WorkerState

_M = {m: i for i, m in enumerate(MIXERS)}
_CONTEXT_PROBE = 4096  # tokens: the slope of a row's cost in its own context is measured over this span


def one_hot(placements: list[Placement], num_layers: int) -> np.ndarray:
    """[P, L*4] indicator of (layer, mixer)."""
    out = np.zeros((len(placements), num_layers * len(MIXERS)))
    for i, placement in enumerate(placements):
        for layer, mixer in enumerate(placement):
            out[i, layer * len(MIXERS) + _M[mixer]] = 1.0
    return out


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A worker snapshot turned into the numbers predictions need."""

    state: WorkerState
    base_ms: float  # one decode step of the running batch
    marginal_fixed_ms: float  # shared layers and head, one more row
    marginal: np.ndarray  # [L*4]: one more row of mixer m at layer l, context 0
    slope: np.ndarray  # [L*4]: per token of that row's context
    release_ms: np.ndarray  # sorted: when each running row finishes
    release_bytes: np.ndarray  # cumulative bytes freed by then


class Predictor:
    def __init__(self, speed: SpeedModel, presets: list[PresetInfo]):
        self.speed = speed
        self.presets = presets
        self.num_layers = speed.num_layers
        self.onehot = one_hot([p.placement for p in presets], self.num_layers)  # [P, L*4]
        self.quality = np.array([p.quality for p in presets])
        # Prefill cost per prompt token of each preset at each profiled context: [P, G].
        per_mixer = np.array([[speed.mixer_prefill_per_token(m, c).ms if m in speed.mixers else np.inf
                               for c in speed.prefill_contexts] for m in MIXERS])  # [4, G]
        layer_mixers = self.onehot.reshape(len(presets), self.num_layers, len(MIXERS)).sum(1)  # [P, 4]
        self.prefill_per_token = layer_mixers @ per_mixer
        self.prefill_contexts = np.array(speed.prefill_contexts, dtype=float)
        self.chunk = speed.prefill_chunk
        self.chunk_fixed_ms = self.num_layers * speed.shared(self.chunk).ms + speed.head(1).ms
        self._bytes = _BytesModel(speed, presets)

    # ---- per snapshot ----

    def view(self, state: WorkerState) -> WorkerView:
        speed, rows = self.speed, [(r.placement, r.context_tokens) for r in state.running]
        batch = len(rows) + state.in_flight
        base = speed.step(rows).ms if rows else 0.0
        if state.in_flight and rows:  # rows dispatched since the snapshot: assume they look like the rest
            base *= batch / len(rows)
        fixed = self._shared_and_head(batch + 1) - self._shared_and_head(batch)
        counts = np.zeros((self.num_layers, len(MIXERS)))
        contexts = np.zeros((self.num_layers, len(MIXERS)))
        for placement, context in rows:
            for layer, mixer in enumerate(placement):
                counts[layer, _M[mixer]] += 1
                contexts[layer, _M[mixer]] += context
        marginal = np.zeros((self.num_layers, len(MIXERS)))
        slope = np.zeros_like(marginal)
        cache: dict[tuple, tuple[float, float]] = {}
        for layer in range(self.num_layers):
            for mixer in speed.mixers:
                n, total = counts[layer, _M[mixer]], contexts[layer, _M[mixer]]
                key = (mixer, n, total)
                if key not in cache:
                    now = speed.mixer_decode(mixer, int(n), total / n).ms if n else 0.0
                    at0 = speed.mixer_decode(mixer, int(n) + 1, total / (n + 1)).ms
                    at_probe = speed.mixer_decode(mixer, int(n) + 1, (total + _CONTEXT_PROBE) / (n + 1)).ms
                    cache[key] = (at0 - now, (at_probe - at0) / _CONTEXT_PROBE)
                marginal[layer, _M[mixer]], slope[layer, _M[mixer]] = cache[key]
        order = sorted(state.running, key=lambda r: r.remaining_tokens)
        step = max(base, 1e-3)
        release_ms = np.array([r.remaining_tokens * step for r in order])
        release_bytes = np.cumsum([r.cache_bytes for r in order]) if order else np.zeros(0)
        return WorkerView(state, base, fixed, marginal.ravel(), slope.ravel(), release_ms, np.asarray(release_bytes))

    def _shared_and_head(self, rows: int) -> float:
        return self.num_layers * self.speed.shared(rows).ms + self.speed.head(rows).ms if rows else 0.0

    # ---- per request ----

    def predict(self, request: RoutingRequest, views: list[WorkerView]) -> dict[str, np.ndarray]:
        """Arrays of shape [presets, workers]: queue_wait, ttft, tpot, completion (ms) and fits (bool)."""
        n_prompt = request.prompt_tokens
        marginal = np.stack([v.marginal for v in views], axis=1)  # [L*4, W]
        slope = np.stack([v.slope for v in views], axis=1)
        base = np.array([v.base_ms + v.marginal_fixed_ms for v in views])  # [W]
        calibration = np.array([v.state.calibration for v in views])
        context = n_prompt + request.max_tokens / 2  # the row's mean context while it decodes
        tpot = calibration * (base + self.onehot @ (marginal + context * slope))  # [P, W]
        # Prefill: per-token cost at the prompt's mean context (exact when linear in context).
        per_token = _interp_rows(self.prefill_contexts, self.prefill_per_token, n_prompt / 2)  # [P]
        chunks = math.ceil(n_prompt / self.chunk)
        prefill = chunks * self.chunk_fixed_ms + n_prompt * per_token  # [P]
        running_step = np.array([v.base_ms for v in views])
        waiting = np.array([v.state.waiting_prompt_tokens for v in views], dtype=float)
        queue = waiting * float(per_token.mean()) + np.array([v.state.waiting_requests for v in views]) * \
            self.chunk_fixed_ms
        need = self._bytes.sequence_bytes(n_prompt + request.max_tokens)  # [P]
        free = np.array([v.state.cache_free_bytes for v in views], dtype=float)
        budget = np.array([v.state.cache_budget_bytes for v in views], dtype=float)
        memory_wait, fits = self._memory_wait(need, free, budget, views)
        queue_wait = calibration * (queue + memory_wait)  # [P, W] (broadcast)
        ttft = queue_wait + calibration * (prefill[:, None] + chunks * running_step[None, :])
        completion = ttft + max(request.max_tokens - 1, 0) * tpot
        return {"queue_wait": queue_wait, "ttft": ttft, "tpot": tpot, "completion": completion, "fits": fits}

    @staticmethod
    def _memory_wait(need: np.ndarray, free: np.ndarray, budget: np.ndarray, views: list[WorkerView]):
        """How long until enough running rows finish to free ``need`` bytes; ``fits``: ever, on an empty worker."""
        short = need[:, None] - free[None, :]  # [P, W]: bytes missing now
        fits = need[:, None] <= budget[None, :]
        wait = np.zeros_like(short)
        for w in np.nonzero((short > 0).any(axis=0))[0]:  # only workers short for some preset
            view, missing = views[w], short[:, w]
            if len(view.release_bytes) == 0:
                continue
            index = np.minimum(np.searchsorted(view.release_bytes, missing), len(view.release_bytes) - 1)
            wait[:, w] = np.where(missing > 0, view.release_ms[index], 0.0)
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


def _interp_rows(xs: np.ndarray, ys: np.ndarray, x: float) -> np.ndarray:
    """Linear interpolation of every row of ``ys`` [P, G] at ``x``; beyond the grid, along the last segment."""
    if len(xs) == 1:
        return ys[:, 0]
    i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[:, i] + max(t, 0.0) * (ys[:, i + 1] - ys[:, i])
