"""A custom Ray Serve request router, so that Ray sends each request to the replica the routing decision chose.

The ingress decides (``router/routing.py``) and writes the chosen replica's id
into the request; ``choose_replicas`` ranks that replica first and the others
after it, least loaded first, so a full or dead replica still falls back
safely. Each router instance lives in the ingress process (one per handle) and
registers itself under its deployment so the ingress can read the replicas'
routing stats, which Serve refreshes every ``request_routing_stats_period_s``.
"""

from __future__ import annotations

import threading

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import FIFOMixin, RequestRouter

# Process-wide: the seam between Serve's handle machinery and our ingress. Keyed by deployment name.
_ROUTERS: dict[str, "SupernetRequestRouter"] = {}
_LOCK = threading.Lock()
# Replicas this ingress saw die (a stream failed with the replica's process gone), by unique id. Serve's
# controller takes seconds to notice; until it drops them, nothing is routed or predicted for them.
_LOST: set[str] = set()


def replicas_of(deployment: str) -> list[RunningReplica]:
    """The live replicas the handle's router knows now (empty before the handle's first request)."""
    with _LOCK:
        router = _ROUTERS.get(deployment)
        if router is None:
            return []
        replicas = list(router.curr_replicas.values())
        known = {r.replica_id.unique_id for r in replicas}
        _LOST.intersection_update(known)  # ids Serve has dropped can never come back
        return [r for r in replicas if r.replica_id.unique_id not in _LOST]


def mark_lost(replica_id: str) -> None:
    """A replica's process died: stop routing to it now, before Serve's controller notices."""
    with _LOCK:
        _LOST.add(replica_id)


def _alive(replicas: list[RunningReplica]) -> list[RunningReplica]:
    with _LOCK:
        return [r for r in replicas if r.replica_id.unique_id not in _LOST]


class SupernetRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, deployment: str = "SupernetWorker", **kwargs) -> None:
        # Serve pickles this class by value, so the globals it sees are copies: register in the imported module.
        import router.replica_router as registry

        with registry._LOCK:
            registry._ROUTERS[deployment] = self

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        import router.replica_router as registry  # the module's lost set, not this by-value copy's

        wanted = _wanted_replica(pending_request)
        # Only lost ones: none to offer; Serve asks again shortly, and the request waits for a replacement.
        ordered = sorted(registry._alive(candidate_replicas), key=_load)
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
