"""The engine seam (workers/engine/seam.py): the worker replica needs only submit, abort, stats and facts."""

import asyncio

from workers.deployment import WorkerServer, WorkerSpec
from workers.engine import AsyncEngine, ModelFacts, ServingEngine


class SeamOnly:
    """An engine that offers exactly the seam's calls (delegated to ours), so reaching past them fails."""

    def __init__(self, inner: AsyncEngine):
        self._inner = inner
        self.calls: list[str] = []

    @property
    def facts(self) -> ModelFacts:
        return self._inner.facts

    @property
    def started(self) -> bool:
        return self._inner.started

    @property
    def failure(self):
        return self._inner.failure

    def start(self):
        self.calls.append("start")
        self._inner.start()

    async def stop(self):
        await self._inner.stop()

    def submit(self, request):
        self.calls.append("submit")
        return self._inner.submit(request)

    def abort(self, request_id):
        return self._inner.abort(request_id)

    def stats(self):
        self.calls.append("stats")
        return self._inner.stats()


def test_our_engine_is_a_serving_engine_and_states_its_model(make_engine, tiny_model):
    engine = AsyncEngine(make_engine())
    assert isinstance(engine, ServingEngine)
    assert engine.facts == ModelFacts(6, tiny_model.config.vocab_size, tiny_model.config.max_position_embeddings,
                                      "float32", "cpu")


def test_a_replica_runs_on_any_serving_engine(make_engine, tiny_model, tiny_checkpoint):
    seam = SeamOnly(AsyncEngine(make_engine()))
    server = WorkerServer(WorkerSpec(str(tiny_checkpoint)), engine_factory=lambda spec: seam)
    request = {"request_id": "r1", "prompt_ids": [1, 5, 9], "placement": "ASGKAS",
               "params": {"max_tokens": 3, "ignore_eos": True}}

    async def main():
        events = [event async for event in server.generate(request)]
        stats = await server.record_routing_stats()
        await seam.stop()
        return events, stats

    events, stats = asyncio.run(main())
    # Tokens that piled up while the consumer was busy arrive merged, so count tokens, not messages.
    assert sum(e["tokens"] for e in events) == 3 and events[-1]["finish_reason"] == "length"
    assert all(e["finish_reason"] is None for e in events[:-1])
    assert stats["running"] == [] and stats["cache_budget_bytes"] > 0
    assert stats["arrivals_per_s"] > 0 and stats["arrival_prompt_tokens"] == 3  # what the router prices ahead
    assert seam.calls[:2] == ["start", "submit"] and "stats" in seam.calls
