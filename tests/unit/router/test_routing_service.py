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
