"""The worker's token batches: the next event plus whatever already waits behind it, never waiting for more."""

import asyncio

import pytest

from policies.errors import EngineFailure
from workers.deployment import batches


class Source:
    """An event stream fed by the test: ``put`` queues events, ``fail`` ends it with an error."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def __aiter__(self):
        return self._events()

    async def _events(self):
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    return
                yield item
        finally:
            self.closed = True


def test_events_that_piled_up_go_out_together_and_a_lone_one_alone():
    async def run():
        source = Source()
        out = batches(source)
        for event in "abc":
            source.queue.put_nowait(event)
        first = await anext(out)
        source.queue.put_nowait("d")
        second = await anext(out)
        source.queue.put_nowait(None)
        rest = [batch async for batch in out]
        return first, second, rest

    first, second, rest = asyncio.run(run())
    assert (first, second, rest) == (["a", "b", "c"], ["d"], [])


def test_an_error_arrives_after_the_events_before_it():
    async def run():
        source = Source()
        source.queue.put_nowait("a")
        source.queue.put_nowait(EngineFailure("step failed"))
        out = batches(source)
        seen = [await anext(out)]
        with pytest.raises(EngineFailure, match="step failed"):
            await anext(out)
        return seen

    assert asyncio.run(run()) == [["a"]]


def test_closing_the_batches_closes_the_stream():
    async def run():
        source = Source()
        source.queue.put_nowait("a")
        out = batches(source)
        await anext(out)
        await out.aclose()
        await asyncio.sleep(0)  # the pump task handles its cancellation
        return source.closed

    assert asyncio.run(run())
