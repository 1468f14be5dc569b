"""The scheduler alone (no model, no torch): FIFO admission against a byte budget, chunked prefill, invariants."""

import random

import pytest

from policies.placement import Placement
from workers.engine.detokenizer import Detokenizer
from workers.engine.request import Request
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import Sequence, Status
from workers.sampling import SamplingParams

PLACEMENT = Placement.parse("AG")


def make_sequence(arrival: int, prompt: int, max_tokens: int = 4, cache_bytes: int = 100) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens)
    request = Request(list(range(4, 4 + prompt)), PLACEMENT, params, request_id=f"r{arrival}")
    return Sequence(request, arrival, cache_bytes, Detokenizer(None))


def run_step(scheduler: Scheduler, token: int = 7) -> tuple[list[Sequence], list[Sequence]]:
    """Admit, schedule, pretend the model ran, finish what reached max_tokens; return (admitted, finished)."""
    admitted = scheduler.admit()
    batch = scheduler.schedule()
    scheduler.postprocess(batch, [[token] if wanted else [] for wanted in batch.samples])
    done = [s for s in batch.sequences if len(s.output_ids) >= s.request.params.max_tokens]
    for s in done:
        scheduler.finish(s)
    scheduler.check_invariants()
    return admitted, done


def test_admission_is_fifo_and_never_overtakes():
    scheduler = Scheduler(budget_bytes=250, max_prefill_tokens=100, max_running=8)
    big, small = make_sequence(1, 5, cache_bytes=200), make_sequence(2, 5, cache_bytes=10)
    first = make_sequence(0, 5, cache_bytes=100)
    for s in (first, big, small):
        scheduler.add(s)
    assert scheduler.admit() == [first]  # big does not fit next to first, and small may not pass it
    assert [s.request_id for s in scheduler.waiting] == ["r1", "r2"]
    assert scheduler.used_bytes == 100
    scheduler.check_invariants()
    scheduler.finish(first)
    assert scheduler.admit() == [big, small]
    assert scheduler.used_bytes == 210 and scheduler.free_bytes == 40


def test_max_running_bounds_admission():
    scheduler = Scheduler(budget_bytes=10_000, max_prefill_tokens=100, max_running=2)
    for i in range(3):
        scheduler.add(make_sequence(i, 3))
    assert len(scheduler.admit()) == 2 and len(scheduler.waiting) == 1


def test_prompts_are_prefilled_in_chunks_beside_decodes():
    scheduler = Scheduler(budget_bytes=10_000, max_prefill_tokens=8, max_running=8)
    short, long_ = make_sequence(0, 3, max_tokens=10), make_sequence(1, 20, max_tokens=10)
    scheduler.add(short)
    scheduler.add(long_)
    scheduler.admit()
    batch = scheduler.schedule()  # short's whole prompt (3) and 5 of long's
    assert batch.token_ids == [[4, 5, 6], list(range(4, 9))] and batch.samples == [True, False]
    scheduler.postprocess(batch, [[11], []])
    for expected_chunk in (range(9, 17), range(17, 24)):
        batch = scheduler.schedule()
        assert batch.token_ids[0] == [short.output_ids[-1]]  # the decode row is never stalled
        assert batch.token_ids[1] == list(expected_chunk)
        assert batch.num_decode_rows == 1 and batch.num_prefill_tokens == len(expected_chunk)
        scheduler.postprocess(batch, [[12], [13] if batch.samples[1] else []])
        scheduler.check_invariants()
    assert long_.num_computed == 20 and long_.output_ids == [13]
    batch = scheduler.schedule()
    assert batch.token_ids == [[12], [13]] and batch.num_prefill_tokens == 0


def test_finish_frees_bytes_from_either_queue():
    scheduler = Scheduler(budget_bytes=150, max_prefill_tokens=100, max_running=8)
    running, waiting = make_sequence(0, 3), make_sequence(1, 3)
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.admit()
    scheduler.finish(waiting)
    scheduler.finish(running)
    scheduler.finish(running)  # idempotent
    assert scheduler.used_bytes == 0 and not scheduler.has_work()
    assert running.status is waiting.status is Status.FINISHED


def test_invariants_catch_broken_accounting():
    scheduler = Scheduler(budget_bytes=1000, max_prefill_tokens=100, max_running=8)
    scheduler.add(make_sequence(0, 3))
    scheduler.admit()
    scheduler.used_bytes += 1  # a second owner touching the counter
    with pytest.raises(AssertionError, match="bytes accounted"):
        scheduler.check_invariants()


@pytest.mark.parametrize("seed", range(5))
def test_random_admit_finish_abort_keeps_invariants(seed):
    rng = random.Random(seed)
    budget = 1000
    scheduler = Scheduler(budget_bytes=budget, max_prefill_tokens=rng.choice([1, 4, 16]),
                          max_running=rng.choice([2, 5, 50]))
    arrivals, admitted_order, finished = 0, [], set()
    for _ in range(400):
        action = rng.random()
        if action < 0.3:
            scheduler.add(make_sequence(arrivals, rng.randint(1, 30), rng.randint(1, 8), rng.randint(1, budget)))
            arrivals += 1
        elif action < 0.4 and (scheduler.waiting or scheduler.running):
            victim = rng.choice(list(scheduler.waiting) + list(scheduler.running))
            scheduler.finish(victim)
            finished.add(victim.arrival)
        admitted, done = run_step(scheduler)
        admitted_order += [s.arrival for s in admitted]
        finished |= {s.arrival for s in done}
        assert scheduler.used_bytes <= budget
    while scheduler.has_work():
        admitted, done = run_step(scheduler)
        admitted_order += [s.arrival for s in admitted]
        finished |= {s.arrival for s in done}
    assert len(finished) == arrivals  # everything ends
    assert admitted_order == sorted(admitted_order)  # admitted in submission order
