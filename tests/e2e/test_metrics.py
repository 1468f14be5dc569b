"""Metrics, dashboards and the autoscaler, against a real Prometheus server scraping the running application.

One more application on the session's Serve ("scaled": budget routing, workers autoscaled from 1 to 2
replicas by router/autoscaling.py reading this Prometheus), a Prometheus on loopback scraping Ray's
metrics port every second, and bounded loads. Skipped, with the reason, if the prometheus binary is absent.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.prometheus import BINARY, MISSING, Prometheus

ROOT = Path(__file__).resolve().parents[2]
APP = "scaled"
SCALE_UP_WITHIN_S = 60.0  # from the start of the load to the autoscaler asking for a second worker replica
# From that decision to the replica running: Ray starts a process that imports torch and Ray and loads the
# checkpoint, on cores the load keeps busy (32 s on this 2-core VM; CI's machines are slower). Not the
# autoscaler's time, so it gets a wide bound of its own.
REPLICA_START_WITHIN_S = 240.0
SCALE_DOWN_WITHIN_S = 60.0  # from the end of the load to one worker replica again
PANELS_WITHIN_S = 120.0  # from the end of the load to every panel returning data (Ray exports, then Prometheus scrapes: slow under load)
# Prometheus scrapes Ray's metrics agent every SCRAPE_S, and gives up on a scrape after as long. By the time these
# tests run, the session's applications have left the agent thousands of series that take it about a second to
# answer on a busy 2-core machine: at a 1 s scrape, most scrapes timed out and no autoscaler series arrived
# within a minute (a CI failure). The autoscaler's window holds at least three scrapes.
SCRAPE_S = 3.0
AUTOSCALING = {  # short windows and periods, so that the test takes seconds, not minutes
    "enabled": True, "min_replicas": 1, "max_replicas": 2, "window_s": 4 * SCRAPE_S, "interval_s": 1,
    "sla_target": 0.5, "queue_wait_target_s": 0.05, "quality_debt_budget": 0.5, "debt_grace_s": 5,
    "utilisation_low": 0.5, "upscale_cooldown_s": 5, "downscale_stable_s": 5,
}


def documented_metrics() -> dict[str, str]:
    """name -> type, from the table in docs/metrics.md."""
    rows = re.findall(r"^\| `(supernet_[a-z0-9_]+)` \| (counter|gauge|histogram) \|", (ROOT / "docs" / "metrics.md")
                      .read_text(), flags=re.MULTILINE)
    return dict(rows)


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) for every target of every panel."""
    out = []
    for path in sorted((ROOT / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((path.name, panel["title"], target["expr"]))
    return out


def concrete(expr: str) -> str:
    """A panel's query as Grafana would send it for this application over the last minute."""
    return expr.replace("$application", APP).replace("$__rate_interval", "1m")


@pytest.fixture(scope="session")
def prometheus_binary():
    """Skips (before any cluster starts) where the Prometheus server is not installed."""
    if BINARY is None:
        pytest.skip(MISSING)
    return BINARY


@pytest.fixture(scope="module")
def prometheus(prometheus_binary, serve_cluster, tmp_path_factory):
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{serve_cluster.metrics_port}"],
                      scrape_interval_s=SCRAPE_S).start()
    yield prom
    prom.stop()


@pytest.fixture(scope="module")
def scaled(serve_cluster, prometheus, routed_tables, tiny_checkpoint):
    from ray import serve

    from router.app import build_app
    from router.config import AppConfig

    speed, presets = routed_tables
    config = {"model": {"checkpoint": str(tiny_checkpoint)}, "presets": presets, "tables": {"speed": str(speed)},
              "routing": {"stats_period_s": 0.2}, "ingress": {"model_name": "tiny"},
              "worker": {"cache_budget_bytes": 64 * 2**20, "max_running": 2},
              "autoscaling": {**AUTOSCALING, "prometheus_url": prometheus.url}}
    serve.run(build_app(AppConfig.from_dict(config)), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_cluster.url}/{APP}"
    serve.delete(APP)


def running_workers() -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    deployment = serve.status().applications[APP].deployments["SupernetWorker"]
    return deployment.replica_states.get(ReplicaState.RUNNING, 0)


def wait_until(condition, timeout_s: float, period_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(period_s)
    return condition()


def test_autoscaler_reading_prometheus_scales_workers_up_under_load_and_back_down(prometheus_binary, scaled,
                                                                                 prometheus):
    assert wait_until(lambda: running_workers() == 1, 30), "the application should start with one worker"
    stop, sent = threading.Event(), []
    body = {"model": "tiny", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}

    def client():  # one closed loop: the next request when the last one is answered
        with httpx.Client(base_url=scaled, timeout=120) as http:
            while not stop.is_set():
                sent.append(http.post("/v1/completions", json=body).status_code)

    def desired() -> float | None:  # the autoscaler's last decision, as exported
        values = [float(r["value"][1]) for r in prometheus.query(
            f'max(supernet_autoscaler_desired_replicas{{application="{APP}"}})')]
        return values[0] if values else None

    def reasons() -> dict[str, float]:  # evaluations so far, by reason
        return {r["metric"]["reason"]: float(r["value"][1]) for r in prometheus.query(
            f'sum by (reason) (supernet_autoscaler_decisions_total{{application="{APP}"}})')}

    def inputs() -> dict[str, float]:
        return {r["metric"]["signal"]: round(float(r["value"][1]), 3) for r in prometheus.query(
            f'max by (signal) (supernet_autoscaler_signal{{application="{APP}"}})')}

    with ThreadPoolExecutor(4) as pool:  # 4 in flight against max_running=2: a queue builds up
        started = time.monotonic()
        futures = [pool.submit(client) for _ in range(4)]
        try:
            decided = wait_until(lambda: desired() == 2, SCALE_UP_WITHIN_S)
            decided_s = time.monotonic() - started
            assert decided, (f"the autoscaler did not ask for a second worker within {SCALE_UP_WITHIN_S} s of "
                             f"load: decisions {reasons()}, last inputs {inputs()}; {prometheus.scrape_health()}")
            up = wait_until(lambda: running_workers() == 2, REPLICA_START_WITHIN_S)
            scaled_up_s = time.monotonic() - started
            assert up, f"asked for, but no second worker running {REPLICA_START_WITHIN_S} s later"
            time.sleep(3)  # still loaded: it must stay at 2
            assert running_workers() == 2
        finally:
            stop.set()
            ended = time.monotonic()
            for future in futures:
                future.result()
    assert sent and set(sent) == {200}, sorted(set(sent))
    down = wait_until(lambda: running_workers() == 1, SCALE_DOWN_WITHIN_S)
    scaled_down_s = time.monotonic() - ended
    assert down, f"still {running_workers()} workers {SCALE_DOWN_WITHIN_S} s after the load ended"

    seen = wait_until(lambda: {"sla-pressure", "scale-down"} <= set(reasons()), 15)
    assert seen, reasons()
    print(f"asked for 2 workers {decided_s:.1f} s and running {scaled_up_s:.1f} s after the load started, "
          f"down {scaled_down_s:.1f} s after it ended; "
          f"{len(sent)} requests")


async def _dashboard_load(url: str) -> list[int]:
    budget = {"ttft_ms": 20000, "tpot_ms": 5000, "deadline_ms": 60000}
    base = {"model": "tiny", "prompt": "def area(r):", "max_tokens": 16, "temperature": 0}
    bodies = [{**base, "sla": budget}] * 6 + [
        {**base, "sla": {"tpot_ms": 1e-6}, "priority": -1},  # shed: no preset can meet it
        {**base, "sla": {"tpot_ms": 1e-6}},  # served at risk: a budget downgrade and a missed budget
        {**base, "placement": "SSSSSS"},  # a placement that is no preset
        {**base, "max_tokens": "many"},  # invalid
    ]
    # Speculation's counters, alone after the rest: a draft equal to the target keeps every proposal, so the
    # accepted-tokens counter gets a series too. The target is forced: left to the policy, a snapshot that
    # still shows the replica full sends it to the fastest preset, whose draft may keep nothing.
    speculated = {**base, "max_tokens": 32, "preset": "careful", "speculation": {"draft": "careful", "tokens": 3}}
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        gate = asyncio.Semaphore(2)

        async def post(body):
            async with gate:
                return (await http.post("/v1/completions", json=body)).status_code

        async def stream():  # long enough that the 0.2 s snapshots see decoding rows (the step gauges)
            async with gate, http.stream("POST", "/v1/completions",
                                         json={**base, "max_tokens": 256, "stream": True, "sla": budget}) as r:
                return r.status_code if [line async for line in r.aiter_lines()] else 0

        statuses = await asyncio.gather(*(post(b) for b in bodies), stream(), stream())
        return [*statuses, await post(speculated)]


def test_every_documented_metric_is_exported_and_every_dashboard_panel_returns_data(prometheus_binary, scaled,
                                                                                   prometheus):
    started = time.time()
    statuses = asyncio.run(_dashboard_load(scaled))
    assert sorted(statuses) == [200] * 11 + [400, 429], statuses
    documented = documented_metrics()
    assert len(documented) >= 20

    # Over the time since the load started, as a dashboard shows it: Ray stops exporting a gauge nobody set for
    # two export intervals (requests in flight once the load is over, say), so "now" alone can miss it.
    def exported() -> set[str]:
        names = prometheus.names_since(f'{{__name__=~"supernet_.+",application="{APP}"}}', started - 5)
        return {n for n, kind in documented.items() if (f"{n}_bucket" if kind == "histogram" else n) in names}

    def empty_panels() -> list[str]:
        return [f"{file} / {title}: {expr}" for file, title, expr in panel_queries()
                if not prometheus.query_range(concrete(expr), started - 5, time.time())]

    missing = wait_until(lambda: not (set(documented) - exported()), PANELS_WITHIN_S)
    speculation = [line for line in httpx.get(f"{scaled}/metrics").text.splitlines()
                   if line.startswith(("supernet_drafted", "supernet_accepted"))]  # the service's own view
    assert missing, (f"documented but not exported: {sorted(set(documented) - exported())}; {speculation}; "
                     f"{prometheus.scrape_health()}")
    assert wait_until(lambda: not empty_panels(), PANELS_WITHIN_S, period_s=2), \
        "panels without data:\n" + "\n".join(empty_panels() + prometheus.scrape_health())
    everywhere = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
                  for n in prometheus.metric_names()}
    assert everywhere <= set(documented), f"exported but not in docs/metrics.md: {sorted(everywhere - set(documented))}"


def test_dashboards_use_only_documented_metrics_and_the_datasource_variable():
    documented = set(documented_metrics())
    queries = panel_queries()
    assert {file for file, _, _ in queries} == {"supernet-autoscaler.json", "supernet-overview.json",
                                                "supernet-quality.json", "supernet-workers.json"}
    for path in sorted((ROOT / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["DS_PROMETHEUS"]["type"] == "datasource"
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)) and dashboard["uid"].startswith("supernet-")
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"], panel["title"]
    for file, title, expr in queries:
        names = {n.removesuffix("_bucket") for n in re.findall(r"supernet_[a-z0-9_]*[a-z0-9]", expr)}
        assert names and names <= documented, f"{file} / {title}: {sorted(names - documented)}"


# ---- the autoscaling glue and the metric helpers, without a cluster ----

def test_signals_from_prometheus_sums():
    from router.autoscaling import signals_from

    raw = {"met": 90.0, "missed": 5.0, "shed": 5.0, "ttft": 0.4, "tpot": 0.05, "waiting": 6.0, "arrivals": 3.0,
           "load_downgrades": 10.0, "routed": 40.0, "cache_used": 3.0e9, "cache_free": 1.0e9}
    signals = signals_from(raw, replicas=2, running=2, now_s=7.0, window_s=60)
    assert (signals.sla_attainment, signals.queue_wait_s, signals.quality_debt, signals.utilisation) == \
        (0.9, 2.0, 0.25, 0.75)  # sheds count as misses; Little's law: 6 waiting / 3 per s
    assert signals.running == 2
    idle = signals_from({"waiting": 0.0, "arrivals": 0.0, "routed": 0.0, "cache_used": 0.0, "cache_free": 8e9},
                        2, 2, 0.0, 60)
    assert (idle.sla_attainment, idle.queue_wait_s, idle.quality_debt, idle.utilisation) == (None, 0.0, None, 0.0)
    stuck = signals_from({"waiting": 3.0, "arrivals": 0.0}, 1, 1, 0.0, 60)
    assert stuck.queue_wait_s == 60


def test_in_process_stats_become_the_same_raw_sums():
    from router.autoscaling import in_process_raw, signals_from

    aggregated = {"cache_used_bytes": {"a": 5e8, "b": 7e8}, "cache_free_bytes": {"a": 5e8, "b": 3e8},
                  "waiting_requests": {"a": 2.0, "b": 0.0},
                  "requests_per_s": {"a": 1.0, "b": 1.0}, "requests": {"a": 10.0, "b": 10.0},
                  "load_downgrades": {"a": 4.0, "b": 0.0}, "budget_checks": {"a": 10.0, "b": 10.0},
                  "budget_met": {"a": 9.0, "b": 10.0}, "ttft_p90_s": {"a": 0.3, "b": 0.5}}
    signals = signals_from(in_process_raw(aggregated), 2, 2, 0.0, 60)
    assert signals.sla_attainment == 0.95 and signals.queue_wait_s == 1.0 and signals.quality_debt == 0.2
    assert signals.utilisation == pytest.approx(0.6) and signals.ttft_s == 0.5 and signals.tpot_s is None
    assert in_process_raw(None) == {} and not signals_from({}, 1, 1, 0.0, 60).has_data


def test_the_policy_decides_every_interval_and_keeps_its_state_in_serve_policy_state():
    from types import SimpleNamespace

    from router.autoscaling import SupernetAutoscalingPolicy
    from router.config import AutoscalingSettings

    settings = AutoscalingSettings(enabled=True, min_replicas=1, max_replicas=3, interval_s=10,
                                   queue_wait_target_s=0.5, upscale_cooldown_s=0).model_dump()
    policy = SupernetAutoscalingPolicy(settings=settings)
    busy = {"cache_used_bytes": {"a": 9e8}, "cache_free_bytes": {"a": 1e8}, "waiting_requests": {"a": 8.0},
            "requests_per_s": {"a": 2.0}}

    def tick(now, target, state):
        ctx = SimpleNamespace(current_time=now, target_num_replicas=target, current_num_replicas=target,
                              policy_state=state, aggregated_metrics=busy, app_name="app",
                              deployment_name="SupernetWorker")
        return policy(ctx)

    replicas, state = tick(100.0, 1, {})
    assert replicas == 2 and state["supernet"]["changed_at"] == 100.0  # queue wait 4 s against 0.5: up
    assert tick(105.0, 2, state) == (2, state)  # inside the interval: the current target, state kept
    replicas, _ = tick(111.0, 2, state)
    assert replicas == 3


def test_worker_metrics_pickle_as_plain_values_and_window_their_stats():
    import pickle
    from types import SimpleNamespace

    from router.metrics import WorkerMetrics

    observer = pickle.loads(pickle.dumps(WorkerMetrics({"AAAAAA": "quality"}, window_s=30)))
    assert observer.presets == {"AAAAAA": "quality"} and observer.window_s == 30
    sla = {"ttft_ms": 100, "tpot_ms": 10, "deadline_ms": None}
    observer.request_done({"sla": sla, "downgrade": "load"}, ttft_s=0.05, duration_s=0.5, tokens=11)  # tpot 45 ms
    observer.request_done({"sla": None, "downgrade": None}, ttft_s=0.2, duration_s=0.3, tokens=1)
    observer.observe(SimpleNamespace(num_waiting=3, cache_used_bytes=600, cache_free_bytes=400, recent_steps=(),
                                     num_steps=0, speculation=(), running_counts=dict))
    observer.observe(SimpleNamespace(num_waiting=3, cache_used_bytes=200, cache_free_bytes=800, recent_steps=(),
                                     num_steps=0, speculation=(), running_counts=dict))
    stats = observer.autoscaling_stats(waiting=3)
    assert (stats["cache_used_bytes"], stats["cache_free_bytes"]) == (400.0, 600.0)  # means over the window
    assert stats["budget_checks"] == 2 and stats["budget_met"] == 1 and stats["load_downgrades"] == 1
    assert stats["requests"] == 2 and stats["waiting_requests"] == 3 and stats["ttft_p90_s"] == 0.2
    assert all(isinstance(v, float) for v in stats.values())  # Serve accepts only numbers


def test_the_service_serves_its_supernet_metrics_at_slash_metrics(serve_url):
    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.post(f"{serve_url}/v1/completions", json={"model": "quality", "prompt": "x", "max_tokens": 2},
                      timeout=60).status_code == 200

    def page():
        response = httpx.get(f"{serve_url}/metrics", timeout=30)
        return response if "supernet_requests_total{" in response.text else None

    response = wait_until(page, 30)
    assert response, "no supernet_requests_total on /metrics within 30 s"
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    assert families["supernet_requests"] == "counter" and set(families) <= {
        n.removesuffix("_total") for n in documented_metrics()}  # only the documented names, no ray_ prefix
