"""bench/autoscale_sim.py: the live decision in the simulator scales up under a burst and down after it; a static
fleet's replica-hours; the trace's shape; the same seed, the same result."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from autoscale_sim import Trace, run, summary  # noqa: E402
from policies.autoscaling import ScalingConfig  # noqa: E402
from simulate import predictor_for  # noqa: E402

# One short chat class; a cache budget of two such rows per replica, so a burst queues on one replica.
TINY_CLASSES = (("chat", 1.0, (1500, 2000), 48, 2000, 100, None, 0),)
BUDGET = 850 * 2**20
# A minute of quiet, a 30 s burst, quiet again: the autoscaler's periods shrunk to fit.
TRACE = Trace(span_s=110.0, trough=0.15, peak=0.15, bursts=1, burst_s=30.0, burst_factor=25.0, seed=4,
              classes=TINY_CLASSES)
CONFIG = ScalingConfig(min_replicas=1, max_replicas=3, upscale_cooldown_s=4.0, downscale_stable_s=20.0,
                       debt_grace_s=10.0)
FAST = dict(window_s=8.0, interval_s=2.0, scrape_s=1.0, startup_s=4.0, budget=BUDGET, bucket_s=10.0)


@pytest.fixture(scope="module")
def predictor():
    return predictor_for(None)


def test_the_trace_is_a_day_with_bursts_and_seeded():
    trace = Trace(span_s=1000.0, trough=1.0, peak=3.0, bursts=2, burst_s=50.0, burst_factor=2.0, seed=1)
    starts = trace.burst_starts()
    assert len(starts) == 2 and all(100 <= s <= 850 for s in starts)
    quiet = [t for t in (0.0, 250.0, 500.0, 1000.0) if not any(s <= t < s + 50 for s in starts)]
    expected = {0.0: 1.0, 250.0: 2.0, 500.0: 3.0, 1000.0: 1.0}
    assert all(trace.rate(t) == pytest.approx(expected[t]) for t in quiet)
    assert trace.rate(starts[0] + 1) == pytest.approx(2 * (1 + (1 - math.cos(2 * math.pi * (starts[0] + 1) / 1000))))
    assert trace.peak_rate() <= 6.0 + 1e-9
    first, again = trace.requests(), trace.requests()
    assert [(r.arrival, r.prompt) for r in first] == [(r.arrival, r.prompt) for r in again]
    assert [r.arrival for r in Trace(span_s=1000.0, seed=2).requests()][:5] != [r.arrival for r in first][:5]
    assert all(0 <= r.arrival < 1000 for r in first)


def test_the_decision_scales_up_under_a_burst_and_down_after_it(predictor):
    (start,) = TRACE.burst_starts()
    result = run("scale-only", predictor, TRACE, CONFIG, **FAST)
    ups = [d for d in result["decisions"] if d["to"] > d["from"]]
    downs = [d for d in result["decisions"] if d["to"] < d["from"]]
    assert ups and start <= ups[0]["t"] <= start + TRACE.burst_s + FAST["window_s"]
    assert ups[0]["reason"] == "sla-pressure"
    assert downs and all(d["reason"] == "scale-down" for d in downs) and downs[0]["t"] > ups[-1]["t"]
    assert result["timeline"]["target"][-1] < result["max_replicas"]
    assert result["scale_events"] == len(result["decisions"])
    # held: one replica the whole span, more only for part of it
    assert TRACE.span_s / 3600 < result["replica_hours"] < CONFIG.max_replicas * TRACE.span_s / 3600


def test_a_static_fleet_holds_replicas_times_the_span(predictor):
    trace = Trace(span_s=40.0, trough=0.2, peak=0.2, bursts=0, seed=0, classes=TINY_CLASSES)
    result = run("static", predictor, trace, CONFIG, static_replicas=3, **FAST)
    assert result["replica_hours"] == pytest.approx(3 * 40.0 / 3600)
    assert result["scale_events"] == 0 and set(result["timeline"]["target"]) == {3}


def test_the_same_seed_gives_the_same_json(predictor):
    trace = Trace(span_s=40.0, trough=0.5, peak=2.0, bursts=1, burst_s=10.0, burst_factor=3.0, seed=5,
                  classes=TINY_CLASSES)
    first = run("degrade-first", predictor, trace, CONFIG, **FAST)
    again = run("degrade-first", predictor, trace, CONFIG, **FAST)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    assert first["requests"] > 0 and 0 < first["mean_quality"] <= 1


def test_the_summary_line_has_every_figure_per_variant():
    results = {v: {"attainment": a, "mean_quality": q, "replica_hours": h, "scale_events": 2, "max_replicas": 3,
                   "shed_rate": 0.0}
               for v, a, q, h in (("static", 0.99, 1.0, 3.0), ("scale-only", 0.95, 1.0, 2.0),
                                  ("degrade-first", 0.96, 0.95, 1.5))}
    args = type("Args", (), {"speed": None, "startup_s": 120.0})()
    line = summary({"static_replica_hours": 3.0, "static_replicas": 3, "results": results}, TRACE, args)
    for variant in results:
        assert {"attainment", "mean_quality", "replica_hours", "static_replica_hours", "scale_events"} <= set(line[variant])
    assert line["degrade-first"]["vs_static"] == 0.5 and line["goal_met"] is True
    assert "classes" not in line["trace"]
