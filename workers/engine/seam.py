"""The engine seam: what a worker replica needs from an engine, and nothing more.

``workers/deployment.py`` holds a ``ServingEngine`` built by an injected factory
(Ray Serve LLM's injected-engine pattern), so another backend (a different
runtime, a remote engine) only has to provide these calls. ``AsyncEngine`` over
our ``Engine`` is the one implementation here.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from workers.engine.request import Request, TokenEvent
from workers.engine.stats import EngineStats


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the serving layer must know of the loaded model (plain values: they cross the actor boundary)."""

    num_layers: int  # a placement's length
    vocab_size: int
    max_context: int  # prompt + generated tokens per request
    dtype: str
    device: str


class TokenSink(Protocol):
    """Where a request's token events go when the caller takes them per step, not per request."""

    def put_nowait(self, event: TokenEvent) -> None: ...  # on the loop thread; must not block


@runtime_checkable
class ServingEngine(Protocol):
    """Submit, abort, observe: the calls a replica makes. ``start`` runs from the loop that consumes streams."""

    @property
    def facts(self) -> ModelFacts: ...

    @property
    def started(self) -> bool: ...

    @property
    def failure(self) -> str | None: ...  # why the engine broke, or None while it is healthy

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    # Raises InvalidRequest at once. With a sink, the events go to it (and None is returned).
    def submit(self, request: Request, sink: TokenSink | None = None) -> AsyncIterable[TokenEvent] | None: ...

    def abort(self, request_id: str) -> bool: ...

    def stats(self) -> EngineStats: ...
