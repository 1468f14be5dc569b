"""The simulated cluster behind bench/simulate.py: replicas that batch like the engine, timed by a speed table.

A replica admits FIFO while the request's cache (prompt + max_tokens) fits its
budget, runs one decode token per running row per step and up to ``chunk``
prompt tokens of prefill beside them, as ``workers/engine`` does. Step time
comes from the same speed table the router predicts with, so the simulator
tests the *decisions*, not the table.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from policies.placement import MIXERS
from policies.routing.arrivals import ArrivalMeter
from policies.routing.predict import Predictor
from policies.routing.types import RunningRow, WorkerState, step_allowance_ms


@dataclass(slots=True)
class SimRequest:
    arrival: float  # s
    prompt: int
    max_tokens: int
    ttft_ms: float | None
    tpot_ms: float | None
    deadline_ms: float | None
    priority: int
    kind: str
    preset: int = -1
    cache_bytes: int = 0
    prefill_left: int = 0
    generated: int = 0
    first_token: float | None = None
    finished: float | None = None
    shed: bool = False
    prediction: object = None  # what the router predicted when it placed the request

    def met(self) -> bool:
        if self.shed or self.finished is None:
            return False
        ttft = 1000 * (self.first_token - self.arrival)
        tpot = 1000 * (self.finished - self.first_token) / max(self.generated - 1, 1)
        total = 1000 * (self.finished - self.arrival)
        return ((self.ttft_ms is None or ttft <= self.ttft_ms) and (self.tpot_ms is None or tpot <= self.tpot_ms)
                and (self.deadline_ms is None or total <= self.deadline_ms))


@dataclass(slots=True)
class SimReplica:
    name: str
    budget: int
    predictor: Predictor
    running: list[SimRequest] = field(default_factory=list)
    waiting: deque = field(default_factory=deque)
    used: int = 0
    busy: bool = False
    finished: list = field(default_factory=list)
    arrivals: ArrivalMeter = field(default_factory=ArrivalMeter)  # requests sent here, counted as the worker does
    busy_s: float = 0.0  # engine busy seconds so far (supernet_engine_busy_seconds_total)
    # Decode time is recomputed when the decoding rows change and every ``reuse_steps`` steps (1: every step,
    # exact; more: contexts grow one token a step, so a few steps at the same time cost a small error, fast).
    reuse_steps: int = 1
    _decode: tuple = (None, 0.0, 0)  # (the decoding rows' ids, their decode ms, steps it was reused)

    def admit(self) -> None:
        while self.waiting and self.waiting[0].cache_bytes <= self.budget - self.used:
            request = self.waiting.popleft()
            request.prefill_left = request.prompt
            self.used += request.cache_bytes
            self.running.append(request)

    def _decode_ms(self, decoding: list[SimRequest]) -> float:
        """One decode token for each of ``decoding``: the speed table's shared/head cost and its mixer grids."""
        p = self.predictor
        width = p.num_layers * len(MIXERS)
        counts, totals = np.zeros(width), np.zeros(width)
        for r in decoding:
            index = p._flat(p.presets[r.preset].placement)
            counts[index] += 1
            totals[index] += r.prompt + r.generated
        ms = p._shared_and_head(len(decoding)) if decoding else 0.0
        for mixer, grid in p.decode.items():
            cells = slice(MIXERS.index(mixer), width, len(MIXERS))
            n, total = counts[cells], totals[cells]
            busy = n > 0
            if busy.any():
                ms += float(grid(n[busy], total[busy] / n[busy]).sum())
        return ms

    def step(self, now: float, chunk: int) -> float:
        """Advance one step from ``now``; returns its duration in seconds (tokens land at its end)."""
        p = self.predictor
        decoding = [r for r in self.running if r.prefill_left == 0]
        key, cached_ms, reused = self._decode
        rows = tuple(map(id, decoding))
        if rows == key and reused + 1 < self.reuse_steps:
            ms, self._decode = cached_ms, (key, cached_ms, reused + 1)
        else:
            ms = self._decode_ms(decoding)
            self._decode = (rows, ms, 0)
        budget, prefilled = chunk, []
        for r in self.running:  # prefill chunks in admission order, beside the decodes
            if r.prefill_left and budget:
                take = min(budget, r.prefill_left)
                start = r.prompt - r.prefill_left
                per_token = np.interp(start + take / 2, p.prefill_contexts, p.prefill_per_token[r.preset])
                ms += take * per_token
                budget -= take
                r.prefill_left -= take
                if r.prefill_left == 0:
                    prefilled.append(r)
        if budget < chunk:
            ms += p.chunk_fixed_ms * (chunk - budget) / chunk
        end = now + ms / 1000
        self.busy_s += ms / 1000
        for r in decoding + prefilled:
            r.generated += 1
            if r.first_token is None:
                r.first_token = end
        for r in [r for r in self.running if r.generated >= r.max_tokens]:
            r.finished = end
            self.finished.append(r)
            self.used -= r.cache_bytes
            self.running.remove(r)
        return ms / 1000

    def finished_since(self) -> list[SimRequest]:
        """Requests finished since the last call (the driver feeds them to the router's calibration)."""
        out, self.finished = self.finished, []
        return out

    def snapshot(self, now: float) -> WorkerState:
        presets = self.predictor.presets
        running = tuple(RunningRow(presets[r.preset].placement, r.prompt + r.generated, r.max_tokens - r.generated,
                                   r.cache_bytes, step_allowance_ms(r.tpot_ms, r.max_tokens, r.generated, 0.0 if
                                   r.first_token is None else 1000 * (now - r.first_token)))
                        for r in self.running)
        rate, prompt = self.arrivals.snapshot(now)
        return WorkerState(self.name, running, len(self.waiting), sum(r.prompt for r in self.waiting),
                           sum(r.prefill_left for r in self.running), sum(r.cache_bytes for r in self.waiting),
                           self.budget, self.used, arrivals_per_s=rate, arrival_prompt_tokens=prompt)
