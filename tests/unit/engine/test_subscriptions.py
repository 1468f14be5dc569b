"""The ingress path, without Ray: router/worker_streams.py over workers/subscriptions.py (a WorkerServer in process).

Serve's handle is replaced by one that calls the server's methods directly, so these tests see what a client
sees (tokens, their order, explicit errors, freed caches), never how tokens were split into messages.
"""

import asyncio
import contextvars
from types import SimpleNamespace

import pytest

from policies.errors import ContextTooLong, Overloaded, WorkerUnavailable
from router.worker_streams import WorkerStreams
from workers.deployment import WorkerServer, WorkerSpec
from workers.engine import AsyncEngine


class Handle:
    """Serve's DeploymentHandle, in process: ``handle.method.remote(arg)`` calls ``server.method(arg)``."""

    def __init__(self, server, subscribe=None):
        self.server, self.subscribe_wrapper = server, subscribe

    def options(self, stream: bool = False) -> "Handle":
        return self

    def __getattr__(self, name):
        method = getattr(self.server, name)
        if name == "subscribe" and self.subscribe_wrapper is not None:
            return SimpleNamespace(remote=lambda arg: self.subscribe_wrapper(method(arg)))
        return SimpleNamespace(remote=method)


def request(request_id: str, placement: str = "ASGKAS", max_tokens: int = 12, prompt=(1, 5, 9, 13)) -> dict:
    return {"request_id": request_id, "prompt_ids": list(prompt), "placement": placement,
            "params": {"max_tokens": max_tokens, "ignore_eos": True}}


@pytest.fixture
def make_server(make_engine, tiny_checkpoint):
    def make(**spec) -> WorkerServer:
        return WorkerServer(WorkerSpec(str(tiny_checkpoint), **spec),
                            engine_factory=lambda s: AsyncEngine(make_engine()))

    return make


async def read(tokens) -> tuple[str, int, str]:
    text, count, finish = "", 0, None
    async for message in tokens:
        text, count, finish = text + message["text"], count + message["tokens"], message["finish_reason"]
    return text, count, finish


async def settle(server: WorkerServer) -> None:
    """Until the engine holds nothing (bounded: a few hundred loop turns, each letting a step land)."""
    for _ in range(500):
        stats = server.engine.stats()
        if not stats.running and not stats.waiting and stats.cache_used_bytes == 0:
            return
        await asyncio.sleep(0.01)


def test_concurrent_requests_get_the_tokens_each_gets_alone(make_server):
    codes = ["ASGKAS", "AAAAAA", "GGGGGG", "KGSAGK", "SSSSSS"]
    server = make_server()

    async def main():
        alone = []
        for i, code in enumerate(codes):  # one at a time, on the per-request stream
            parts = [m async for m in server.generate(request(f"alone{i}", code, max_tokens=10 + 3 * i))]
            alone.append(("".join(p["text"] for p in parts), sum(p["tokens"] for p in parts)))
        streams = WorkerStreams(Handle(server))
        submitted = [await streams.submit(request(f"r{i}", code, max_tokens=10 + 3 * i))
                     for i, code in enumerate(codes)]
        together = await asyncio.gather(*(read(t) for t in submitted))
        await streams.close()
        await server.engine.stop()
        return alone, together

    alone, together = asyncio.run(main())
    assert [(text, count) for text, count, _ in together] == alone
    assert [count for _, count, _ in together] == [10 + 3 * i for i in range(len(codes))]
    assert {finish for _, _, finish in together} == {"length"}


def test_a_client_that_leaves_aborts_its_request_and_frees_the_cache(make_server):
    server = make_server()

    async def main():
        streams = WorkerStreams(Handle(server))
        leaving = await streams.submit(request("leaves", max_tokens=400))
        staying = await streams.submit(request("stays", max_tokens=20))
        await anext(leaving)
        leaving.close()
        result = await read(staying)
        await settle(server)
        stats = server.engine.stats()
        await streams.close()
        await server.engine.stop()
        return result, stats, server.subscriptions.num_open

    (_, count, finish), stats, num_open = asyncio.run(main())
    assert (count, finish) == (20, "length")
    assert not stats.running and not stats.waiting and stats.cache_used_bytes == 0 and num_open == 0


def test_a_broken_subscription_ends_every_open_request_with_an_error(make_server):
    server = make_server()

    async def breaks_after_one(stream):
        async for message in stream:
            yield message
            break
        await stream.aclose()  # the worker sees its subscription close, as when the ingress's link drops
        raise ConnectionError("the replica's actor died")

    async def main():
        streams = WorkerStreams(Handle(server, subscribe=breaks_after_one))
        submitted = [await streams.submit(request(f"r{i}", max_tokens=300)) for i in range(3)]
        outcomes = []
        for tokens in submitted:
            try:
                await read(tokens)
                outcomes.append("finished")
            except WorkerUnavailable as exc:
                outcomes.append(exc.message)
        await settle(server)  # the worker aborted them: nobody reads their tokens any more
        stats = server.engine.stats()
        await server.engine.stop()
        return outcomes, stats

    outcomes, stats = asyncio.run(main())
    assert all("worker replica serving this request failed" in o and "died" in o for o in outcomes), outcomes
    assert not stats.running and stats.cache_used_bytes == 0


def test_refusals_raise_at_submit_and_a_full_worker_is_overloaded(make_server):
    server = make_server(max_open_requests=1)

    async def main():
        streams = WorkerStreams(Handle(server))
        with pytest.raises(ContextTooLong):
            await streams.submit(request("long", max_tokens=10**6))
        first = await streams.submit(request("one", max_tokens=50))
        with pytest.raises(Overloaded):
            await streams.submit(request("two"))
        result = await read(first)
        after = await read(await streams.submit(request("three", max_tokens=5)))  # the slot is free again
        await streams.close()
        await server.engine.stop()
        return result, after

    (_, count, _), (_, after, _) = asyncio.run(main())
    assert (count, after) == (50, 5)


def test_a_subscription_for_another_replica_fails(make_server):
    server = make_server()
    server.replica_id = "this-one"

    async def main():
        with pytest.raises(WorkerUnavailable):
            async for _ in server.subscribe({"ingress": "i", "replica_id": "gone"}):
                pass

    asyncio.run(main())


def test_a_client_that_leaves_while_its_submit_is_in_flight_gets_its_request_aborted(make_server):
    server = make_server()
    answer_may_leave = asyncio.Event()

    class SlowSubmit(Handle):  # the worker has accepted the request; its answer is still on the way
        def __getattr__(self, name):
            if name != "submit":
                return super().__getattr__(name)

            async def submit(arg):
                replica = await server.submit(arg)
                await answer_may_leave.wait()
                return replica

            return SimpleNamespace(remote=submit)

    async def main():
        streams = WorkerStreams(SlowSubmit(server))
        client = asyncio.ensure_future(streams.submit(request("leaves", max_tokens=400)))
        for _ in range(500):  # until the engine runs it
            if server.engine.stats().running:
                break
            await asyncio.sleep(0.01)
        client.cancel()  # the client left before the answer
        answer_may_leave.set()
        await settle(server)
        stats = server.engine.stats()
        await streams.close()
        await server.engine.stop()
        return client.cancelled(), stats

    cancelled, stats = asyncio.run(main())
    assert cancelled
    assert not stats.running and stats.cache_used_bytes == 0
    assert stats.finished.abort == 1 and stats.finished.length == 0


def test_subscriptions_and_aborts_are_not_calls_of_the_request_that_starts_them(make_server):
    """Serve cancels the calls a request makes when that request is cancelled (it finds them through context
    variables): an abort sent because the client left, or the subscription every request reads, must not be."""
    server = make_server()
    parent = contextvars.ContextVar("serve_request", default=None)
    seen = {}

    class Recording(Handle):
        def __getattr__(self, name):
            method = super().__getattr__(name)

            def remote(arg):
                seen.setdefault(name, parent.get())
                return method.remote(arg)

            return SimpleNamespace(remote=remote)

    async def main():
        parent.set("the request that is leaving")
        streams = WorkerStreams(Recording(server))
        tokens = await streams.submit(request("leaves", max_tokens=400))
        await anext(tokens)
        tokens.close()
        await settle(server)
        await streams.close()
        await server.engine.stop()

    asyncio.run(main())
    assert seen == {"submit": None, "subscribe": None, "abort": None}


def test_a_replica_reports_how_long_a_step_its_budgeted_requests_can_still_take(make_server):
    """What the router protects (``step_allowance_ms``): per open request with a TPOT budget, from its
    budget, its max_tokens, the tokens it has had and the time since its first token left."""
    from policies.routing.types import step_allowance_ms

    server = make_server()

    async def main():
        budgeted = {**request("b", max_tokens=400), "ingress": "i1", "sla": {"ttft_ms": 1000, "tpot_ms": 50}}
        await server.submit(budgeted)
        await server.submit({**request("free", max_tokens=400), "ingress": "i1", "sla": None})
        before = server.subscriptions.step_allowances(0.0)
        stream = server.subscribe({"ingress": "i1"})
        await stream.__anext__()  # the first message: some requests' first tokens
        record = server.subscriptions.outboxes["i1"].open["b"]
        while record.first_at is None:
            await stream.__anext__()
        stats = await server.record_routing_stats()
        allowances = server.subscriptions.step_allowances(record.first_at + 0.02)
        expected = step_allowance_ms(50, 400, record.tokens, 20.0)
        await stream.aclose()
        await server.engine.stop()
        return before, stats, allowances, expected

    before, stats, allowances, expected = asyncio.run(main())
    assert before == {"b": 50}  # no token yet: the whole budget per step
    assert allowances == {"b": pytest.approx(expected, abs=1e-3)}  # the budget-free request is not listed
    assert set(stats["step_allowance_ms"]) <= {"b"}


@pytest.mark.parametrize("unknown_for", [2, 100])
def test_a_subscription_that_reaches_another_replica_is_tried_again_then_fails_explicitly(make_server, monkeypatch,
                                                                                            unknown_for):
    """Serve tells each handle about a new replica on its own time: the submit may reach a replica that the
    stream handle does not know yet, so its pinned subscription lands elsewhere. It is tried again; a
    replica that stays unknown (it died) fails its requests after the last attempt."""
    from policies.errors import ReplicaNotReached
    from router import worker_streams

    monkeypatch.setattr(worker_streams, "SUBSCRIBE_RETRY_S", 0.01)
    server = make_server()
    tries = []

    def not_yet_known(stream):
        tries.append(1)
        if len(tries) <= unknown_for:
            async def elsewhere():
                await stream.aclose()
                raise ReplicaNotReached("worker replica r0 is gone")
                yield  # an async generator, as Serve's streaming handle returns
            return elsewhere()
        return stream

    async def main():
        streams = WorkerStreams(Handle(server, subscribe=not_yet_known))
        tokens = await streams.submit(request("r", max_tokens=20))
        try:
            outcome = await read(tokens)
        except WorkerUnavailable as exc:
            outcome = exc.message
        await settle(server)
        await streams.close()
        await server.engine.stop()
        return outcome

    outcome = asyncio.run(main())
    if unknown_for == 2:  # known on the third try: served in full
        assert outcome[1:] == (20, "length") and len(tries) == 3
    else:
        assert "worker replica serving this request failed" in outcome and "is gone" in outcome
        assert len(tries) == worker_streams.SUBSCRIBE_ATTEMPTS
