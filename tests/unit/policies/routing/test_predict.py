"""The compiled per-pair loops against their documented formulas, written out plainly, on random fleets."""

import math
import random
from dataclasses import replace

import numpy as np
import pytest

from policies.cost import SpeedModel
from policies.errors import TableMismatch
from policies.roofline import roofline_speed_dict
from policies.routing import RoutingRequest, SlaPolicy
from policies.routing.policy import SHED_NO_PRESET
from policies.routing.predict import Predictor
from policies.tables import SpeedFile
from tests.unit.policies.routing.conftest import GIB, MEMORY, PRESETS, busy_worker


def random_fleet(rng: random.Random) -> list:
    workers = []
    for i in range(rng.randrange(1, 6)):
        worker = busy_worker(f"w{i}", rng.randrange(0, 14), rng.choice([500, 4000, 30000]),
                             placement=rng.choice(PRESETS).placement, budget=rng.choice([8, 25, 40]) * GIB,
                             waiting=rng.choice([0, 0, 2]))
        running = tuple(replace(r, remaining_tokens=rng.randrange(1, 900)) for r in worker.running)
        workers.append(replace(worker, running=running, calibration=rng.choice([1.0, 0.8, 1.3]),
                               prefill_backlog_tokens=rng.choice([0, 5000]), in_flight=rng.choice([0, 0, 1])))
    return workers


def random_request(rng: random.Random) -> RoutingRequest:
    return RoutingRequest(rng.randrange(1, 60000), rng.randrange(1, 2000), ttft_ms=rng.choice([None, 300, 5000]),
                          tpot_ms=rng.choice([None, 15, 60]), deadline_ms=rng.choice([None, 20000, 90000]),
                          min_quality=rng.choice([None, None, 0.9]), priority=rng.choice([-1, 0]))


def reference_forecast(predictor, fleet, request):
    """queue wait, ttft, tpot, completion, fits, admit_now: the module docstring's formulas, pair by pair."""
    n, m = request.prompt_tokens, request.max_tokens
    chunks = math.ceil(n / predictor.chunk)
    need = predictor.sequence_bytes(n + m)
    per_token = np.array([np.interp(n / 2, predictor.prefill_contexts, row) if n / 2 <= predictor.prefill_contexts[-1]
                          else _extrapolate(predictor.prefill_contexts, row, n / 2)
                          for row in predictor.prefill_per_token])
    out = {k: np.zeros((len(PRESETS), len(fleet.views))) for k in ("queue_wait", "ttft", "tpot", "completion")}
    fits, admit = np.zeros(out["ttft"].shape, bool), np.zeros(out["ttft"].shape, bool)
    for w, view in enumerate(fleet.views):
        state, cal = view.state, view.state.calibration
        prompts = state.waiting_prompt_tokens + state.prefill_backlog_tokens
        queue = cal * (prompts * per_token.mean() + state.waiting_requests * predictor.chunk_fixed_ms
                       + math.ceil(prompts / predictor.chunk) * view.base_ms)
        for p, preset in enumerate(PRESETS):
            flat = predictor._flat(preset.placement)
            context = n + m / 2
            tpot = cal * (view.base_ms + view.marginal_fixed_ms + view.marginal[flat].sum() + context * view.slope[flat].sum())
            missing = need[p] - state.cache_free_bytes
            freed = [b for b in view.release_bytes if b >= missing]
            memory = 0.0 if missing <= 0 else cal * (
                view.release_ms[len(view.release_bytes) - len(freed)] if freed else (view.release_ms[-1] if len(view.release_ms) else 0.0))
            prefill = chunks * predictor.chunk_fixed_ms + n * per_token[p]
            ttft = queue + memory + cal * (chunks * view.base_ms + prefill)
            out["queue_wait"][p, w], out["ttft"][p, w], out["tpot"][p, w] = queue + memory, ttft, tpot
            out["completion"][p, w] = ttft + (m - 1) * tpot
            fits[p, w] = need[p] <= state.cache_budget_bytes
            admit[p, w] = missing <= 0 and state.waiting_requests + state.in_flight == 0
    return out, fits, admit


def _extrapolate(xs, ys, x):
    return ys[-2] + (x - xs[-2]) / (xs[-1] - xs[-2]) * (ys[-1] - ys[-2])


@pytest.mark.parametrize("seed", range(12))
def test_forecast_follows_the_formulas(predictor, seed):
    rng = random.Random(seed)
    policy = SlaPolicy(predictor)
    fleet = policy.fleet(random_fleet(rng))
    for _ in range(5):
        request = random_request(rng)
        forecast = predictor.predict(request, fleet)
        expected, fits, admit = reference_forecast(predictor, fleet, request)
        for name, values in expected.items():
            np.testing.assert_allclose(getattr(forecast, name), values, rtol=1e-9, err_msg=name)
        assert (forecast.fits == fits).all() and (forecast.admit_now == admit).all()


def test_memory_wait_is_when_enough_rows_have_finished(predictor):
    need = predictor.sequence_bytes(20000 + 100)[0]  # all-attention
    worker = busy_worker("w", 3, 8000)
    rows = tuple(replace(r, remaining_tokens=t, cache_bytes=int(need / 1.5)) for r, t in zip(worker.running, (30, 10, 20)))
    worker = replace(worker, running=rows, cache_budget_bytes=int(need * 0.1) + 3 * int(need / 1.5),
                     cache_used_bytes=3 * int(need / 1.5))  # 0.1 x need free: two rows must finish
    fleet = SlaPolicy(predictor).fleet([worker])
    forecast = predictor.predict(RoutingRequest(20000, 100), fleet)
    assert forecast.queue_wait[0, 0] == pytest.approx(20 * fleet.views[0].base_ms)  # the second to finish
    assert not forecast.admit_now[0, 0] and forecast.fits[0, 0]


def reference_decision(policy, request, forecast):
    """SlaPolicy's rule, pair by pair: (preset index, worker index, reason) or None (the request is refused)."""
    quality = [p.quality for p in PRESETS]
    error = policy.error
    pairs = [(p, w) for p in range(len(PRESETS)) for w in range(forecast.ttft.shape[1])
             if (request.min_quality is None or quality[p] >= request.min_quality) and forecast.fits[p, w]]
    if not pairs:
        return None

    def meets(p, w):
        ttft, tpot, done = forecast.ttft[p, w] * error["ttft"], forecast.tpot[p, w] * error["tpot"], forecast.completion[p, w]
        return ((request.ttft_ms is None or ttft <= policy.margin * request.ttft_ms)
                and (request.tpot_ms is None or tpot <= policy.margin * request.tpot_ms)
                and (request.deadline_ms is None or ttft + (done - forecast.ttft[p, w]) * error["tpot"]
                     <= policy.margin * request.deadline_ms))

    soonest = lambda pair: (forecast.completion[pair], pair)  # noqa: E731  ties: lowest preset, then worker
    now = [pair for pair in pairs if meets(*pair) and forecast.admit_now[pair]]
    if now:
        best = max(quality[p] for p, _ in now)
        p, w = min((pair for pair in now if quality[pair[0]] == best), key=soonest)
        return p, w, "best quality that meets the budget" if request.has_budget else "no budget: best quality"
    meeting = [pair for pair in pairs if meets(*pair)]
    if meeting:
        return (*min(meeting, key=soonest), "replicas are queueing: fastest preset that meets the budget")
    p, w = min(pairs, key=soonest)
    return p, w, SHED_NO_PRESET if request.sheddable else "no preset meets the budget: fastest"


@pytest.mark.parametrize("seed", range(40))
def test_decisions_follow_the_rule_pair_by_pair(predictor, seed):
    rng = random.Random(seed)
    policy = SlaPolicy(predictor)
    policy.error = {"ttft": rng.choice([1.0, 1.4]), "tpot": rng.choice([1.0, 0.7])}
    workers = random_fleet(rng)
    for _ in range(10):
        request = random_request(rng)
        expected = reference_decision(policy, request, predictor.predict(request, policy.fleet(workers)))
        if expected is None:
            with pytest.raises(Exception, match="fits no replica"):
                policy.decide(request, workers)
            continue
        decision = policy.decide(request, workers)
        p, w, reason = expected
        assert (decision.preset, decision.replica_id, decision.reason) == (PRESETS[p].name, workers[w].replica_id, reason)
        assert decision.shed == (reason == SHED_NO_PRESET)


def test_a_preset_using_a_mixer_the_speed_table_does_not_time_is_refused():
    table = roofline_speed_dict(MEMORY)
    for timed in ("decode_ms", "prefill_ms_per_token"):
        del table[timed]["gdn"]
    speed = SpeedModel.from_file(SpeedFile.model_validate(table))
    with pytest.raises(TableMismatch, match="'lklhd-26' uses gdn, which the speed table does not time"):
        Predictor(speed, PRESETS)
    alone = Predictor(speed, PRESETS[:1])  # all-attention needs no gdn timings
    forecast = alone.predict(RoutingRequest(1000, 10), SlaPolicy(alone).fleet([busy_worker("w", 2, 1000)]))
    assert np.isfinite(forecast.times).all()


def test_prompts_are_chunked_as_the_workers_chunk_them(speed):
    """The table times prefill per token; how many chunk steps a prompt takes is the workers' max_prefill_tokens."""
    from policies.routing import RoutingRequest, SlaPolicy

    request = RoutingRequest(20000, 10)
    ttft = {}
    for chunk in (None, 4096):
        predictor = Predictor(speed, PRESETS, prefill_chunk=chunk)
        assert predictor.chunk == (chunk or speed.prefill_chunk)
        ttft[chunk] = predictor.predict(request, SlaPolicy(predictor).fleet([])).ttft[0, 0]
    steps = {chunk: -(-20000 // (chunk or speed.prefill_chunk)) for chunk in ttft}
    assert steps[4096] < steps[None] and ttft[4096] < ttft[None]  # fewer chunk steps, each with its fixed cost
