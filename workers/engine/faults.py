"""Injected step failures, for chaos tests: the next model steps raise as a GPU does when it runs out of memory.

Off unless armed (one lock-free check per step). A worker arms it only when its configuration allows
(``worker.fault_injection``; ``WorkerServer.inject_step_faults``), so that a test on a real Serve can
show what a failing step does to the requests in it, to the cache, and to the requests after it.
"""

from __future__ import annotations

import threading

import torch


class StepFaults:
    __slots__ = ("_lock", "_left")

    def __init__(self):
        self._lock = threading.Lock()
        self._left = 0

    def arm(self, steps: int = 1) -> None:
        """The next ``steps`` model steps (any thread may arm; the stepping thread raises)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        with self._lock:
            self._left += steps

    @property
    def armed(self) -> int:
        return self._left

    def check(self) -> None:
        """Called by the engine just before a model step: raise if armed."""
        if not self._left:
            return
        with self._lock:
            if not self._left:
                return
            self._left -= 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by StepFaults for a chaos test)")
