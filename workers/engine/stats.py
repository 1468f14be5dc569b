"""A cheap, immutable snapshot of an engine's load for the router: plain numbers and strings, no torch."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One model step: its rows, the tokens it ran and its wall time (scheduling and sampling included)."""

    num_rows: int
    num_decode_rows: int
    num_prefill_tokens: int
    num_generated: int  # tokens sampled: one per decode row and per prompt that finished its prefill
    seconds: float
    ended_at: float  # time.monotonic() at the end of the step

    @property
    def num_tokens(self) -> int:
        return self.num_decode_rows + self.num_prefill_tokens


@dataclass(frozen=True, slots=True)
class SequenceStats:
    """One waiting or running request: its placement code and sizes."""

    placement: str
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    cache_bytes: int  # reserved while running; what it will reserve while waiting
    prefill_tokens_left: int
    request_id: str = ""
    draft: str = ""  # the draft placement's code when it speculates
    draft_tokens: int = 0

    @property
    def context_tokens(self) -> int:
        """Tokens in its context now (prompt plus generated)."""
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class SpeculationStats:
    """Speculation of one (target, draft) pair since the engine started: proposals verified, kept, verify
    steps, and the steps that refused one."""

    target: str
    draft: str
    drafted: int
    accepted: int
    verifies: int
    rejected_steps: int

    @property
    def acceptance_rate(self) -> float | None:
        """Per proposal examined (each step examines its kept proposals and the one it refused, if any)."""
        examined = self.accepted + self.rejected_steps
        return self.accepted / examined if examined else None


@dataclass(frozen=True, slots=True)
class FinishCounts:
    """Requests ended since the engine started, by how: end of sequence or a stop string, max_tokens, aborted
    (the client left, or a cancel), failed (a model step, an allocation or the detokenizer)."""

    stop: int = 0
    length: int = 0
    abort: int = 0
    error: int = 0


@dataclass(frozen=True, slots=True)
class EngineStats:
    waiting: tuple[SequenceStats, ...]  # in admission order (FIFO)
    running: tuple[SequenceStats, ...]
    cache_budget_bytes: int
    cache_used_bytes: int
    recent_steps: tuple[StepRecord, ...]  # oldest first, at most EngineConfig.step_history
    num_steps: int  # steps that ran the model since start
    taken_at: float  # time.monotonic() when the snapshot was made
    speculation: tuple[SpeculationStats, ...] = ()  # cumulative, one per (target, draft) pair seen
    finished: FinishCounts = FinishCounts()

    @property
    def cache_free_bytes(self) -> int:
        return self.cache_budget_bytes - self.cache_used_bytes

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def waiting_prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.waiting)

    @property
    def waiting_max_tokens(self) -> int:
        return sum(s.max_tokens for s in self.waiting)

    def running_by_placement(self) -> dict[str, tuple[int, ...]]:
        """Placement code -> context lengths of its running rows."""
        by_code: dict[str, list[int]] = {}
        for s in self.running:
            by_code.setdefault(s.placement, []).append(s.context_tokens)
        return {code: tuple(contexts) for code, contexts in by_code.items()}

    def running_counts(self) -> dict[str, int]:
        return dict(Counter(s.placement for s in self.running))

    def generated_tokens_per_second(self) -> float | None:
        """Tokens generated per second of step time over the recent steps (None before any step ran)."""
        seconds = sum(r.seconds for r in self.recent_steps)
        if not seconds:
            return None
        return sum(r.num_generated for r in self.recent_steps) / seconds
