"""The asyncio face of the engine: a step thread, and one async token stream per request.

Model steps run in a dedicated thread (torch releases the GIL while it
computes), so the event loop keeps serving. Each step's events are handed to
the loop in one ``call_soon_threadsafe`` call and put on the per-request
asyncio queues there; the queues are touched by the loop thread only.

A stream ends with its finishing event. A consumer that stops iterating
(``break``, the async generator closed or collected) or whose task is
cancelled aborts its request, and the engine frees the cache at its next step.
A failed step ends the affected streams with ``EngineFailure``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from policies.errors import EngineFailure, InvalidRequest
from workers.engine.engine import Engine
from workers.engine.request import Request, TokenEvent
from workers.engine.seam import ModelFacts, TokenSink
from workers.engine.stats import EngineStats

log = logging.getLogger(__name__)


def name_this_thread(name: bytes) -> None:
    """The OS-level name of the calling thread (Linux, 15 bytes at most), so that ``top -H``, ``ps -L`` and
    /proc/<pid>/task/<tid>/comm tell the step thread apart from Ray's own (Python names none of them)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: nothing to name
        pass


class RequestStream:
    """The token events of one request: ``async for event in stream``. Iterate it once."""

    __slots__ = ("request_id", "_queue", "_engine", "_done", "_iterated")

    def __init__(self, request_id: str, queue: asyncio.Queue, engine: "AsyncEngine"):
        self.request_id = request_id
        self._queue = queue
        self._engine = engine
        self._done = False
        self._iterated = False

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._iterated:
            raise RuntimeError(f"the stream of request {self.request_id} is already being iterated")
        self._iterated = True
        return self._events()

    async def _events(self) -> AsyncIterator[TokenEvent]:
        try:
            while not self._done:
                event: TokenEvent = await self._queue.get()
                if event.finished:
                    self._done = True
                if event.finish_reason == "error":
                    raise EngineFailure(f"request {self.request_id}: {event.error}")
                yield event
        finally:
            if not self._done:  # the consumer left early (break, close, cancellation)
                self._done = True
                self._engine._forget(self.request_id)

    async def collect(self) -> list[TokenEvent]:
        """Every event until the stream ends."""
        return [event async for event in self]


class AsyncEngine:
    """``async with AsyncEngine(engine) as e: stream = e.submit(request)``; a ``seam.ServingEngine``."""

    def __init__(self, engine: Engine):
        self.engine = engine
        config = engine.model.config
        self.facts = ModelFacts(config.num_layers, config.vocab_size, config.max_position_embeddings,
                                str(engine.model.dtype).removeprefix("torch."), str(engine.model.device))
        self._queues: dict[str, asyncio.Queue | TokenSink] = {}  # loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._failure: str | None = None  # set once by the step thread if the engine itself broke

    async def __aenter__(self) -> "AsyncEngine":
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def start(self) -> None:
        """Start the step thread; call from the event loop that will consume the streams."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop stepping; streams still open end with EngineFailure."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        for request_id in self._queues:  # a later start() frees them at its first step
            self.engine.abort(request_id)
        self._fail_open_streams("the engine stopped")

    def submit(self, request: Request, sink: TokenSink | None = None) -> RequestStream | None:
        """Queue a request; raises InvalidRequest / ContextTooLong at once if it can never run.

        Without ``sink``: its events come out of the returned stream. With one: each event is handed to
        ``sink.put_nowait`` on the loop thread as its step is delivered (one sink may serve many requests,
        so a step's events for them can leave together), and nothing is returned; ``abort`` cancels."""
        if self._loop is None or self._thread is None:
            raise EngineFailure("the engine is not running (use `async with AsyncEngine(...)`)")
        if self._failure is not None:
            raise EngineFailure(self._failure)
        if request.request_id in self._queues:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use")
        queue = asyncio.Queue() if sink is None else sink
        self._queues[request.request_id] = queue  # before the step thread can see the request
        try:
            self.engine.add_request(request)
        except BaseException:
            del self._queues[request.request_id]
            raise
        self._wake.set()
        return RequestStream(request.request_id, queue, self) if sink is None else None

    def abort(self, request_id: str) -> bool:
        """Cancel a request (from the loop thread): its stream ends with an "abort" event at the next step."""
        if not self.engine.abort(request_id):
            return False
        self._wake.set()
        return True

    def _forget(self, request_id: str) -> None:
        """The stream's consumer is gone: drop its queue and abort the request."""
        self._queues.pop(request_id, None)
        self.abort(request_id)

    @property
    def faults(self):
        """The engine's ``StepFaults`` (chaos tests arm it)."""
        return self.engine.faults

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def failure(self) -> str | None:
        """Why the engine broke (a failed step outside the model call), or None while it is healthy."""
        return self._failure

    # ---- step thread ----

    def _run(self) -> None:
        name_this_thread(b"engine-step")
        while not self._stopping:
            if not self.engine.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except BaseException as exc:  # a bug outside the model call: the engine state is not trusted any more
                log.exception("engine step failed; failing all streams")
                self._failure = f"engine step failed: {exc!r}"
                self._deliver_threadsafe(None)
                return
            if events:
                self._deliver_threadsafe(events)

    def _deliver_threadsafe(self, events: list[TokenEvent] | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, events)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # ---- loop thread ----

    def _deliver(self, events: list[TokenEvent] | None) -> None:
        if events is None:
            self._fail_open_streams(self._failure or "engine failure")
            return
        for event in events:
            queue = self._queues.get(event.request_id)
            if queue is None:
                continue  # aborted by its consumer
            queue.put_nowait(event)
            if event.finished:
                del self._queues[event.request_id]

    def _fail_open_streams(self, reason: str) -> None:
        for request_id, queue in self._queues.items():
            queue.put_nowait(TokenEvent(request_id, None, "", "error", reason))
        self._queues.clear()
