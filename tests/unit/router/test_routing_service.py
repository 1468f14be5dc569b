"""The ingress's view of a replica's load: its stats snapshot, corrected by what the router saw since."""

import time
from types import SimpleNamespace

import pytest

from router.routing import RoutingService
from tests.e2e.conftest import routed_presets


@pytest.fixture
def service(tiny_checkpoint, tmp_path):
    from policies.placement import Placement
    from policies.routing.types import PresetInfo

    speed, presets = routed_presets(tiny_checkpoint, tmp_path)
    infos = [PresetInfo(p["name"], Placement.parse(p["placement"]), p["quality"]) for p in presets]
    return RoutingService("sla", str(speed), infos, 6, None, 0.9)


def replica(stats):
    """What Serve hands the request router: an id and the replica's last pushed routing stats."""
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id="r0"), routing_stats=stats)


def snapshot(*rows, taken_at=None, step_ms=None):
    return {"taken_at": time.time() if taken_at is None else taken_at, "running": [list(r) for r in rows],
            "cache_budget_bytes": 2**30, "cache_used_bytes": 0, "decode_step_ms": step_ms}


def test_rows_the_router_saw_finish_are_dropped_from_an_older_snapshot(service):
    stats = snapshot(["AAAAAA", 20, 3, 1024, "done"], ["KKKKKK", 20, 3, 1024, "live"])
    assert len(service.states([replica(stats)])[0].running) == 2
    service.dispatched("r0", "done")
    service.finished("r0", "done")  # after the snapshot: it lists a row that no longer runs
    (state,) = service.states([replica(stats)])
    assert [row.placement.code for row in state.running] == ["KKKKKK"]
    later = snapshot(["KKKKKK", 21, 2, 1024, "live"], taken_at=time.time() + 1)
    assert len(service.states([replica(later)])[0].running) == 1
    assert not service._finished["r0"]  # forgotten once a later snapshot no longer lists it


def test_rows_without_request_ids_are_kept(service):
    (state,) = service.states([replica(snapshot(["AAAAAA", 20, 3, 1024]))])  # a worker of an older version
    assert len(state.running) == 1


def test_a_snapshot_calibrates_once_however_often_it_is_read(service):
    stats = snapshot(["KKKKKK", 20, 3, 1024, "a"], step_ms=1e6)  # measured far slower than predicted
    service.states([replica(stats)])
    first = service.calibration["r0"]
    service.dispatched("r0", "b")  # the state is rebuilt (one more in flight), the measurement is the same
    service.states([replica(stats)])
    assert service.calibration["r0"] == first > 1


def test_a_dispatch_never_seen_to_finish_ages_out(tiny_checkpoint, tmp_path):
    from policies.placement import Placement
    from policies.routing.types import PresetInfo
    from router.routing import STALE_AFTER_S

    speed, presets = routed_presets(tiny_checkpoint, tmp_path)
    infos = [PresetInfo(p["name"], Placement.parse(p["placement"]), p["quality"]) for p in presets]
    now = [1000.0]
    service = RoutingService("sla", str(speed), infos, 6, None, 0.9, clock=lambda: now[0])
    silent = replica(None)  # no stats yet: only the router's own in-flight count tells its load
    service.dispatched("r0", "abandoned")  # its stream never started, so finished() never comes
    assert service.states([silent])[0].in_flight == 1
    now[0] += STALE_AFTER_S + 1
    assert service.states([silent])[0].in_flight == 0 and not service._in_flight["r0"]


def _drift_policy(service, raw, factor):
    for _ in range(200):  # the policy's served-request calibration converges on the drift
        service.policy.observe(raw, raw.ttft_ms, factor * raw.tpot_ms)


def _drift_replica(service, stats, factor):
    step_ms = service.predictor.speed.step([(Placement.parse("AAAAAA"), 20)]).ms
    service.states([replica(snapshot(["AAAAAA", 20, 3, 1024, "old"], taken_at=stats["taken_at"] - 1,
                                     step_ms=factor * step_ms))])  # measured slower than the table says


from policies.placement import Placement  # noqa: E402
from policies.routing.types import RoutingRequest  # noqa: E402


@pytest.mark.parametrize("drift", [_drift_policy, _drift_replica], ids=["served-requests", "replica-steps"])
def test_a_drifted_calibration_with_no_load_labels_the_downgrade_budget(service, drift):
    idle = snapshot()
    best = service.decide(RoutingRequest(16, 8, preset="careful"), [replica(idle)]).raw_prediction
    drift(service, idle if drift is _drift_replica else best, 1.3)
    request = RoutingRequest(16, 8, tpot_ms=1.15 * best.tpot_ms / 0.9)  # met by careful only without the drift
    decision = service.decide(request, [replica(idle)])
    assert decision.preset == "quick", decision
    assert service.downgrade(decision, request, 1.0, [replica(idle)]) == "budget"


def test_a_downgrade_an_idle_replica_would_not_need_is_labelled_load(service):
    idle = service.decide(RoutingRequest(16, 8, preset="careful"), [replica(snapshot())]).raw_prediction
    busy = snapshot(*[["KKKKKK", 1000, 50, 2**20, f"r{i}"] for i in range(8)])  # a full batch of quick rows
    request = RoutingRequest(16, 8, tpot_ms=1.2 * idle.tpot_ms / 0.9)
    decision = service.decide(request, [replica(busy)])
    assert decision.preset == "quick", decision
    assert service.downgrade(decision, request, 1.0, [replica(busy)]) == "load"
    assert service.downgrade(service.decide(RoutingRequest(16, 8), [replica(busy)]), request, 1.0,
                             [replica(busy)]) is None  # no budget: the best quality, no downgrade


def test_the_replica_s_arrivals_reach_the_policy(service):
    stats = {**snapshot(["AAAAAA", 20, 3, 1024, "a"]), "arrivals_per_s": 2.5, "arrival_prompt_tokens": 700.0}
    (state,) = service.states([replica(stats)])
    assert (state.arrivals_per_s, state.arrival_prompt_tokens) == (2.5, 700.0)
    (older,) = service.states([replica(snapshot(["AAAAAA", 20, 3, 1024, "a"], taken_at=time.time() + 1))])
    assert older.arrivals_per_s == 0.0  # a worker that does not count them: no future load assumed


def test_a_worker_counts_its_arrivals_over_a_window():
    from policies.routing.arrivals import ArrivalMeter

    arrivals = ArrivalMeter(window_s=10.0, started_at=100.0)
    assert arrivals.snapshot(100.0) == (0.0, 0.0)
    for tokens in (100, 300):
        arrivals.record(102.0, tokens)
    assert arrivals.snapshot(102.0) == (2 / 2.0, 200.0)  # since it started: 2 s
    arrivals.record(130.0, 50)
    assert arrivals.snapshot(130.0) == (1 / 10.0, 50.0)  # the first two left the 10 s window
    assert ArrivalMeter(started_at=5.0).snapshot(5.0) == (0.0, 0.0)


def test_the_running_rows_step_allowances_reach_the_policy(service):
    import math

    stats = {**snapshot(["AAAAAA", 20, 3, 1024, "a"], ["KKKKKK", 20, 3, 1024, "b"]), "step_allowance_ms": {"a": 7.5}}
    (state,) = service.states([replica(stats)])
    assert [r.step_allowance_ms for r in state.running] == [7.5, math.inf]  # "b" has no TPOT budget
    (older,) = service.states([replica(snapshot(["AAAAAA", 20, 3, 1024, "a"], taken_at=time.time() + 1))])
    assert older.running[0].step_allowance_ms == math.inf  # a worker that does not report them
