"""The asyncio engine: streams, cancellation by the consumer, explicit abort, errors, a free event loop.

pytest-asyncio is not a dependency: each test runs its coroutine with asyncio.run.
"""

import asyncio
import time

import pytest

from policies.errors import ContextTooLong, EngineFailure, InvalidRequest
from workers.engine import AsyncEngine


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_stream_yields_tokens_then_finishes(make_engine, make_request, tiny_tokenizer):
    async def main():
        async with AsyncEngine(make_engine()) as engine:
            events = await engine.submit(make_request("ASGKAS", max_tokens=7, ignore_eos=True)).collect()
        assert [e.finish_reason for e in events] == [None] * 6 + ["length"]
        tokens = [e.token_id for e in events]
        assert "".join(e.text for e in events) == tiny_tokenizer.decode(tokens)

    asyncio.run(main())


def test_refusal_is_raised_at_submission(tiny_model, make_engine, make_request):
    async def main():
        block = tiny_model.config.memory_model(kv_bytes=4).block_bytes
        async with AsyncEngine(make_engine(budget_bytes=3 * block)) as engine:  # two blocks lent: too few
            with pytest.raises(ContextTooLong, match="could never be admitted"):
                engine.submit(make_request("AAAAAA"))
            assert engine.stats().num_waiting == 0
        async with AsyncEngine(make_engine()) as engine:
            first = engine.submit(make_request("GGGGGG", request_id="same", max_tokens=5, ignore_eos=True))
            with pytest.raises(InvalidRequest, match="already in use"):
                engine.submit(make_request("GGGGGG", request_id="same"))
            assert len(await first.collect()) == 5  # the first stream is untouched

    asyncio.run(main())


@pytest.mark.parametrize("how", ["break", "cancel", "abort"])
def test_a_client_that_leaves_frees_its_cache(make_engine, make_request, how):
    async def main():
        async with AsyncEngine(make_engine()) as engine:
            keep = engine.submit(make_request("AAAAAA", max_tokens=30, ignore_eos=True))
            keeper = asyncio.create_task(keep.collect())
            leaving = make_request("SSSSSS", max_tokens=500, ignore_eos=True)
            stream = engine.submit(leaving)
            received = []

            async def consume():
                async for event in stream:
                    received.append(event)
                    if len(received) == 3 and how == "break":
                        break
                    if len(received) == 3 and how == "abort":
                        assert engine.abort(leaving.request_id)

            consumer = asyncio.create_task(consume())
            if how == "cancel":
                await wait_until(lambda: len(received) >= 3)
                consumer.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await consumer
            else:
                await consumer
            await wait_until(lambda: all(s.request_id != leaving.request_id for s in engine.engine.scheduler.running))
            assert len(received) < 100
            if how == "abort":  # an explicit abort ends the stream with its own event
                assert received[-1].finish_reason == "abort" and received[-1].token_id is None
            kept = await keeper
            assert len(kept) == 30 and kept[-1].finish_reason == "length"
            await wait_until(lambda: engine.stats().cache_used_bytes == 0)

    asyncio.run(main())


def test_steps_do_not_block_the_event_loop(make_engine, make_request):
    """The loop keeps running while the model computes: ticks land inside steps (none could if steps
    ran on the loop's thread). Counted rather than timed, so a loaded machine does not make it flaky."""
    engine = make_engine()
    steps, run = [], engine.runner.run

    def timed_run(batch):
        started = time.monotonic()
        try:
            return run(batch)
        finally:
            steps.append((started, time.monotonic()))

    engine.runner.run = timed_run

    async def main():
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.001)

        async with AsyncEngine(engine) as running:
            clock = asyncio.create_task(ticker())
            streams = [running.submit(make_request(code, max_tokens=40, ignore_eos=True))
                       for code in ("AAAAAA", "GGGGGG", "KKKKKK", "SSSSSS")]
            await asyncio.gather(*(s.collect() for s in streams))
            clock.cancel()
        return ticks

    ticks = asyncio.run(main())
    inside = sum(1 for t in ticks if any(a < t < b for a, b in steps))
    assert len(steps) >= 40 and inside >= 10, f"{inside} of {len(ticks)} ticks fell inside {len(steps)} steps"


def test_a_failed_step_raises_in_the_affected_streams(make_engine, make_request, monkeypatch):
    async def main():
        engine = make_engine()
        monkeypatch.setattr(engine.runner, "run", lambda batch: (_ for _ in ()).throw(RuntimeError("kernel fault")))
        async with AsyncEngine(engine) as running:
            stream = running.submit(make_request("GGGGGG"))
            with pytest.raises(EngineFailure, match="kernel fault"):
                await stream.collect()
            assert running.stats().cache_used_bytes == 0

    asyncio.run(main())


def test_stopping_the_engine_ends_open_streams(make_engine, make_request):
    async def main():
        running = AsyncEngine(make_engine())
        await running.__aenter__()
        received = []

        async def consume(stream):
            async for event in stream:
                received.append(event)

        consumer = asyncio.create_task(consume(running.submit(make_request("GGGGGG", max_tokens=500, ignore_eos=True))))
        await wait_until(lambda: received)
        await running.stop()
        with pytest.raises(EngineFailure, match="stopped"):
            await consumer
        with pytest.raises(EngineFailure, match="not running"):
            running.submit(make_request())

    asyncio.run(main())
