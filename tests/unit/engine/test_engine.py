"""The synchronous engine on the tiny model: refusal, memory budget, cancellation, finish reasons, stats, errors."""

import dataclasses
import random

import pytest

from policies.errors import ConfigError, ContextTooLong, InvalidPlacement, InvalidRequest
from policies.placement import Placement
from workers.engine import Engine, EngineConfig, EngineStats, Request
from workers.engine.stats import FinishCounts
from workers.sampling import SamplingParams

from .conftest import PAGE_TOKENS, pool_budget

CODES = ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS", "KGSAGK"]


def by_request(events):
    out = {}
    for event in events:
        out.setdefault(event.request_id, []).append(event)
    return out


def cache_bytes(model, code, context):
    memory = model.config.memory_model(kv_bytes=4, page_tokens=PAGE_TOKENS)
    return memory.sequence_bytes(model.config.placement(code), context)


def test_request_that_can_never_fit_is_refused_at_submission(tiny_model, make_engine, make_request):
    engine = make_engine(budget_bytes=pool_budget(tiny_model, cache_bytes(tiny_model, "AAAAAA", 40)))
    request = make_request("AAAAAA", prompt_tokens=30, max_tokens=30, request_id="big")
    with pytest.raises(ContextTooLong) as raised:
        engine.add_request(request)
    message = raised.value.message
    assert f"{cache_bytes(tiny_model, 'AAAAAA', 60):,} bytes" in message and f"{engine.budget_bytes:,} bytes" in message
    assert "at most 40 tokens fit" in message and "GGGGGG" in message and "KKKKKK" in message
    assert not engine.has_work() and engine.stats().num_waiting == 0
    engine.add_request(make_request("AAAAAA", prompt_tokens=30, max_tokens=10))  # exactly the budget: admitted
    engine.run_until_idle()


def test_bad_requests_are_refused(tiny_model, make_engine, make_request):
    engine = make_engine()
    placement = tiny_model.config.placement("AAAAAA")
    with pytest.raises(InvalidRequest, match="no tokens"):
        engine.add_request(Request([], placement))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.add_request(Request([1, tiny_model.config.vocab_size], placement))
    with pytest.raises(InvalidPlacement):
        engine.add_request(Request([1, 5], Placement.parse("AAA")))
    with pytest.raises(ContextTooLong, match="positions"):
        engine.add_request(Request([1, 5], placement, SamplingParams(max_tokens=10_000)))
    with pytest.raises(InvalidRequest, match="non-empty"):
        engine.add_request(Request([1, 5], placement, SamplingParams(stop=("",))))
    with pytest.raises(InvalidRequest, match="tokenizer"):
        make_engine(with_tokenizer=False).add_request(Request([1, 5], placement, SamplingParams(stop=("x",))))
    engine.add_request(make_request(request_id="same"))
    with pytest.raises(InvalidRequest, match="already in use"):
        engine.add_request(make_request(request_id="same"))
    with pytest.raises(ConfigError, match="cache_budget_bytes"):
        Engine(tiny_model, EngineConfig())


def test_max_tokens_and_eos_end_streams(make_engine, make_request):
    engine = make_engine()
    request = make_request("GGGGGG", request_id="free", max_tokens=9, ignore_eos=True)
    engine.add_request(request)
    free = engine.run_until_idle()
    tokens = [e.token_id for e in free]
    assert len(tokens) == 9 and free[-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in free[:-1])
    at = next(i for i in range(2, 9) if tokens[i] not in tokens[:i])
    engine.add_request(dataclasses.replace(request, request_id="eos", eos_token_id=tokens[at],
                                           params=dataclasses.replace(request.params, ignore_eos=False)))
    events = engine.run_until_idle()
    assert [e.token_id for e in events] == tokens[:at + 1] and events[-1].finish_reason == "stop"


def test_stop_string_ends_the_stream_and_is_not_in_the_text(make_engine, make_request, tiny_tokenizer):
    engine = make_engine()
    request = make_request("KGSAGK", prompt_tokens=20, request_id="free", max_tokens=30, ignore_eos=True)
    engine.add_request(request)
    free = engine.run_until_idle()
    tokens = [e.token_id for e in free]
    pieces = [tiny_tokenizer.decode(tokens[:i + 1]) for i in range(len(tokens))]
    text = pieces[-1]
    assert "".join(e.text for e in free) == text
    # a stop string that starts inside one token's text and ends inside a later one
    boundary = next(i for i in range(3, len(tokens)) if len(pieces[i - 1]) - len(pieces[i - 2]) >= 2
                    and len(pieces[i]) > len(pieces[i - 1]))
    stop = text[len(pieces[boundary - 1]) - 2:len(pieces[boundary - 1]) + 1]
    cut = text.index(stop)
    engine.add_request(dataclasses.replace(request, request_id="stopped",
                                           params=dataclasses.replace(request.params, stop=("never here", stop))))
    stopped = engine.run_until_idle()
    assert stopped[-1].finish_reason == "stop"
    assert "".join(e.text for e in stopped) == text[:cut]
    ended_at = next(i for i, piece in enumerate(pieces) if stop in piece)
    assert [e.token_id for e in stopped] == tokens[:ended_at + 1]


def test_cancel_frees_the_cache_at_the_next_step(make_engine, make_request):
    engine = make_engine()
    keep, cancel = make_request("AAAAAA", max_tokens=20), make_request("SSSSSS", max_tokens=20)
    engine.add_request(keep)
    engine.add_request(cancel)
    for _ in range(3):
        engine.step()
    sequence = next(s for s in engine.scheduler.running if s.request_id == cancel.request_id)
    used = engine.stats().cache_used_bytes
    assert engine.abort(cancel.request_id) and engine.stats().cache_used_bytes == used  # nothing before the step
    events = engine.step()
    assert [e.finish_reason for e in events if e.request_id == cancel.request_id] == ["abort"]
    assert engine.stats().cache_used_bytes == used - sequence.cache_bytes and sequence.blocks is None
    assert not engine.abort(cancel.request_id)  # already gone
    rest = engine.run_until_idle()
    assert all(e.request_id == keep.request_id for e in rest) and rest[-1].finish_reason == "length"


def test_burst_stays_within_budget_and_is_admitted_in_order(tiny_model, make_engine, make_request):
    requests = [make_request(CODES[i % len(CODES)], prompt_tokens=10 + i, max_tokens=4 + i % 5, ignore_eos=True)
                for i in range(12)]
    need = [cache_bytes(tiny_model, r.placement.code, r.context_tokens) for r in requests]
    engine = make_engine(budget_bytes=pool_budget(tiny_model, max(need) + sorted(need)[len(need) // 2]))
    for request in requests:
        engine.add_request(request)
    admitted, finished, peak = [], [], 0
    while engine.has_work():
        events = engine.step()
        stats = engine.stats()
        assert stats.cache_used_bytes <= stats.cache_budget_bytes
        peak = max(peak, stats.cache_used_bytes)
        admitted += [s.request_id for s in engine.scheduler.running if s.request_id not in admitted]
        admitted += [e.request_id for e in events if e.finished and e.request_id not in admitted]
        finished += [e.request_id for e in events if e.finished]
    order = [r.request_id for r in requests]
    assert admitted == order and sorted(finished) == sorted(order)
    assert peak > max(need)  # several ran together


def test_stats_snapshot(tiny_model, make_engine, make_request):
    engine = make_engine(budget_bytes=pool_budget(tiny_model, cache_bytes(tiny_model, "AAAAAA", 30) * 2),
                         step_history=4)
    requests = [make_request("AAAAAA", prompt_tokens=20, max_tokens=10) for _ in range(3)]
    for request in requests:
        engine.add_request(request)
    stats = engine.stats()
    assert stats.num_waiting == 3 and stats.waiting_prompt_tokens == 60 and stats.waiting_max_tokens == 30
    for _ in range(6):
        engine.step()
    stats = engine.stats()
    assert isinstance(stats, EngineStats) and stats.num_running == 2 and stats.num_waiting == 1
    assert stats.running_counts() == {"AAAAAA": 2}
    assert stats.running_by_placement()["AAAAAA"] == tuple(20 + len(s.output_ids) for s in engine.scheduler.running)
    assert stats.cache_used_bytes + stats.cache_free_bytes == stats.cache_budget_bytes
    assert stats.cache_used_bytes == 2 * cache_bytes(tiny_model, "AAAAAA", 30)
    assert len(stats.recent_steps) == 4 and stats.num_steps == 6
    assert all(r.seconds > 0 and r.num_rows >= 1 for r in stats.recent_steps)
    assert stats.generated_tokens_per_second() > 0
    assert_plain(stats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.cache_used_bytes = 0


def assert_plain(value):
    """No torch (or other live objects) inside the snapshot: numbers, strings, tuples, dataclasses."""
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            assert_plain(getattr(value, field.name))
    elif isinstance(value, tuple):
        for item in value:
            assert_plain(item)
    else:
        assert type(value) in (int, float, str, bool, type(None)), type(value)


def test_a_failed_model_step_ends_exactly_its_rows_with_an_error(make_engine, make_request, monkeypatch):
    engine = make_engine()
    first, second, late = (make_request("GGGGGG", max_tokens=6) for _ in range(3))
    engine.add_request(first)
    engine.add_request(second)
    engine.step()
    engine.add_request(late)  # pending in the inbox, not part of the failing step
    run = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda batch: (_ for _ in ()).throw(RuntimeError("device lost")))
    events = engine.step()
    assert {e.request_id: e.finish_reason for e in events} == {first.request_id: "error", second.request_id: "error"}
    assert all("device lost" in e.error and e.token_id is None for e in events)
    monkeypatch.setattr(engine.runner, "run", run)
    rest = engine.run_until_idle()
    assert {e.request_id for e in rest} == {late.request_id} and rest[-1].finish_reason in ("length", "stop")
    assert engine.stats().cache_used_bytes == 0


def test_an_injected_out_of_memory_fails_one_step_and_the_engine_serves_on(make_engine, make_request):
    engine = make_engine(max_running=2)  # invariants checked after every step
    running = [make_request("ASGKAS", max_tokens=8, ignore_eos=True) for _ in range(2)]
    queued = make_request("GGGGGG", max_tokens=3, ignore_eos=True)  # no row for it until one ends
    for request in (*running, queued):
        engine.add_request(request)
    engine.step()
    engine.faults.arm(1)
    events = engine.step()
    assert {e.request_id: e.finish_reason for e in events} == {r.request_id: "error" for r in running}
    assert all("OutOfMemoryError" in e.error for e in events)
    assert engine.faults.armed == 0
    rest = engine.run_until_idle()
    assert [e.finish_reason for e in rest if e.request_id == queued.request_id][-1] == "length"
    stats = engine.stats()
    assert stats.finished == FinishCounts(length=1, error=2) and stats.cache_used_bytes == 0


@pytest.mark.parametrize("seed", range(3))
def test_random_submit_cancel_finish_keeps_invariants(tiny_model, make_engine, make_request, seed):
    rng = random.Random(seed)
    budget = cache_bytes(tiny_model, "AAAAAA", 45)  # long all-attention requests are refused, others queue
    engine = make_engine(budget_bytes=pool_budget(tiny_model, budget), max_prefill_tokens=rng.choice([3, 8, 32]),
                         max_running=rng.choice([2, 4, 64]))
    submitted, events = [], []
    for _ in range(60):
        if rng.random() < 0.35:
            request = make_request(rng.choice(CODES), prompt_tokens=rng.randint(1, 40), max_tokens=rng.randint(1, 10),
                                   temperature=rng.choice([0.0, 0.9]), seed=rng.randrange(100),
                                   stop=tuple(rng.sample(["(", "e", "__", "\n"], rng.randint(0, 2))))
            try:
                engine.add_request(request)
                submitted.append(request)
            except ContextTooLong:
                assert cache_bytes(tiny_model, request.placement.code, request.context_tokens) > budget
        if submitted and rng.random() < 0.15:
            engine.abort(rng.choice(submitted).request_id)
        events += engine.step()  # check_invariants() runs inside every step
    events += engine.run_until_idle()
    streams = by_request(events)
    assert set(streams) == {r.request_id for r in submitted}
    for request in submitted:
        stream = streams[request.request_id]
        assert [e.finished for e in stream] == [False] * (len(stream) - 1) + [True]  # exactly one end, last
        generated = [e for e in stream if e.token_id is not None]
        assert len(generated) <= request.params.max_tokens
        if stream[-1].finish_reason == "length":
            assert len(generated) == request.params.max_tokens
    assert engine.stats().cache_used_bytes == 0 and not engine.has_work()


def test_min_tokens_holds_end_of_sequence_and_stop_strings_back(tiny_model, make_engine, tiny_tokenizer):
    prompt, placement = [1, 17, 99, 402, 5], tiny_model.config.placement("ASGKAS")
    run = lambda engine, request: [e for e in (engine.add_request(request) or engine.run_until_idle())]  # noqa: E731
    reference = [e.token_id for e in run(make_engine(), Request(prompt, placement, SamplingParams(max_tokens=12,
                                                                ignore_eos=True), "plain")) if e.token_id is not None]
    eos = reference[1]  # as end-of-sequence, this would end the output at its second token
    stopped = [e for e in run(make_engine(), Request(prompt, placement, SamplingParams(max_tokens=12), "eos", eos))]
    assert [e.token_id for e in stopped if e.token_id is not None] == reference[:2] and stopped[-1].finish_reason == "stop"
    held = run(make_engine(), Request(prompt, placement, SamplingParams(max_tokens=12, min_tokens=6), "held", eos))
    tokens = [e.token_id for e in held if e.token_id is not None]
    assert len(tokens) >= 6 and eos not in tokens[:6] and tokens[0] == reference[0]
    stop = tiny_tokenizer.decode(reference[:1])  # a stop string the first token's text would match at once
    early = run(make_engine(), Request(prompt, placement, SamplingParams(max_tokens=12, ignore_eos=True,
                                                                          stop=(stop,), min_tokens=12), "stop"))
    assert [e.token_id for e in early if e.token_id is not None] == reference and early[-1].finish_reason == "length"
    with pytest.raises(InvalidRequest, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
