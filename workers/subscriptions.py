"""A worker replica's outgoing tokens, one message per engine step per ingress (not one per token per request).

Every actor message costs far more CPU than a token (docs/benchmarks.md, stream_cpu), and an engine step
makes one token for every running request at once. So an ingress opens one long-lived subscription on each
worker replica it uses and submits and aborts requests with unary calls; each message on the subscription is
``{request_id: {text, tokens, finish_reason[, error]}}`` for every request of that ingress that got tokens.
After awaiting one step's events the subscription takes everything already queued; it never waits for more.

Every accepted request ends on the subscription with its finishing message (``finish_reason``; "error" with
an ``EngineFailure`` under ``error``). A subscription that closes (its ingress went away or cancelled it)
aborts that ingress's open requests: nobody is left to read their tokens.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable

from policies.errors import EngineFailure, Overloaded
from policies.routing.types import step_allowance_ms
from workers.engine import Request, ServingEngine, TokenEvent

log = logging.getLogger(__name__)


def merged(events: list[TokenEvent]) -> dict:
    """One message for a run of one request's token events: their text, how many tokens, how it ended."""
    return {"text": "".join(e.text for e in events), "tokens": sum(e.token_id is not None for e in events),
            "finish_reason": events[-1].finish_reason}


class OpenRequest:
    """What the worker keeps of an accepted request until its last message leaves."""

    __slots__ = ("request", "arrived", "first_at", "tokens")

    def __init__(self, request: dict):
        self.request, self.arrived, self.first_at, self.tokens = request, time.monotonic(), None, 0


class Outbox:
    """One ingress's undelivered token events on this replica: the engine's sink for all its requests."""

    __slots__ = ("pending", "arrived", "open", "generation")

    def __init__(self):
        self.pending: dict[str, list[TokenEvent]] = {}  # request id -> events not yet sent
        self.arrived = asyncio.Event()
        self.open: dict[str, OpenRequest] = {}  # accepted and not finished
        self.generation = 0  # which subscription reads this outbox (a newer one replaces an older)

    def put_nowait(self, event: TokenEvent) -> None:  # the engine's TokenSink, on the loop thread
        events = self.pending.get(event.request_id)
        if events is None:
            self.pending[event.request_id] = [event]
        else:
            events.append(event)
        self.arrived.set()

    def take(self) -> dict[str, list[TokenEvent]]:
        pending, self.pending = self.pending, {}
        self.arrived.clear()
        return pending


RequestDone = Callable[[dict, float | None, float, int], None]  # (request, ttft_s, duration_s, tokens)


class Subscriptions:
    """Submit, abort and subscribe over one engine; ``max_open`` accepted requests at most (then Overloaded)."""

    def __init__(self, engine: ServingEngine, to_request: Callable[[dict], Request], max_open: int,
                 request_done: RequestDone | None = None):
        self.engine = engine
        self.to_request = to_request
        self.max_open = max_open
        self.request_done = request_done
        self.outboxes: dict[str, Outbox] = {}  # ingress id -> its outbox
        self.num_open = 0

    def submit(self, request: dict) -> None:
        """Accept a request of ingress ``request["ingress"]``; raises at once if it cannot be served."""
        if self.num_open >= self.max_open:
            raise Overloaded(f"this worker holds {self.num_open} requests, its limit: retry after a short wait")
        outbox = self._outbox(request["ingress"])
        self.engine.submit(self.to_request(request), sink=outbox)  # InvalidRequest / ContextTooLong raise here
        outbox.open[request["request_id"]] = OpenRequest(request)
        self.num_open += 1

    def abort(self, ingress: str, request_id: str) -> bool:
        """The ingress's client left: forget the request and free its cache at the engine's next step."""
        outbox = self.outboxes.get(ingress)
        if outbox is None or outbox.open.pop(request_id, None) is None:
            return False
        self.num_open -= 1
        self.engine.abort(request_id)
        return True

    async def stream(self, ingress: str) -> AsyncIterator[dict]:
        """The subscription of one ingress: a message per step that gave its requests tokens, until closed."""
        outbox = self._outbox(ingress)
        if outbox.generation:  # the ingress reconnected: wake the older reader so that it ends
            outbox.arrived.set()
        outbox.generation += 1
        mine = outbox.generation
        try:
            while True:
                await outbox.arrived.wait()
                if outbox.generation != mine:
                    return
                message = self._messages(outbox)
                if message:
                    yield message
        finally:
            if outbox.generation == mine:
                self._close(ingress, outbox)

    def step_allowances(self, now: float) -> dict[str, float]:
        """Per open request with a TPOT budget, the longest mean step it can still take and meet it (ms,
        ``step_allowance_ms``), timed from when its first token left here: the router keeps new rows from
        slowing the batch past it."""
        allowances = {}
        for outbox in self.outboxes.values():
            for request_id, record in outbox.open.items():
                tpot_ms = (record.request.get("sla") or {}).get("tpot_ms")
                if tpot_ms is None:
                    continue
                decoding_ms = 0.0 if record.first_at is None else 1000 * (now - record.first_at)
                max_tokens = record.request.get("params", {}).get("max_tokens", 16)
                allowance = step_allowance_ms(tpot_ms, max_tokens, record.tokens, decoding_ms)
                if allowance != math.inf:
                    allowances[request_id] = round(allowance, 3)
        return allowances

    def _messages(self, outbox: Outbox) -> dict[str, dict]:
        message, now = {}, time.monotonic()
        for request_id, events in outbox.take().items():
            record = outbox.open.get(request_id)
            if record is None:
                continue  # aborted by its ingress
            part = merged(events)
            last = events[-1]
            if last.finish_reason == "error":
                part["error"] = EngineFailure(f"request {request_id}: {last.error}")
            if record.first_at is None:
                record.first_at = now
            record.tokens += part["tokens"]
            if last.finished:
                del outbox.open[request_id]
                self.num_open -= 1
                if self.request_done is not None:
                    self.request_done(record.request, record.first_at - record.arrived, now - record.arrived,
                                      record.tokens)
            message[request_id] = part
        return message

    def _close(self, ingress: str, outbox: Outbox) -> None:
        if outbox.open:
            log.info("the subscription of ingress %s closed: aborting its %d open requests", ingress,
                     len(outbox.open))
        for request_id in list(outbox.open):
            self.abort(ingress, request_id)
        self.outboxes.pop(ingress, None)

    def _outbox(self, ingress: str) -> Outbox:
        outbox = self.outboxes.get(ingress)
        if outbox is None:
            outbox = self.outboxes[ingress] = Outbox()
        return outbox
