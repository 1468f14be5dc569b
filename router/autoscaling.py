"""Ray Serve's custom autoscaling policy for the worker deployment: signals in, ``policies.autoscaling.decide`` out.

Serve (2.60) instantiates ``SupernetAutoscalingPolicy(**policy_kwargs)`` once in its controller and calls it
with an ``AutoscalingContext`` every control-loop tick (0.1 s); it returns ``(replicas, policy_state)``,
which Serve bounds by min/max replicas (its own up/downscale delays are set to 0: the decision has its own
timing). Every ``interval_s`` the policy reads the signals and decides:

- with ``prometheus_url``: PromQL over httpx, evaluated in a background thread (the controller's loop
  never waits on the network; results older than three intervals count as no data);
- without: the replicas' own windowed stats (``record_autoscaling_stats`` -> ``ctx.aggregated_metrics``).

The decision, its reason and its inputs are exported as supernet_autoscaler_* metrics. With Prometheus
down (or its last answer older than three intervals) the count holds and the reason says so:
``prometheus-unavailable`` (``no-signals`` is an answer with no data in it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import weakref

import httpx

from policies.autoscaling import ScalingConfig, ScalingState, Signals, decide, signals_from
from router.config import AutoscalingSettings
from router.metrics import Recorder

log = logging.getLogger(__name__)

POLICY_PATH = "router.autoscaling:SupernetAutoscalingPolicy"
_SIGNALS = ("sla_attainment", "ttft_s", "tpot_s", "queue_wait_s", "quality_debt", "utilisation")
_STATE_FIELDS = {f.name for f in dataclasses.fields(ScalingState)}


def scaling_config(settings: AutoscalingSettings) -> ScalingConfig:
    names = {f.name for f in dataclasses.fields(ScalingConfig)}
    return ScalingConfig(**{k: v for k, v in settings.model_dump().items() if k in names})


def serve_autoscaling_config(settings: AutoscalingSettings, initial_replicas: int) -> dict:
    """The worker deployment's ``autoscaling_config``."""
    from ray.serve.config import AutoscalingPolicy

    return {"min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
            "initial_replicas": initial_replicas, "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
            "look_back_period_s": max(settings.window_s, 11.0),  # the in-process stats' averaging window
            "policy": AutoscalingPolicy(policy_function=POLICY_PATH,
                                        policy_kwargs={"settings": settings.model_dump()})}


def queries(application: str, window_s: float) -> dict[str, str]:
    """PromQL for each raw input (names as in docs/metrics.md, after the scrape strips ``ray_``)."""
    app, w = f'application="{application}"', f"{max(int(math.ceil(window_s)), 1)}s"
    quantile = "histogram_quantile(0.9, sum by (le) (rate(supernet_{}_seconds_bucket{{{}}}[{}])))"
    return {
        "met": f"sum(increase(supernet_sla_met_total{{{app}}}[{w}]))",
        "missed": f"sum(increase(supernet_sla_missed_total{{{app}}}[{w}]))",
        "shed": f"sum(increase(supernet_shed_total{{{app}}}[{w}]))",
        "ttft": quantile.format("time_to_first_token", app, w),
        "tpot": quantile.format("time_per_output_token", app, w),
        "waiting": f"sum(avg_over_time(supernet_waiting_requests{{{app}}}[{w}]))",
        "arrivals": f'sum(rate(supernet_requests_total{{{app},outcome=~"ok|error|cancelled"}}[{w}]))',
        "load_downgrades": f'sum(increase(supernet_downgrades_total{{{app},reason="load"}}[{w}]))',
        "routed": f'sum(increase(supernet_requests_total{{{app},preset!="none"}}[{w}]))',
        "cache_used": f"sum(avg_over_time(supernet_cache_used_bytes{{{app}}}[{w}]))",
        "cache_free": f"sum(avg_over_time(supernet_cache_free_bytes{{{app}}}[{w}]))",
    }


def in_process_raw(aggregated: dict | None) -> dict[str, float]:
    """The replicas' ``record_autoscaling_stats`` (averaged by Serve over the look-back period), summed."""
    if not aggregated:
        return {}

    def total(key: str) -> float | None:
        values = list((aggregated.get(key) or {}).values())
        return float(sum(values)) if values else None

    raw = {"met": total("budget_met"), "missed": None, "waiting": total("waiting_requests"),
           "arrivals": total("requests_per_s"), "load_downgrades": total("load_downgrades"),
           "routed": total("requests"), "cache_used": total("cache_used_bytes"),
           "cache_free": total("cache_free_bytes")}
    checks = total("budget_checks")
    if checks is not None and raw["met"] is not None:
        raw["missed"] = max(checks - raw["met"], 0.0)
    for key in ("ttft", "tpot"):
        values = list((aggregated.get(f"{key}_p90_s") or {}).values())
        raw[key] = max(values) if values else None
    return {k: v for k, v in raw.items() if v is not None}


class PrometheusSource:
    """Evaluates the queries every ``interval_s`` in a daemon thread; ``read()`` never blocks on the network."""

    def __init__(self, url: str, named_queries: dict[str, str], interval_s: float, timeout_s: float = 5.0):
        self.url = url.rstrip("/") + "/api/v1/query"
        self.named_queries, self.interval_s, self.timeout_s = named_queries, interval_s, timeout_s
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._latest: tuple[float, dict[str, float]] | None = None
        threading.Thread(target=self._run, name="supernet-autoscaler-prometheus", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def read(self) -> dict[str, float] | None:
        """The latest results, or None when none is fresher than three intervals."""
        with self._lock:
            latest = self._latest
        if latest is None or time.monotonic() - latest[0] > 3 * self.interval_s + self.timeout_s:
            return None
        return latest[1]

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                try:
                    results = {name: value for name, query in self.named_queries.items()
                               if (value := self._query(client, query)) is not None}
                    with self._lock:
                        self._latest = (time.monotonic(), results)
                except Exception as exc:  # noqa: BLE001: Prometheus down: the data goes stale, the decision holds
                    log.warning("autoscaling: Prometheus at %s did not answer: %s", self.url, exc)
                self._stop.wait(self.interval_s)

    def _query(self, client: httpx.Client, query: str) -> float | None:
        body = client.get(self.url, params={"query": query}).raise_for_status().json()
        if body.get("status") != "success":
            raise RuntimeError(f"query {query!r} failed: {body.get('error')}")
        result = body["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return value if math.isfinite(value) else None


class SupernetAutoscalingPolicy:
    """``policy_kwargs``: ``{"settings": AutoscalingSettings as a dict}`` (JSON: Serve requires it)."""

    def __init__(self, settings: dict):
        self.settings = AutoscalingSettings.model_validate(settings)
        self.config = scaling_config(self.settings)
        self._source: PrometheusSource | None = None
        self._recorder: Recorder | None = None
        self.last_decision: tuple[int, str] | None = None  # (replicas, reason) of the last evaluation

    def __call__(self, ctx) -> tuple[int, dict]:
        now = ctx.current_time or time.time()
        saved = dict(ctx.policy_state.get("supernet") or {})
        evaluated_at = saved.pop("evaluated_at", None)
        if evaluated_at is not None and now - evaluated_at < self.settings.interval_s:
            return ctx.target_num_replicas, {"supernet": {**saved, "evaluated_at": evaluated_at}}
        signals = Signals(now, ctx.target_num_replicas)
        raw = self._raw(ctx)
        if raw:
            signals = signals_from(raw, ctx.target_num_replicas, ctx.current_num_replicas, now,
                                   self.settings.window_s)
        state = ScalingState(**{k: v for k, v in saved.items() if k in _STATE_FIELDS})
        replicas, state, reason = decide(signals, state, self.config)
        if raw is None and reason == "no-signals":  # not "nothing to report": no fresh answer at all
            reason = "prometheus-unavailable"
        self.last_decision = (replicas, reason)
        self._report(ctx, signals, replicas, reason)
        return replicas, {"supernet": {**dataclasses.asdict(state), "evaluated_at": now}}

    def _raw(self, ctx) -> dict[str, float] | None:
        """The raw sums; None when Prometheus gave no answer fresher than three intervals (down, or slow)."""
        if self.settings.prometheus_url is None:
            return in_process_raw(ctx.aggregated_metrics)
        if self._source is None:
            self._source = PrometheusSource(self.settings.prometheus_url,
                                            queries(ctx.app_name or "", self.settings.window_s),
                                            self.settings.interval_s)
            weakref.finalize(self, self._source.close)
        return self._source.read()

    def _report(self, ctx, signals: Signals, replicas: int, reason: str) -> None:
        if self._recorder is None:
            self._recorder = Recorder(ctx.app_name or "")
        rec, deployment = self._recorder, ctx.deployment_name
        rec.set("supernet_autoscaler_desired_replicas", replicas, deployment=deployment)
        rec.set("supernet_autoscaler_replicas", ctx.current_num_replicas, deployment=deployment)
        rec.inc("supernet_autoscaler_decisions_total", deployment=deployment, reason=reason)
        for name in _SIGNALS:
            value = getattr(signals, name)
            if value is not None:
                rec.set("supernet_autoscaler_signal", value, deployment=deployment, signal=name)
        if replicas != ctx.target_num_replicas:
            log.info("autoscaling %s/%s: %d -> %d replicas (%s) %s", ctx.app_name, deployment,
                     ctx.target_num_replicas, replicas, reason,
                     {name: getattr(signals, name) for name in _SIGNALS})
