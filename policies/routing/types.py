"""Plain values the routing decision reads and returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from policies.placement import Placement


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """One request as the router sees it: sizes, budget and wishes. Budgets in ms; None: no limit."""

    prompt_tokens: int
    max_tokens: int
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    deadline_ms: float | None = None
    min_quality: float | None = None
    priority: int = 0  # negative: may be shed
    preset: str | None = None  # forced preset
    placement: Placement | None = None  # forced placement
    speculation: str = "auto"  # "auto": the policy decides; "off"; "given": ``draft`` / ``draft_tokens``
    draft: Placement | None = None  # the given draft (speculation "given")
    draft_tokens: int = 0
    sampled: bool = False  # temperature > 0 (speculative sampling accepts at a different rate than greedy)

    @property
    def has_budget(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None or self.deadline_ms is not None

    @property
    def sheddable(self) -> bool:
        return self.priority < 0


@dataclass(frozen=True, slots=True)
class PresetInfo:
    name: str
    placement: Placement
    quality: float  # predicted quality retention vs all-attention, 0..1


@dataclass(frozen=True, slots=True)
class RunningRow:
    placement: Placement
    context_tokens: int  # tokens in its cache now
    remaining_tokens: int  # tokens it may still generate
    cache_bytes: int  # what it has reserved (freed when it finishes)
    step_allowance_ms: float = math.inf  # the longest mean step it can take and meet its TPOT (function below)


def step_allowance_ms(tpot_ms: float | None, max_tokens: int, tokens: int, decoding_ms: float) -> float:
    """The longest mean decode step a running request can still take and meet its TPOT budget.

    TPOT is measured over the tokens after the first: (max_tokens - 1) steps in all, ``decoding_ms`` of them
    spent since the first token (0 before it), and max_tokens - tokens left (a request may stop early; it is
    not counted on to). inf without a budget or with nothing left; negative once the budget is already lost."""
    left = max_tokens - max(tokens, 1)
    if tpot_ms is None or left <= 0:
        return math.inf
    return (tpot_ms * (max_tokens - 1) - decoding_ms) / left


@dataclass(frozen=True, slots=True)
class WorkerState:
    """A replica's load at ``age_s`` seconds ago: its running rows, its queue and its cache memory."""

    replica_id: str
    running: tuple[RunningRow, ...] = ()
    waiting_requests: int = 0
    waiting_prompt_tokens: int = 0
    prefill_backlog_tokens: int = 0  # prompt tokens of admitted rows not yet prefilled (ahead in the chunk FIFO)
    waiting_cache_bytes: int = 0  # what the waiting requests will reserve before a new one is admitted
    cache_budget_bytes: int = 0
    cache_used_bytes: int = 0
    calibration: float = 1.0  # measured / predicted step time, from recent steps
    age_s: float = 0.0
    in_flight: int = 0  # dispatched since the snapshot, not in it yet
    arrivals_per_s: float = 0.0  # requests submitted to the replica lately (the worker counts them)
    arrival_prompt_tokens: float = 0.0  # their mean prompt length

    @property
    def cache_free_bytes(self) -> int:
        return self.cache_budget_bytes - self.cache_used_bytes - self.waiting_cache_bytes


# Results are plain slotted classes, not frozen: a frozen dataclass's __init__ costs about 3 us here, and a
# decision builds three of them within its 50 us.
@dataclass(slots=True)
class Prediction:
    queue_wait_ms: float
    ttft_ms: float
    tpot_ms: float
    completion_ms: float
    quality: float
    extrapolated: bool = False


@dataclass(slots=True)
class Decision:
    preset: str | None
    placement: Placement
    replica_id: str | None
    prediction: Prediction | None
    reason: str
    shed: bool = False
    sla_at_risk: bool = False
    details: tuple[str, ...] = field(default=())
    raw_prediction: Prediction | None = None  # before calibration: what measurements are compared with
    draft: Placement | None = None  # speculate: this placement drafts ``draft_tokens`` per verify step
    draft_tokens: int = 0
    draft_preset: str | None = None  # the draft's preset name, when it is one
    plain_tpot_ms: float | None = None  # the predicted TPOT without speculation (calibrated), when speculating
