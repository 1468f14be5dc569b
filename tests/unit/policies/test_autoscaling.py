"""The autoscaling decision: fast up, slow down, hysteresis, bounds, degrade before scaling, no flapping."""

from __future__ import annotations

import dataclasses

import pytest

from policies.autoscaling import REASONS, ScalingConfig, ScalingState, Signals, decide, pressure
from policies.errors import ConfigError

CONFIG = ScalingConfig(min_replicas=1, max_replicas=8, sla_target=0.95, ttft_target_s=1.0, tpot_target_s=0.1,
                       queue_wait_target_s=0.5, quality_debt_budget=0.2, debt_grace_s=60, utilisation_low=0.5,
                       calm_fraction=0.5, upscale_cooldown_s=20, downscale_stable_s=120, downscale_step_s=30,
                       max_scale_up_factor=2.0)
CALM = dict(sla_attainment=1.0, ttft_s=0.2, tpot_s=0.02, queue_wait_s=0.0, quality_debt=0.0, utilisation=0.1)
BUSY = dict(CALM, utilisation=0.9)  # budgets met at full quality: busy is not a reason to scale


def run(series, replicas=1, config=CONFIG, step_s=5.0, state=None):
    """Feed one signal dict per step, applying each decision; returns [(replicas, reason)] per step, after
    a first entry for the starting count."""
    state, out = state or ScalingState(), [(replicas, "start")]
    for i, values in enumerate(series):
        replicas, state, reason = decide(Signals(now_s=i * step_s, replicas=replicas, **values), state, config)
        assert reason in REASONS
        assert config.min_replicas <= replicas <= config.max_replicas
        out.append((replicas, reason))
    return out


def changes(trace) -> list[int]:
    """The sign of every change in the replica count (+1 up, -1 down)."""
    counts = [r for r, _ in trace]
    return [1 if b > a else -1 for a, b in zip(counts, counts[1:]) if b != a]


@pytest.mark.parametrize("values, expected", [
    (CALM, 0.2),  # TTFT and TPOT at 0.2 of their budgets, nothing missed, no queue
    ({"sla_attainment": 0.90}, 2.0),  # 10 % missed, 5 % allowed
    ({"ttft_s": 3.0}, 3.0),
    ({"queue_wait_s": 0.25, "tpot_s": 0.05}, 0.5),
    ({}, 0.0),
])
def test_pressure_is_the_worst_ratio_to_target(values, expected):
    assert pressure(Signals(0, 1, **values), CONFIG) == pytest.approx(expected)


@pytest.mark.parametrize("values, replicas, expected, reason", [
    (CALM, 1, 1, "steady"),  # already at min
    (BUSY, 3, 3, "steady"),  # busy but budgets met at full quality
    ({**CALM, "sla_attainment": 0.90}, 2, 4, "sla-pressure"),  # pressure 2: doubles at once
    ({**CALM, "ttft_s": 10.0}, 3, 6, "sla-pressure"),  # pressure 10, capped at x2
    ({**CALM, "ttft_s": 1.2}, 3, 4, "sla-pressure"),  # pressure 1.2: at least one more
    ({**CALM, "queue_wait_s": 2.0}, 6, 8, "sla-pressure"),  # bounded by max_replicas
    ({**CALM, "queue_wait_s": 2.0}, 8, 8, "at-max-replicas"),
    ({**CALM, "quality_debt": 0.6}, 2, 2, "burst-absorbed"),  # debt: absorbed first
    ({}, 2, 2, "no-signals"),
    (CALM, 0, 1, "below-min-replicas"),
    (CALM, 12, 8, "above-max-replicas"),
])
def test_one_decision(values, replicas, expected, reason):
    got, _, why = decide(Signals(0.0, replicas, **values), ScalingState(), CONFIG)
    assert (got, why) == (expected, reason)


def test_a_burst_inside_the_quality_debt_budget_does_not_scale():
    burst = [CALM] * 4 + [{**BUSY, "quality_debt": 0.5}] * 10 + [CALM] * 10  # 50 s of debt, grace 60 s
    trace = run(burst, replicas=2)
    assert {r for r, _ in trace} == {2}
    assert [why for _, why in trace].count("burst-absorbed") == 10 and changes(trace) == []


def test_debt_under_the_budget_never_scales():
    assert {r for r, _ in run([{**BUSY, "quality_debt": 0.15}] * 200, replicas=2)} == {2}


def test_sustained_debt_adds_replicas_one_grace_period_at_a_time():
    trace = run([{**BUSY, "quality_debt": 0.5}] * 40, replicas=1)[1:]  # 200 s of debt, grace 60 s
    counts = [r for r, _ in trace]
    first = counts.index(2)
    assert first * 5 == 60 and trace[first][1] == "quality-debt"
    assert counts[first + 11] == 2 and counts[first + 12] == 3  # the next one after another full grace
    assert changes(trace) == [1, 1, 1]


def test_sla_pressure_scales_up_fast_but_not_during_the_cooldown():
    trace = run([{**CALM, "sla_attainment": 0.5}] * 6, replicas=1)[1:]  # pressure 10 every 5 s, cooldown 20 s
    assert [r for r, _ in trace] == [2, 2, 2, 2, 4, 4]
    assert [why for _, why in trace][1:4] == ["cooldown"] * 3


def test_scale_down_is_slow_one_replica_at_a_time_and_stops_at_min():
    trace = run([CALM] * 120, replicas=4)[1:]  # 600 s of calm, stable period 120 s, step 30 s
    counts = [r for r, _ in trace]
    assert counts[:24] == [4] * 24 and counts[24] == 3  # the first removal after 120 s of calm
    assert changes(trace) == [-1, -1, -1] and counts[-1] == 1
    downs = [i for i, (_, why) in enumerate(trace) if why == "scale-down"]
    assert [b - a for a, b in zip(downs, downs[1:])] == [6, 6]  # then one per step while calm lasts


def test_after_a_scale_up_the_first_removal_waits_the_whole_stable_period_again():
    load = [{**CALM, "queue_wait_s": 2.0}]  # pressure 4: one scale-up
    trace = run([CALM] * 30 + load + [CALM] * 60, replicas=4)[1:]
    downs = [i for i, (_, why) in enumerate(trace) if why == "scale-down"]
    up = next(i for i, (_, why) in enumerate(trace) if why == "sla-pressure")
    assert downs[0] == 24 and up == 30  # calm: one removal at 120 s, the load comes before the next
    assert downs[1] - up >= 24  # after the scale-up, the stable period again, not the step


def test_no_scale_down_while_quality_is_still_owed_or_load_would_be_too_high():
    assert {r for r, _ in run([{**CALM, "quality_debt": 0.15}] * 100, replicas=3)} == {3}  # 0.15 > 0.5 x 0.2
    # 0.4 of the cache in use on 3 replicas is 0.6 on 2: above utilisation_low
    assert {r for r, _ in run([{**CALM, "utilisation": 0.4}] * 100, replicas=3)} == {3}
    assert {r for r, _ in run([{**CALM, "utilisation": None}] * 100, replicas=3)} == {3}


OSCILLATIONS = {  # (low, high) inputs, alternated
    "around the up threshold": ({**CALM, "ttft_s": 0.9}, {**CALM, "ttft_s": 1.1}),
    "load on and off": (CALM, {**BUSY, "queue_wait_s": 2.0, "sla_attainment": 0.8}),
    "debt on and off": (CALM, {**BUSY, "quality_debt": 0.9}),
    "calm and idle, then busy at full quality": (CALM, BUSY),
    "between the thresholds": ({**CALM, "ttft_s": 0.6}, {**CALM, "ttft_s": 0.95}),
}


@pytest.mark.parametrize("name", OSCILLATIONS)
@pytest.mark.parametrize("period", [1, 2, 3, 6, 20])
def test_oscillating_input_does_not_flap(name, period):
    """Alternate two inputs every `period` evaluations (5 s each) for an hour. The count may rise (a
    breach that keeps coming back is real), one cooldown apart, but it never goes down while the
    oscillation lasts, so it never alternates; inputs that never breach a budget change nothing."""
    low, high = OSCILLATIONS[name]
    series = [(high if (i // period) % 2 else low) for i in range(720)]
    trace = run(series, replicas=2)
    assert -1 not in changes(trace)
    ups = [i for i, (_, why) in enumerate(trace) if why in ("sla-pressure", "quality-debt")]
    assert all((b - a) * 5 >= CONFIG.upscale_cooldown_s for a, b in zip(ups, ups[1:]))
    if name in ("calm and idle, then busy at full quality", "between the thresholds") or (
            name == "debt on and off" and period * 5 < CONFIG.debt_grace_s):  # bursts inside the grace
        assert changes(trace) == []


@pytest.mark.parametrize("replicas, running, values, expected, reason", [
    (4, 1, {"sla_attainment": 0.90}, 4, "replicas-starting"),  # pressure 2 on 1 running: 2, and 4 are coming
    (2, 1, {"queue_wait_s": 5.0}, 2, "replicas-starting"),  # pressure 10, capped x2: 2, already the target
    (3, 2, {"ttft_s": 10.0}, 4, "sla-pressure"),  # 2 running at pressure 10 need 4: more than the 3 coming
    (3, 2, {"quality_debt": 0.6}, 3, "replicas-starting"),  # debt's one more replica is already starting
    (3, 3, {"ttft_s": 1.2}, 4, "sla-pressure"),  # all running: as before
])
def test_scale_ups_count_from_the_running_replicas_and_wait_for_those_starting(replicas, running, values,
                                                                              expected, reason):
    state = ScalingState(debt_since=-1000.0)  # debt (if any) past its grace
    got, _, why = decide(Signals(0.0, replicas, running=running, **{**CALM, **values}), state, CONFIG)
    assert (got, why) == (expected, reason)


def test_a_burst_during_one_start_up_asks_once_not_at_every_evaluation():
    """Pressure that lasts through a replica's start-up (60 s here: 12 evaluations) adds what the running
    replicas' pressure asks for once, then waits for it; the count grows again only once it serves."""
    startup = 12
    replicas, running, state, asked, counts = 1, 1, ScalingState(), {}, []
    for i in range(40):
        running = replicas - sum(1 for at in asked.values() if i - at < startup)
        replicas, state, _ = decide(Signals(i * 5.0, replicas, running=running, **{**CALM, "sla_attainment": 0.9}),
                                    state, CONFIG)
        for k in range(len(asked) + 1, replicas):  # the new ones, by index
            asked[k] = i
        counts.append(replicas)
    assert counts[:startup] == [2] * startup  # 1 running at pressure 2: 2, then it waits for the second
    assert counts[startup:2 * startup] == [4] * startup  # 2 running, still pressure 2: 4, then it waits
    assert counts[2 * startup] == 8  # 4 running, still pressure 2: the maximum


def test_no_scale_down_while_a_replica_is_starting():
    assert {r for r, _ in run([{**CALM, "running": 2}] * 100, replicas=3)} == {3}


def test_hysteresis_between_up_and_down_thresholds_holds():
    trace = run([{**CALM, "ttft_s": 0.7, "utilisation": 0.05}] * 200, replicas=3)[1:]  # 0.5 < 0.7 < 1
    assert {r for r, _ in trace} == {3} and {why for _, why in trace} == {"steady"}


def test_after_the_load_ends_it_goes_back_to_min_and_stays():
    load = [{**BUSY, "queue_wait_s": 3.0, "sla_attainment": 0.7}] * 20
    trace = run(load + [CALM] * 200 + [{}] * 20, replicas=1)
    counts = [r for r, _ in trace]
    assert max(counts) == 8 and counts[-1] == 1
    ups, downs = changes(trace).count(1), changes(trace).count(-1)
    assert changes(trace) == [1] * ups + [-1] * downs and downs == 7  # ups, then one replica at a time


def test_no_signals_holds_and_forgets_the_clocks():
    replicas, state, why = decide(Signals(100.0, 3), ScalingState(debt_since=0.0, calm_since=0.0), CONFIG)
    assert (replicas, why) == (3, "no-signals") and state.debt_since is None and state.calm_since is None


def test_state_is_plain_and_frozen():
    state = ScalingState(1.0, 2.0, 3.0)
    assert ScalingState(**dataclasses.asdict(state)) == state
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.debt_since = 5.0


@pytest.mark.parametrize("kwargs", [
    {"min_replicas": 0}, {"min_replicas": 3, "max_replicas": 2}, {"sla_target": 0}, {"ttft_target_s": 0},
    {"quality_debt_budget": 1.0}, {"calm_fraction": 1.0}, {"debt_grace_s": -1}, {"max_scale_up_factor": 0.5},
])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ConfigError):
        ScalingConfig(**kwargs)
