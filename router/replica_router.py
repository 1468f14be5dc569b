"""A custom Ray Serve request router, so that Ray sends each request to the replica the routing decision chose.

The ingress decides (``router/routing.py``) and writes the chosen replica's id
into the request; ``choose_replicas`` ranks that replica first and the others
after it, least loaded first, so a full or dead replica still falls back
safely. Each router instance lives in the ingress process (one per handle) and
registers itself under its deployment so the ingress can read the replicas'
routing stats, which Serve refreshes every ``request_routing_stats_period_s``.

A replica whose process dies leaves that set at the first request that fails on it (Serve's router
drops it on ``ActorDiedError``, before the controller notices), so the policy stops predicting for it
at once (tests/e2e/test_faults.py).
"""

from __future__ import annotations

import threading

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import FIFOMixin, RequestRouter

# Process-wide: the seam between Serve's handle machinery and our ingress. Keyed by deployment name.
_ROUTERS: dict[str, "SupernetRequestRouter"] = {}
_LOCK = threading.Lock()


def replicas_of(deployment: str) -> list[RunningReplica]:
    """The replicas the handle's router knows now (empty before the handle's first request)."""
    with _LOCK:
        router = _ROUTERS.get(deployment)
    return list(router.curr_replicas.values()) if router is not None else []


class SupernetRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, deployment: str = "SupernetWorker", **kwargs) -> None:
        # Serve pickles this class by value, so the globals it sees are copies: register in the imported module.
        import router.replica_router as registry

        with registry._LOCK:
            registry._ROUTERS[deployment] = self

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        wanted = _wanted_replica(pending_request)
        ordered = sorted(candidate_replicas, key=_load)
        chosen = [r for r in ordered if r.replica_id.unique_id == wanted]
        rest = [r for r in ordered if r.replica_id.unique_id != wanted]
        return [chosen, rest] if chosen else [[r] for r in rest]


def _wanted_replica(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None or not pending_request.args:
        return None
    request = pending_request.args[0]
    return request.get("replica_id") if isinstance(request, dict) else None


def _load(replica: RunningReplica) -> int:
    stats = replica.routing_stats or {}
    return len(stats.get("running", ())) + int(stats.get("waiting_requests", 0))
