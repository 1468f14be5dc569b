"""The supernet_* metrics (docs/metrics.md): recorded with ``ray.util.metrics`` in every process that owns them.

Each Ray node's metrics agent exports what its processes record on the node's metrics export port
(``/metrics``; 8080 on KubeRay), with a ``ray_`` prefix that the scrape config strips again
(``metric_relabel_configs``, see docs/metrics.md). One owner per series: the ingress records request
metrics and the per-replica routing view, ``WorkerMetrics`` (injected into each worker replica)
records engine load, the autoscaling policy (router/autoscaling.py) records its decisions.
Every series carries ``application`` (the Serve application); ``preset`` is the preset name,
``custom`` for a placement that is no preset and ``none`` before one was chosen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from ray.util import metrics as ray_metrics

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_TOKEN_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]
_OVERHEAD_S = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]
_RATIO = [0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.11, 1.25, 1.5, 2, 4]

# name -> (kind, description, labels besides `application`, histogram buckets)
SPECS = {
    "supernet_requests_total": ("counter", "Requests by preset and outcome.", ("preset", "outcome"), None),
    "supernet_time_to_first_token_seconds": ("histogram", "Time to first token.", ("preset",), _LATENCY_S),
    "supernet_time_per_output_token_seconds": ("histogram", "Time per output token after the first.",
                                               ("preset",), _TOKEN_S),
    "supernet_request_duration_seconds": ("histogram", "End-to-end request time.", ("preset",), _LATENCY_S),
    "supernet_sla_met_total": ("counter", "Latency budgets met, by kind.", ("preset", "kind"), None),
    "supernet_sla_missed_total": ("counter", "Latency budgets missed, by kind.", ("preset", "kind"), None),
    "supernet_shed_total": ("counter", "Requests refused with 429, by reason.", ("reason",), None),
    "supernet_prediction_ratio": ("histogram", "Measured / predicted latency, by kind.", ("preset", "kind"), _RATIO),
    "supernet_downgrades_total": ("counter", "Requests served a faster preset than the best, because of the "
                                             "budget or the load.", ("preset", "reason"), None),
    "supernet_quality_served_total": ("counter", "Sum of the predicted quality of served requests.",
                                      ("preset",), None),
    "supernet_router_overhead_seconds": ("histogram", "Ingress time before the worker call: validation, "
                                                      "tokenization, routing.", ("preset",), _OVERHEAD_S),
    "supernet_requests_in_flight": ("gauge", "Requests an ingress replica accepted and has not ended yet.", (), None),
    "supernet_calibration_factor": ("gauge", "Measured / predicted step time per worker replica.", ("replica",), None),
    "supernet_predicted_step_seconds": ("gauge", "Predicted decode step of a replica's running batch.",
                                        ("replica",), None),
    "supernet_measured_step_seconds": ("gauge", "Measured decode step (median of recent).", ("replica",), None),
    "supernet_waiting_requests": ("gauge", "Requests waiting in a worker's queue.", ("replica",), None),
    "supernet_running_rows": ("gauge", "Rows in a worker's running batch, by preset.", ("replica", "preset"), None),
    "supernet_cache_used_bytes": ("gauge", "Sequence cache bytes reserved.", ("replica",), None),
    "supernet_cache_free_bytes": ("gauge", "Sequence cache bytes free.", ("replica",), None),
    "supernet_engine_busy_seconds_total": ("counter", "Seconds the engine spent stepping.", ("replica",), None),
    "supernet_engine_steps_total": ("counter", "Model steps.", ("replica",), None),
    "supernet_engine_rows_total": ("counter", "Rows over all steps (divide by steps: batch size).", ("replica",), None),
    "supernet_generated_tokens_total": ("counter", "Tokens generated.", ("replica",), None),
    "supernet_drafted_tokens_total": ("counter", "Speculative tokens a draft proposed and its target verified.",
                                      ("replica", "target", "draft"), None),
    "supernet_accepted_tokens_total": ("counter", "Speculative tokens the target kept.",
                                       ("replica", "target", "draft"), None),
    "supernet_speculation_acceptance_rate": ("gauge", "Per-token acceptance of a (target, draft) pair since the "
                                                      "replica started.", ("replica", "target", "draft"), None),
    "supernet_autoscaler_desired_replicas": ("gauge", "Worker replicas the autoscaler asks for.", ("deployment",), None),
    "supernet_autoscaler_replicas": ("gauge", "Worker replicas running.", ("deployment",), None),
    "supernet_autoscaler_decisions_total": ("counter", "Autoscaler evaluations, by reason.",
                                            ("deployment", "reason"), None),
    "supernet_autoscaler_signal": ("gauge", "The autoscaler's inputs.", ("deployment", "signal"), None),
}
OUTCOMES = ("ok", "shed", "invalid", "error", "cancelled")
log = logging.getLogger(__name__)
BUDGET_KINDS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "deadline": "deadline_ms"}


def replica_identity() -> tuple[str, str]:
    """(application, replica id) of the Serve replica this runs in; empty strings elsewhere."""
    try:
        from ray import serve

        context = serve.get_replica_context()
        return context.app_name or "", context.replica_id.unique_id
    except Exception:  # noqa: BLE001: not inside a replica (tests, the driver)
        return "", ""


class Recorder:
    """This process's metric objects, made on first use, with `application` filled in."""

    def __init__(self, application: str, enabled: bool = True):
        self.application, self.enabled = application, enabled
        self._metrics: dict[str, object] = {}
        self._lock = threading.Lock()

    def _get(self, name: str):
        metric = self._metrics.get(name)
        if metric is None:
            kind, description, labels, buckets = SPECS[name]
            keys = ("application", *labels)
            with self._lock:
                metric = self._metrics.get(name)
                if metric is None:
                    if kind == "counter":
                        metric = ray_metrics.Counter(name, description, keys)
                    elif kind == "gauge":
                        metric = ray_metrics.Gauge(name, description, keys)
                    else:
                        metric = ray_metrics.Histogram(name, description, buckets, keys)
                    self._metrics[name] = metric
        return metric

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        if value > 0:
            self._record(name, "inc", value, labels)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._record(name, "set", value, labels)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._record(name, "observe", value, labels)

    def _record(self, name: str, method: str, value: float, labels: dict) -> None:
        if not self.enabled:
            return
        try:
            getattr(self._get(name), method)(value, tags={"application": self.application, **labels})
        except Exception:  # noqa: BLE001: a metric never breaks serving
            log.warning("recording %s failed", name, exc_info=True)


def outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 429:
        return "shed"
    if status == 499:
        return "cancelled"
    return "invalid" if status < 500 else "error"


class RequestMetrics:
    """The ingress's per-request metrics; ``prepared`` is a router.gateway.Prepared."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def in_flight(self, count: int) -> None:
        """Requests this ingress accepted and has not ended yet."""
        self.recorder.set("supernet_requests_in_flight", count)

    def routed(self, prepared, overhead_s: float) -> None:
        preset = prepared.preset_label
        self.recorder.observe("supernet_router_overhead_seconds", overhead_s, preset=preset)
        if prepared.downgrade is not None:
            self.recorder.inc("supernet_downgrades_total", preset=preset, reason=prepared.downgrade)

    def refused(self, prepared, status: int, shed_reason: str | None) -> None:
        """A request that ended with an HTTP error before its first token."""
        outcome = outcome_of(status)
        self.recorder.inc("supernet_requests_total", preset=prepared.preset_label if prepared else "none",
                          outcome=outcome)
        if outcome == "shed":
            self.recorder.inc("supernet_shed_total", reason=shed_reason or "unknown")

    def finished(self, prepared, outcome: str, first_at: float | None, tokens: int, now: float | None = None) -> None:
        """A request that reached a worker ended: "ok", "error" (mid-stream) or "cancelled". Times: monotonic."""
        rec, preset, routing = self.recorder, prepared.preset_label, prepared.routing
        rec.inc("supernet_requests_total", preset=preset, outcome=outcome)
        if outcome != "ok":
            return
        duration = (time.monotonic() if now is None else now) - prepared.started
        ttft = first_at - prepared.started if first_at is not None else None
        tpot = (duration - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
        rec.observe("supernet_request_duration_seconds", duration, preset=preset)
        if ttft is not None:
            rec.observe("supernet_time_to_first_token_seconds", ttft, preset=preset)
        if tpot is not None:
            rec.observe("supernet_time_per_output_token_seconds", tpot, preset=preset)
        if routing.predicted_quality is not None:
            rec.inc("supernet_quality_served_total", routing.predicted_quality, preset=preset)
        for kind, measured, predicted_ms in (("ttft", ttft, routing.predicted_ttft_ms),
                                             ("tpot", tpot, routing.predicted_tpot_ms)):
            if measured is not None and predicted_ms:
                rec.observe("supernet_prediction_ratio", measured / (predicted_ms / 1000), preset=preset, kind=kind)
        sla = prepared.sla
        if sla is None:
            return
        for kind, measured in (("ttft", ttft), ("tpot", tpot), ("deadline", duration)):
            budget_ms = getattr(sla, BUDGET_KINDS[kind])
            if budget_ms is not None and measured is not None:
                met = measured * 1000 <= budget_ms
                rec.inc("supernet_sla_met_total" if met else "supernet_sla_missed_total", preset=preset, kind=kind)

    def replicas(self, routing, replicas: list) -> None:
        """Per-replica routing view (calibration, predicted and measured step): call periodically."""
        from policies.placement import Placement

        for replica in replicas:
            replica_id = replica.replica_id.unique_id
            self.recorder.set("supernet_calibration_factor", routing.calibration.get(replica_id, 1.0),
                              replica=replica_id)
            stats = replica.routing_stats or {}
            running, measured_ms = stats.get("running") or (), stats.get("decode_step_ms")
            if not running or not measured_ms:
                continue
            rows = [(Placement.parse(code, routing.num_layers), int(context)) for code, context, *_ in running]
            self.recorder.set("supernet_predicted_step_seconds", routing.predictor.speed.step(rows).ms / 1000,
                              replica=replica_id)
            self.recorder.set("supernet_measured_step_seconds", measured_ms / 1000, replica=replica_id)


class WorkerMetrics:
    """A worker replica's observer (``WorkerServer(..., observer=)``): engine load as metrics, and the
    in-process autoscaling stats that Serve pulls with ``record_autoscaling_stats``.

    ``presets``: placement code -> preset name. Plain values only: it is pickled to the replicas.
    """

    def __init__(self, presets: dict[str, str], enabled: bool = True, window_s: float = 60.0):
        self.presets, self.enabled, self.window_s = dict(presets), enabled, window_s
        self._recorder: Recorder | None = None
        self._replica = ""
        self._last_steps = 0
        self._last_step_end = float("-inf")
        self._speculated: dict[tuple[str, str], tuple[int, int]] = {}  # (target, draft) -> (drafted, accepted)
        self._started = time.monotonic()
        self._done: deque[tuple[float, dict]] = deque()  # (when, what one finished request tells the autoscaler)
        self._cache: deque[tuple[float, int, int]] = deque()  # (when, cache bytes reserved, free)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"presets": self.presets, "enabled": self.enabled, "window_s": self.window_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _rec(self) -> Recorder:
        if self._recorder is None:
            application, self._replica = replica_identity()
            self._recorder = Recorder(application, self.enabled)
        return self._recorder

    def observe(self, stats) -> None:
        """Engine load from a stats snapshot (workers.engine.stats.EngineStats); called every stats period."""
        rec, now = self._rec(), time.monotonic()
        replica = self._replica
        rec.set("supernet_waiting_requests", stats.num_waiting, replica=replica)
        rec.set("supernet_cache_used_bytes", stats.cache_used_bytes, replica=replica)
        rec.set("supernet_cache_free_bytes", stats.cache_free_bytes, replica=replica)
        rows = {name: 0 for name in self.presets.values()} | {"custom": 0}
        for code, count in stats.running_counts().items():
            rows[self.presets.get(code, "custom")] += count
        for name, count in rows.items():
            rec.set("supernet_running_rows", count, replica=replica, preset=name)
        with self._lock:
            new = [s for s in stats.recent_steps if s.ended_at > self._last_step_end]
            steps, self._last_steps = stats.num_steps - self._last_steps, stats.num_steps
            if new:
                self._last_step_end = new[-1].ended_at
            scale = steps / len(new) if new and steps > len(new) else 1.0  # steps that fell out of the history
            busy = scale * sum(s.seconds for s in new)
            self._cache.append((now, stats.cache_used_bytes, stats.cache_free_bytes))
            self._trim(now)
        rec.inc("supernet_engine_busy_seconds_total", busy, replica=replica)
        rec.inc("supernet_engine_steps_total", steps, replica=replica)
        rec.inc("supernet_engine_rows_total", scale * sum(s.num_rows for s in new), replica=replica)
        rec.inc("supernet_generated_tokens_total", scale * sum(s.num_generated for s in new), replica=replica)
        for pair in stats.speculation:
            labels = {"replica": replica, "target": self.presets.get(pair.target, pair.target),
                      "draft": self.presets.get(pair.draft, pair.draft)}
            drafted, accepted = self._speculated.get((pair.target, pair.draft), (0, 0))
            self._speculated[pair.target, pair.draft] = (pair.drafted, pair.accepted)
            rec.inc("supernet_drafted_tokens_total", pair.drafted - drafted, **labels)
            rec.inc("supernet_accepted_tokens_total", pair.accepted - accepted, **labels)
            if pair.acceptance_rate is not None:
                rec.set("supernet_speculation_acceptance_rate", pair.acceptance_rate, **labels)

    def request_done(self, request: dict, ttft_s: float | None, duration_s: float, tokens: int) -> None:
        """One request finished on this replica (worker-side times, for the in-process autoscaling stats)."""
        sla = request.get("sla") or {}
        tpot_s = (duration_s - ttft_s) / (tokens - 1) if ttft_s is not None and tokens > 1 else None
        checks = [(sla.get(field), measured) for field, measured in
                  (("ttft_ms", ttft_s), ("tpot_ms", tpot_s), ("deadline_ms", duration_s))]
        checks = [1000 * measured <= budget for budget, measured in checks if budget is not None and measured is not None]
        entry = {"ttft_s": ttft_s, "tpot_s": tpot_s, "checks": len(checks), "met": sum(checks),
                 "load_downgrade": request.get("downgrade") == "load"}
        with self._lock:
            self._done.append((time.monotonic(), entry))

    def _trim(self, now: float) -> None:
        for queue in (self._done, self._cache):
            while queue and queue[0][0] < now - self.window_s:
                queue.popleft()

    def autoscaling_stats(self, waiting: int) -> dict[str, float]:
        """This replica's signals over the window (names in router/autoscaling.py: IN_PROCESS_KEYS)."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            window = max(min(self.window_s, now - self._started), 1e-3)
            done = [entry for _, entry in self._done]
            cache = list(self._cache)
        out = {"waiting_requests": float(waiting),
               "requests_per_s": len(done) / window, "requests": float(len(done)),
               "load_downgrades": float(sum(e["load_downgrade"] for e in done)),
               "budget_checks": float(sum(e["checks"] for e in done)), "budget_met": float(sum(e["met"] for e in done))}
        for key in ("ttft_s", "tpot_s"):
            values = sorted(e[key] for e in done if e[key] is not None)
            if values:
                out[f"{key[:-2]}_p90_s"] = values[min(int(0.9 * len(values)), len(values) - 1)]
        if cache:  # means over the window, as Prometheus's avg_over_time
            out["cache_used_bytes"] = float(sum(used for _, used, _ in cache) / len(cache))
            out["cache_free_bytes"] = float(sum(free for _, _, free in cache) / len(cache))
        return out
