"""The engine gives every request exactly the tokens it gets alone (workers.generate, one request at a
time): concurrent placements in one batch, requests joining mid-flight, prompts prefilled in chunks
of 8 tokens (prompts of 20-40 tokens cross the tiny checkpoint's window of 16), sync and async."""

import asyncio

import pytest
import torch

from workers.engine import AsyncEngine, Engine, EngineConfig, Request
from workers.generate import GenerationRequest, generate
from workers.sampling import SamplingParams

CODES = ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS", "KGSAGK", "SSGGAA", "GGGGGG"]


@pytest.fixture(scope="module")
def requests(tiny_model):
    generator = torch.Generator().manual_seed(11)
    out = []
    for i, code in enumerate(CODES):
        length = int(torch.randint(20, 41, (1,), generator=generator))
        prompt = [1] + torch.randint(4, tiny_model.config.vocab_size, (length - 1,), generator=generator).tolist()
        sampled = i in (4, 7)  # two seeded random samplers ride along with the greedy rows
        params = SamplingParams(max_tokens=10 + 2 * i, temperature=0.8 if sampled else 0.0, top_k=50 if sampled else 0,
                                top_p=0.9 if sampled else 1.0, seed=100 + i)
        out.append(Request(prompt, tiny_model.config.placement(code), params, request_id=f"r{i}"))
    return out


@pytest.fixture(scope="module")
def alone(tiny_model, requests):
    """Each request generated on its own by the reference loop."""
    return {r.request_id: generate(tiny_model, [GenerationRequest(list(r.prompt_ids), r.placement, r.params)])[0]
            for r in requests}


def make_engine(model, tokenizer=None, page_tokens=None):
    config = EngineConfig(cache_budget_bytes=50_000_000, max_prefill_tokens=8, check_invariants=True,
                          page_tokens=page_tokens)
    return Engine(model, config, tokenizer)


def run_all(engine, requests, alone) -> list:
    """Submit every request, step until idle, and check each got exactly its tokens alone; the events."""
    for request in requests:
        engine.add_request(request)
    events = engine.run_until_idle()
    got = tokens_by_request(events)
    for request in requests:
        assert got[request.request_id] == alone[request.request_id].tokens, request.placement.code
    return events


def tokens_by_request(events):
    out = {}
    for event in events:
        if event.token_id is not None:
            out.setdefault(event.request_id, []).append(event.token_id)
    return out


@pytest.mark.parametrize("path", ["torch", "kernels"])
@pytest.mark.parametrize("page_tokens", [None, 4])
def test_concurrent_requests_get_the_tokens_they_get_alone(tiny_model, kernel_model, requests, alone, path,
                                                           page_tokens):
    engine = make_engine(tiny_model if path == "torch" else kernel_model, page_tokens=page_tokens)
    events = run_all(engine, requests, alone)
    finish = {e.request_id: e.finish_reason for e in events if e.finished}
    assert finish == {r.request_id: alone[r.request_id].finish_reason for r in requests}
    steps = engine.stats().recent_steps
    assert any(s.num_decode_rows and s.num_prefill_tokens for s in steps)  # decodes and chunks shared steps
    assert max(s.num_prefill_tokens for s in steps) == 8


def test_requests_joining_mid_flight_get_the_tokens_they_get_alone(tiny_model, requests, alone):
    engine = make_engine(tiny_model)
    joins = {0: requests[:2], 3: requests[2:4], 7: requests[4:5], 8: requests[5:7], 15: requests[7:]}
    events, step = [], 0
    while step <= max(joins) or engine.has_work():
        for request in joins.get(step, []):
            engine.add_request(request)
        events += engine.step()
        step += 1
    got = tokens_by_request(events)
    for request in requests:
        assert got[request.request_id] == alone[request.request_id].tokens, request.placement.code


def test_async_streams_get_the_tokens_they_get_alone(tiny_model, tiny_tokenizer, requests, alone):
    async def client(engine, request, delay):
        await asyncio.sleep(delay)
        return request.request_id, await engine.submit(request).collect()

    async def main():
        async with AsyncEngine(make_engine(tiny_model, tiny_tokenizer)) as engine:
            return dict(await asyncio.gather(*(client(engine, r, 0.01 * i) for i, r in enumerate(requests))))

    streams = asyncio.run(main())
    for request in requests:
        events = streams[request.request_id]
        tokens = [e.token_id for e in events]
        assert tokens == alone[request.request_id].tokens, request.placement.code
        assert events[-1].finish_reason == alone[request.request_id].finish_reason
        assert "".join(e.text for e in events) == tiny_tokenizer.decode(tokens)


def test_a_nearly_full_pool_reusing_blocks_after_finishes_gives_the_tokens_of_each_alone(tiny_model, requests, alone):
    """A pool that holds the two largest requests and no more: requests wait for blocks, take blocks others
    just gave back (dirty: zeroed at allocation) and run beside rows of other lengths on shared pages."""
    memory = tiny_model.config.memory_model(kv_bytes=4, page_tokens=4)
    sizes = sorted(memory.sequence_bytes(r.placement, len(r.prompt_ids) + r.params.max_tokens) for r in requests)
    config = EngineConfig(cache_budget_bytes=sizes[-1] + sizes[-2] + memory.block_bytes, max_prefill_tokens=8,
                          check_invariants=True, page_tokens=4)
    engine = Engine(tiny_model, config)
    taken = []
    allocate = engine.pool.allocate

    def recording(placement, capacity, speculative_tokens=0):
        blocks = allocate(placement, capacity, speculative_tokens)
        taken.append(set(blocks.block_ids))
        return blocks

    engine.pool.allocate = recording
    run_all(engine, requests, alone)
    assert max(s.num_rows for s in engine.stats().recent_steps) < len(requests)  # the pool held back the rest
    assert any(a & b for i, a in enumerate(taken) for b in taken[:i])  # blocks were handed out again
    assert engine.pool.held_bytes == 0
