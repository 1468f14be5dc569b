"""This ingress's requests on the worker replicas: a unary submit each, one subscription per replica for all.

The worker sends one message per engine step for all of this ingress's requests (``workers/subscriptions.py``);
here each message is split into the requests' own queues, read by their HTTP responses. A request is
registered before it is submitted (its first tokens may come before the submit's answer), and pinned to the
replica that accepted it. When a subscription breaks (the replica died, or its stream failed), every request
open on that replica ends with ``WorkerUnavailable``; the next request there opens a new subscription. A
response that stops reading (the client left) aborts its request on the worker.

Calls made on behalf of every request (the subscriptions) or after a request is over (aborts) run outside
the Serve request that happened to start them (``detached``): Serve cancels the calls a request makes when
that request is cancelled, and it is cancelled exactly when its client leaves, the moment its abort must go
out. A submit whose caller is cancelled still waits for its answer, so that the request it may have started
is aborted on the replica that answer names.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid

from policies.errors import ReplicaNotReached, SupernetError, WorkerUnavailable
from router.errors import as_supernet_error

log = logging.getLogger(__name__)
# A subscription that reached another replica than its own is tried again this many times, this far apart.
SUBSCRIBE_ATTEMPTS, SUBSCRIBE_RETRY_S = 10, 0.25
_UNSUBMITTED = object()  # a request's replica before the submit's answer (no subscription can fail it yet)


def detached(call, *args):
    """``call(*args)`` outside the caller's context: not a child of the Serve request running now, so not
    cancelled with it. (Serve and Ray find a call's parent request through context variables.)"""
    return contextvars.Context().run(call, *args)


class RequestTokens:
    """One request's messages, ``{text, tokens, finish_reason}``, until the finishing one; ``close`` aborts."""

    __slots__ = ("request_id", "replica_id", "queue", "_streams", "_done")

    def __init__(self, request_id: str, streams: "WorkerStreams"):
        self.request_id, self.replica_id = request_id, _UNSUBMITTED
        self.queue: asyncio.Queue = asyncio.Queue()
        self._streams, self._done = streams, False

    def __aiter__(self) -> "RequestTokens":
        return self

    async def __anext__(self) -> dict:
        if self._done:
            raise StopAsyncIteration
        message = await self.queue.get()
        if isinstance(message, SupernetError):  # the subscription broke
            self._finish()
            raise message
        error = message.get("error")
        if error is not None or message["finish_reason"] is not None:
            self._finish()
        if error is not None:
            raise as_supernet_error(error)
        return message

    def close(self) -> None:
        """The reader is gone: unless the request finished, abort it on its worker."""
        if not self._done:
            self._finish()
            self._streams.abort(self)

    def _finish(self) -> None:
        self._done = True
        self._streams.forget(self.request_id)


class WorkerStreams:
    """``tokens = await streams.submit(worker_request)``; ``async for message in tokens``; ``tokens.close()``."""

    def __init__(self, handle):
        self.ingress_id = uuid.uuid4().hex  # this ingress process, as the workers know it
        self._handle = handle  # unary calls: submit, abort (Serve's handle; routed by router/replica_router.py)
        self._stream_handle = handle.options(stream=True)  # cached: options() is not free
        self._requests: dict[str, RequestTokens] = {}
        self._subscriptions: dict[str, asyncio.Task] = {}  # replica id -> the task reading its subscription
        self._background: set[asyncio.Task] = set()  # fire-and-forget aborts, held until done

    async def submit(self, request: dict) -> RequestTokens:
        """Submit to the replica the request names (or Serve's choice); raises what refused it."""
        tokens = self._requests[request["request_id"]] = RequestTokens(request["request_id"], self)
        answer = detached(asyncio.ensure_future, self._submitted(request))
        try:
            replica_id = await asyncio.shield(answer)
        except asyncio.CancelledError:  # the client left: once the answer names the replica, abort there
            tokens._finish()
            answer.add_done_callback(lambda _: self._abort_late(answer, tokens))
            raise
        except BaseException:
            self.forget(request["request_id"])
            raise
        tokens.replica_id = replica_id
        self._subscribe(replica_id)
        return tokens

    async def _submitted(self, request: dict) -> str:
        return await self._handle.submit.remote({**request, "ingress": self.ingress_id})

    def _abort_late(self, answer: asyncio.Future, tokens: RequestTokens) -> None:
        if not answer.cancelled() and answer.exception() is None:
            tokens.replica_id = answer.result()
            self.abort(tokens)

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def abort(self, tokens: RequestTokens) -> None:
        call = detached(self._handle.abort.remote, {"ingress": self.ingress_id, "request_id": tokens.request_id,
                                                    "replica_id": tokens.replica_id})
        task = detached(asyncio.ensure_future, self._quietly(call, tokens.request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._subscriptions.values()):
            task.cancel()

    def _subscribe(self, replica_id: str | None) -> None:
        task = self._subscriptions.get(replica_id)
        if task is None or task.done():
            # detached: it serves every request on that replica, not only the one that opened it
            self._subscriptions[replica_id] = detached(asyncio.ensure_future, self._read(replica_id))

    async def _read(self, replica_id: str | None) -> None:
        reason = "its stream ended"
        try:
            for attempt in range(SUBSCRIBE_ATTEMPTS):
                received = False
                try:
                    stream = self._stream_handle.subscribe.remote({"ingress": self.ingress_id,
                                                                    "replica_id": replica_id})
                    async for message in stream:
                        received = True
                        requests = self._requests
                        for request_id, part in message.items():
                            tokens = requests.get(request_id)
                            if tokens is not None:
                                tokens.queue.put_nowait(part)
                    break
                except Exception as exc:  # noqa: BLE001: mapped, then retried or handled below
                    # The replica took the submit, so it lives; this handle may not know it yet (a replica
                    # that just started reaches each handle on its own time). A replica that died stays
                    # unknown, and its requests fail after the last attempt.
                    if (received or attempt == SUBSCRIBE_ATTEMPTS - 1
                            or not isinstance(as_supernet_error(exc), ReplicaNotReached)):
                        raise
                    await asyncio.sleep(SUBSCRIBE_RETRY_S)
        except asyncio.CancelledError:
            reason = "the ingress is stopping"
            raise
        except Exception as exc:  # noqa: BLE001: whatever broke it, its requests end with an explicit error
            reason = as_supernet_error(exc).message
            log.warning("the subscription to worker replica %s broke: %s", replica_id, reason)
        finally:
            if self._subscriptions.get(replica_id) is asyncio.current_task():
                del self._subscriptions[replica_id]
            self._fail(replica_id, f"the worker replica serving this request failed ({reason})")

    def _fail(self, replica_id: str | None, reason: str) -> None:
        for tokens in [t for t in self._requests.values() if t.replica_id == replica_id]:
            tokens.queue.put_nowait(WorkerUnavailable(reason))
            self.abort(tokens)  # if the replica lives on (only the stream broke), it stops computing them

    async def _quietly(self, call, request_id: str) -> None:
        try:
            await call
        except Exception as exc:  # noqa: BLE001: the replica may be gone, and with it the request
            log.debug("aborting request %s failed: %s", request_id, exc)
