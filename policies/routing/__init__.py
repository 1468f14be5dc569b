"""The per-request routing decision: which preset (placement) and which worker replica.

Pure: no torch, no Ray. The same code runs in the ingress, the simulator in
``bench/`` and the tests.
"""

from policies.routing.policy import Baseline, SlaPolicy, build_policy
from policies.routing.types import Decision, PresetInfo, RoutingRequest, WorkerState

__all__ = ["Baseline", "Decision", "PresetInfo", "RoutingRequest", "SlaPolicy", "WorkerState", "build_policy"]
