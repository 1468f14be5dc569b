"""The ingress's routing service: replica stats -> WorkerState, the policy's decision, online calibration.

Calibration: each replica's recent decode-only steps (measured) against the
speed table's prediction for its running batch give a factor that scales later
predictions for that replica (an exponential moving average, exported as a
metric). In-flight requests dispatched since the last stats snapshot count as
extra rows, so decisions between snapshots do not pile onto one replica; a dispatch never seen to finish
(a stream abandoned before it started) ages out after ``STALE_AFTER_S``.

Downgrade labels ask the same, calibrated policy what the request would get on idle replicas.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from policies.errors import InvalidRequest
from policies.placement import Placement
from policies.routing import Decision, RoutingRequest, build_policy
from policies.routing.predict import Predictor
from policies.routing.types import PresetInfo, RunningRow, WorkerState
from policies.speculation import AcceptanceRates
from policies.tables import AcceptanceFile, check_layers, read_speed_model, read_table

log = logging.getLogger(__name__)

STALE_AFTER_S = 30.0  # stats older than this are ignored: the replica is treated by in-flight counts only
CALIBRATION_WEIGHT = 0.2  # EMA weight of each new measurement
CALIBRATION_LIMITS = (0.2, 20.0)


class RoutingService:
    def __init__(self, policy_name: str, speed_path: str, presets: list[PresetInfo], num_layers: int,
                 default_preset: str | None, margin: float, acceptance_path: str | None = None,
                 clock: Callable[[], float] = time.time, future_load_quantile: float = 0.95,
                 prefill_chunk: int | None = None, protect_running: bool = True):
        speed = read_speed_model(speed_path)
        if speed.num_layers != num_layers:
            raise InvalidRequest(f"{speed_path}: the speed table has {speed.num_layers} layers, the model {num_layers}")
        self.predictor = Predictor(speed, presets, prefill_chunk)
        self.acceptance = None
        if acceptance_path is not None:
            table = read_table(acceptance_path, AcceptanceFile)
            check_layers(f"{acceptance_path} (acceptance table)", table.fingerprint.num_layers, "the model", num_layers)
            self.acceptance = AcceptanceRates.from_table(table)
        self.policy = build_policy(policy_name, self.predictor, default_preset, margin, self.acceptance,
                                   future_load_quantile, protect_running)
        self.num_layers = num_layers
        self.clock = clock  # wall time: snapshots carry the worker's time.time()
        self.calibration: dict[str, float] = {}
        self._speculation: dict[str, dict[tuple[str, str], tuple[int, int]]] = {}  # replica -> pair -> counts
        self._in_flight: dict[str, dict[str, float]] = {}  # replica -> request id -> when it was dispatched
        self._finished: dict[str, dict[str, float]] = {}  # replica -> request id -> when it finished here
        self._snapshots: dict[str, tuple[float, WorkerState]] = {}  # replica -> (stats time, state)
        self._idle: dict[str, WorkerState] = {}  # replica -> the same replica idle, with its calibration
        self._lock = threading.Lock()

    def decide(self, request: RoutingRequest, replicas: list) -> Decision:
        return self.policy.decide(request, self.states(replicas))

    def states(self, replicas: list) -> list[WorkerState]:
        """WorkerStates from Serve's replicas (``.replica_id.unique_id``, ``.routing_stats``); cached per snapshot."""
        states = []
        for replica in replicas:
            replica_id = replica.replica_id.unique_id
            stats = replica.routing_stats or {}
            taken = float(stats.get("taken_at", 0.0))
            with self._lock:  # dispatched after the snapshot was taken, so not in it yet
                in_flight = self._count_in_flight(replica_id, taken)
                gone = self._gone(replica_id, taken)
            cached = self._snapshots.get(replica_id)
            if cached is None or cached[0] != taken:  # a new measurement: calibrate on the rows it measured
                self._calibrate(replica_id, stats)
                self._observe_acceptance(replica_id, stats)
            if cached is None or cached[0] != taken or cached[1].in_flight != in_flight or cached[2] != gone:
                cached = (taken, self._state(replica_id, stats, in_flight, gone), gone)
                self._snapshots[replica_id] = cached
            states.append(cached[1])
        return states

    def _count_in_flight(self, replica_id: str, taken: float) -> int:
        dispatched = self._in_flight.get(replica_id)
        if not dispatched:
            return 0
        oldest = self.clock() - STALE_AFTER_S  # never seen to finish: abandoned before its stream started
        for request_id in [r for r, at in dispatched.items() if at < oldest]:
            del dispatched[request_id]
        return sum(1 for at in dispatched.values() if at > taken)

    def downgrade(self, decision: Decision, request: RoutingRequest, best_quality: float | None,
                  replicas: list) -> str | None:
        """Why a routed request got a faster preset than the best: ``budget`` (the best misses it even on idle
        replicas, under the calibration the decision used), ``load`` (it would not), or None (no downgrade)."""
        if (decision.shed or decision.prediction is None or best_quality is None or request.preset is not None
                or request.placement is not None or decision.prediction.quality >= best_quality):
            return None
        idle = self.policy.decide(request, self.idle_states(replicas))
        return "budget" if idle.sla_at_risk or idle.prediction.quality < best_quality else "load"

    def idle_states(self, replicas: list) -> list[WorkerState]:
        """Each replica with nothing running or queued, keeping its cache budget and its calibration (the same
        objects while those hold, so the policy's per-state caches stay warm)."""
        states = []
        for state in self.states(replicas):
            idle = self._idle.get(state.replica_id)
            if (idle is None or idle.calibration != state.calibration
                    or idle.cache_budget_bytes != state.cache_budget_bytes):
                idle = WorkerState(f"idle:{state.replica_id}", cache_budget_bytes=state.cache_budget_bytes,
                                   calibration=state.calibration)
                self._idle[state.replica_id] = idle
            states.append(idle)
        return states

    def _gone(self, replica_id: str, taken: float) -> frozenset[str]:
        """Requests seen to finish here after the snapshot of ``taken`` (they are in it, but no longer run).
        Those that finished before it are forgotten: a snapshot taken later no longer lists them."""
        finished = self._finished.get(replica_id)
        if not finished:
            return frozenset()
        oldest = max(taken, self.clock() - STALE_AFTER_S)  # (and no memory of requests past any snapshot's age)
        for request_id in [r for r, at in finished.items() if at < oldest]:
            del finished[request_id]
        return frozenset(finished)

    def _state(self, replica_id: str, stats: dict, in_flight: int, gone: frozenset[str] = frozenset()) -> WorkerState:
        age = self.clock() - float(stats.get("taken_at", 0.0))
        if not stats or age > STALE_AFTER_S:
            return WorkerState(replica_id, cache_budget_bytes=int(stats.get("cache_budget_bytes", 2**62)),
                               in_flight=in_flight, age_s=age, calibration=self.calibration.get(replica_id, 1.0))
        running = tuple(row for row, request_id in self._rows(stats) if request_id not in gone)
        return WorkerState(
            replica_id, running, int(stats.get("waiting_requests", 0)), int(stats.get("waiting_prompt_tokens", 0)),
            int(stats.get("prefill_backlog_tokens", 0)), int(stats.get("waiting_cache_bytes", 0)),
            int(stats.get("cache_budget_bytes", 0)), int(stats.get("cache_used_bytes", 0)),
            self.calibration.get(replica_id, 1.0), age, in_flight, float(stats.get("arrivals_per_s", 0.0)),
            float(stats.get("arrival_prompt_tokens", 0.0)))

    def _rows(self, stats: dict) -> list[tuple[RunningRow, str | None]]:
        """The snapshot's running rows and their request ids (None from workers that do not send them)."""
        allowances = stats.get("step_allowance_ms") or {}
        return [(RunningRow(Placement.parse(code, self.num_layers), int(context), int(remaining), int(size),
                            float(allowances.get(request_id[0], math.inf)) if request_id else math.inf),
                 request_id[0] if request_id else None)
                for code, context, remaining, size, *request_id in stats.get("running", ())]

    def _observe_acceptance(self, replica_id: str, stats: dict) -> None:
        """Each replica's speculation counts (cumulative per pair), summed over replicas into the policy's
        acceptance rates: the table's rates describe its own prompts, not this traffic's."""
        pairs = stats.get("speculation")
        if self.acceptance is None or not pairs:
            return
        self._speculation[replica_id] = {(t, d): (int(a), int(n)) for t, d, a, n in pairs}
        for pair in self._speculation[replica_id]:
            counts = [by_pair[pair] for by_pair in self._speculation.values() if pair in by_pair]
            self.acceptance.observe(*pair, sum(a for a, _ in counts), sum(n for _, n in counts))

    def _calibrate(self, replica_id: str, stats: dict) -> None:
        measured_ms = stats.get("decode_step_ms")
        if not measured_ms or self.clock() - float(stats.get("taken_at", 0.0)) > STALE_AFTER_S:
            return
        running = [row for row, _ in self._rows(stats)]
        if not running:
            return
        predicted = self.predictor.speed.step([(r.placement, r.context_tokens) for r in running]).ms
        if predicted <= 0:
            return
        ratio = min(max(measured_ms / predicted, CALIBRATION_LIMITS[0]), CALIBRATION_LIMITS[1])
        old = self.calibration.get(replica_id, ratio)
        self.calibration[replica_id] = (1 - CALIBRATION_WEIGHT) * old + CALIBRATION_WEIGHT * ratio

    def dispatched(self, replica_id: str | None, request_id: str) -> None:
        if replica_id:
            with self._lock:
                self._in_flight.setdefault(replica_id, {})[request_id] = self.clock()

    def finished(self, replica_id: str | None, request_id: str) -> None:
        if replica_id:
            with self._lock:
                self._in_flight.get(replica_id, {}).pop(request_id, None)
                self._finished.setdefault(replica_id, {})[request_id] = self.clock()
