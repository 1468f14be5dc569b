"""The live benchmark's simulated twin: its arrivals and its slowed replicas (no service, no clock)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench import live_twin  # noqa: E402
from bench.live_trace import MIX  # noqa: E402
from policies.placement import Placement  # noqa: E402
from policies.routing import PresetInfo  # noqa: E402
from policies.routing.predict import Predictor  # noqa: E402
from policies.tables import read_speed_model  # noqa: E402
from router.defaults import default_checkpoint  # noqa: E402

SPEED = default_checkpoint() / "speed-cpu.json"
BUDGETS = {"chat": {"ttft_ms": 200.0, "tpot_ms": 10.0}, "long-context": {"ttft_ms": 4000.0, "tpot_ms": 16.0}}


def test_arrivals_are_each_class_at_its_share_within_the_step_and_the_same_for_a_seed():
    requests = live_twin.arrivals(2.0, 600, BUDGETS, seed=3)
    assert requests == live_twin.arrivals(2.0, 600, BUDGETS, seed=3)
    assert [r.arrival for r in requests] == sorted(r.arrival for r in requests)
    assert all(0 < r.arrival < 600 for r in requests)
    for klass in MIX:
        mine = [r for r in requests if r.kind == klass.name]
        assert {(r.prompt, r.max_tokens) for r in mine} == {(klass.prompt_tokens, klass.output_tokens)}
        assert {(r.ttft_ms, r.tpot_ms) for r in mine} == {tuple(BUDGETS[klass.name].values())}
        assert len(mine) == pytest.approx(2.0 * 600 * klass.share, rel=0.15)  # Poisson: sd about 3%


def test_a_slowed_twin_takes_every_time_of_the_table_times_the_factor():
    presets = [PresetInfo("quality", Placement.parse("AAAAAAAA"), 1.0),
               PresetInfo("fastest", Placement.parse("GGGGGGGG"), 0.92)]
    table = Predictor(read_speed_model(SPEED), presets)
    slow = live_twin.slowed(table, str(SPEED), 1.5)
    data = json.loads(SPEED.read_text())
    assert slow.speed.step([(presets[0].placement, 1024)] * 4).ms == pytest.approx(
        1.5 * table.speed.step([(presets[0].placement, 1024)] * 4).ms)
    assert slow.prefill_ms_per_token(1, 64) == pytest.approx(1.5 * table.prefill_ms_per_token(1, 64))
    assert data == json.loads(SPEED.read_text())  # the table itself is left alone


def test_the_twin_reports_its_running_rows_step_allowances_as_the_worker_does():
    import math

    from bench.simcore import SimReplica, SimRequest
    from policies.routing.types import step_allowance_ms

    presets = [PresetInfo("quality", Placement.parse("AAAAAAAA"), 1.0)]
    replica = SimReplica("r0", 2**40, Predictor(read_speed_model(SPEED), presets))
    budgeted = SimRequest(0.0, 64, 101, None, 10.0, None, 0, "chat", preset=0, generated=41, first_token=1.0)
    free = SimRequest(0.0, 64, 101, None, None, None, 0, "chat", preset=0, generated=5, first_token=1.0)
    replica.running = [budgeted, free]
    rows = replica.snapshot(1.5).running
    assert rows[0].step_allowance_ms == step_allowance_ms(10.0, 101, 41, 500.0) == pytest.approx(500 / 60)
    assert rows[1].step_allowance_ms == math.inf
