"""The Ray Serve autoscaling policy against a real Prometheus that has no data, then is gone: it holds the
count either way and says which (``no-signals`` vs ``prometheus-unavailable``). No Ray: the policy is a
plain callable and its context a plain object."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from router.autoscaling import SupernetAutoscalingPolicy
from router.metrics import Recorder
from tests.e2e.prometheus import BINARY, MISSING, Prometheus

INTERVAL_S = 0.1


def policy(url: str) -> SupernetAutoscalingPolicy:
    made = SupernetAutoscalingPolicy({"enabled": True, "min_replicas": 1, "max_replicas": 4, "prometheus_url": url,
                                      "window_s": 5, "interval_s": INTERVAL_S})
    made._recorder = Recorder("test", enabled=False)  # no Ray here
    return made


class Controller:
    """What Serve's controller does with the policy: call it with a context, keep its state and target."""

    def __init__(self, target: int):
        self.target, self.state, self.now = target, {}, 1000.0

    def tick(self, scaling: SupernetAutoscalingPolicy) -> tuple[int, str]:
        self.now += INTERVAL_S  # the policy evaluates once per interval of the context's clock
        ctx = SimpleNamespace(current_time=self.now, policy_state=self.state, target_num_replicas=self.target,
                              current_num_replicas=self.target, app_name="test", deployment_name="SupernetWorker",
                              aggregated_metrics={})
        self.target, self.state = scaling(ctx)
        return scaling.last_decision


def ticks_until(controller: Controller, scaling, reason: str, timeout_s: float = 60.0) -> list[tuple[int, str]]:
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen.append(controller.tick(scaling))
        if seen[-1][1] == reason:
            return seen
        time.sleep(INTERVAL_S)
    raise AssertionError(f"never {reason!r} within {timeout_s} s: {seen[-5:]}")


def test_no_prometheus_at_all_holds_the_count_and_says_so():
    from tests.e2e.conftest import free_port

    scaling, controller = policy(f"http://127.0.0.1:{free_port()}"), Controller(target=3)
    for _ in range(5):
        assert controller.tick(scaling) == (3, "prometheus-unavailable")
        time.sleep(INTERVAL_S)


def test_prometheus_without_data_then_down_holds_the_count_and_says_which(tmp_path):
    if BINARY is None:
        pytest.skip(MISSING)
    prometheus = Prometheus(tmp_path, []).start()  # up, scraping nothing: every query answers empty
    try:
        scaling, controller = policy(prometheus.url), Controller(target=2)
        seen = ticks_until(controller, scaling, "no-signals")
    finally:
        prometheus.stop()
    seen += ticks_until(controller, scaling, "prometheus-unavailable")  # its last answer grows stale
    assert {replicas for replicas, _ in seen} == {2}
    assert {reason for _, reason in seen} <= {"no-signals", "prometheus-unavailable"}


def test_a_downscale_step_shorter_than_the_signal_window_is_refused_with_the_fix():
    from pydantic import ValidationError

    from router.config import AutoscalingSettings

    with pytest.raises(ValidationError, match="raise downscale_step_s to at least window_s"):
        AutoscalingSettings(enabled=True, window_s=60, downscale_step_s=30)
    assert AutoscalingSettings(enabled=True, window_s=30, downscale_step_s=30).downscale_step_s == 30
