"""What arrives at a replica: requests per second and their mean prompt length over a sliding window.

The worker counts the requests submitted to it (``workers/deployment.py``, in its routing stats) and the
simulators count theirs the same way, on their own clocks: the SLA policy prices the prefills that will
arrive while a request decodes from these two numbers (``kernels.add_future_load``).
"""

from __future__ import annotations

from collections import deque


class ArrivalMeter:
    """``record(now, prompt_tokens)`` per request; ``snapshot(now)`` -> (requests per second, mean prompt tokens)
    over the last ``window_s`` seconds, or since ``started_at`` while the meter is younger than that.
    Times in seconds on any clock the caller keeps (one thread)."""

    __slots__ = ("window_s", "started_at", "_seen")

    def __init__(self, window_s: float = 30.0, started_at: float = 0.0):
        self.window_s, self.started_at = window_s, started_at
        self._seen: deque[tuple[float, int]] = deque()  # (when, prompt tokens)

    def record(self, now: float, prompt_tokens: int) -> None:
        self._seen.append((now, prompt_tokens))

    def snapshot(self, now: float) -> tuple[float, float]:
        while self._seen and self._seen[0][0] < now - self.window_s:
            self._seen.popleft()
        if not self._seen:
            return 0.0, 0.0
        span = max(min(self.window_s, now - self.started_at), 1.0)  # at least a second: no rate from one instant
        return len(self._seen) / span, sum(n for _, n in self._seen) / len(self._seen)
