"""The SLA policy on built states: budgets, long contexts, overload, quality floors, forced presets."""

import math
import random

import pytest

from policies.errors import InvalidRequest, UnknownPreset
from policies.placement import Mixer
from policies.routing import RoutingRequest, SlaPolicy, build_policy
from policies.routing.policy import SHED_NO_PRESET
from tests.unit.policies.routing.conftest import GIB, PRESETS, busy_worker

QUALITY = {p.name: p.quality for p in PRESETS}


def test_tight_budget_gets_a_faster_preset_than_a_loose_one(predictor):
    policy = SlaPolicy(predictor)
    workers = [busy_worker("a", 3, 30000), busy_worker("b", 2, 30000)]
    loose = policy.decide(RoutingRequest(30000, 200, ttft_ms=60000, tpot_ms=200), workers)
    tight = policy.decide(RoutingRequest(30000, 200, ttft_ms=loose.prediction.ttft_ms * 0.9, tpot_ms=200), workers)
    assert loose.preset == "all-attention" and not loose.sla_at_risk
    assert QUALITY[tight.preset] < QUALITY[loose.preset]
    assert tight.prediction.ttft_ms < loose.prediction.ttft_ms and not tight.sla_at_risk


def test_no_budget_gets_the_best_quality(predictor):
    decision = SlaPolicy(predictor).decide(RoutingRequest(500, 100), [busy_worker("a", 8, 4000)])
    assert decision.preset == "all-attention" and decision.reason == "no budget: best quality"


def test_long_context_moves_away_from_full_attention(predictor):
    policy = SlaPolicy(predictor)
    workers = [busy_worker("a", 2, 60000), busy_worker("b", 3, 60000)]
    short = policy.decide(RoutingRequest(1000, 200, ttft_ms=4000, tpot_ms=40), workers)
    long = policy.decide(RoutingRequest(60000, 200, ttft_ms=6000, tpot_ms=40), workers)
    assert short.preset == "all-attention"
    fa_layers = {p.name: p.placement.counts()[Mixer.ATTENTION] for p in PRESETS}
    assert fa_layers[long.preset] <= 3 and not long.sla_at_risk
    # The same long request with a budget full attention can meet, where its cache fits, keeps full attention.
    roomy = [busy_worker("c", 1, 60000)]
    assert policy.decide(RoutingRequest(60000, 200, ttft_ms=60000, tpot_ms=40), roomy).preset == "all-attention"


def test_overload_sheds_sheddable_requests_and_flags_the_others(predictor):
    policy = SlaPolicy(predictor)
    full = [busy_worker(f"w{i}", 16, 30000, waiting=20) for i in range(3)]
    budget = dict(ttft_ms=200, tpot_ms=10)
    shed = policy.decide(RoutingRequest(8000, 500, priority=-1, **budget), full)
    kept = policy.decide(RoutingRequest(8000, 500, priority=0, **budget), full)
    assert shed.shed and shed.reason == SHED_NO_PRESET
    assert not kept.shed and kept.sla_at_risk and kept.replica_id is not None
    fastest = min(PRESETS, key=lambda p: p.quality)
    assert kept.prediction.completion_ms <= policy.decide(
        RoutingRequest(8000, 500, preset=fastest.name), full).prediction.completion_ms + 1e-6


@pytest.mark.parametrize("seed", range(30))
def test_min_quality_is_never_violated(predictor, seed):
    rng = random.Random(seed)
    policy = SlaPolicy(predictor)
    workers = [busy_worker(f"w{i}", rng.randrange(0, 20), rng.choice([2000, 16000, 60000]),
                           placement=rng.choice(PRESETS).placement, waiting=rng.randrange(0, 4)) for i in range(4)]
    floor = rng.choice([0.77, 0.8, 0.9, 0.95, 1.0])
    request = RoutingRequest(rng.randrange(10, 30000), rng.randrange(1, 1000), ttft_ms=rng.choice([None, 100, 2000]),
                             tpot_ms=rng.choice([None, 5, 30, 100]), min_quality=floor,
                             priority=rng.choice([-1, 0]))
    decision = policy.decide(request, workers)
    assert QUALITY[decision.preset] >= floor


def test_min_quality_above_every_preset_is_refused(predictor):
    with pytest.raises(InvalidRequest, match="no preset reaches min_quality"):
        SlaPolicy(predictor).decide(RoutingRequest(10, 10, min_quality=1.01), [busy_worker("a", 0, 0)])


def test_forced_preset_and_placement(predictor):
    policy = SlaPolicy(predictor)
    workers = [busy_worker("a", 2, 1000)]
    forced = policy.decide(RoutingRequest(100, 10, tpot_ms=0.001, preset="lklhd-10"), workers)
    assert forced.preset == "lklhd-10" and forced.sla_at_risk and not forced.shed
    by_placement = policy.decide(RoutingRequest(100, 10, placement=PRESETS[2].placement), workers)
    assert by_placement.preset == "lklhd-18"
    with pytest.raises(UnknownPreset):
        policy.decide(RoutingRequest(100, 10, preset="turbo"), workers)


def test_the_less_loaded_replica_wins_a_tie(predictor):
    decision = SlaPolicy(predictor).decide(RoutingRequest(500, 100),
                                           [busy_worker("busy", 30, 8000), busy_worker("idle", 1, 8000)])
    assert decision.replica_id == "idle"


def test_a_request_waits_for_memory_on_a_full_replica(predictor):
    full = busy_worker("full", 12, 60000, budget=12 * GIB)
    empty = busy_worker("empty", 0, 0, budget=12 * GIB)
    request = RoutingRequest(60000, 100)
    forecast = predictor.predict(request, SlaPolicy(predictor).fleet([full, empty]))
    assert (forecast.queue_wait[:, 0] >= forecast.queue_wait[:, 1]).all()
    assert forecast.queue_wait[0, 0] > 0  # all-attention at 60k does not fit the full replica now


def test_baselines(predictor):
    workers = [busy_worker("a", 5, 1000), busy_worker("b", 1, 1000), busy_worker("c", 3, 1000)]
    rr = build_policy("round-robin", predictor)
    assert [rr.decide(RoutingRequest(10, 10), workers).replica_id for _ in range(4)] == ["a", "b", "c", "a"]
    assert build_policy("least-loaded", predictor).decide(RoutingRequest(10, 10), workers).replica_id == "b"
    fixed = build_policy("fixed:lklhd-13", predictor).decide(RoutingRequest(10, 10, tpot_ms=1e-6), workers)
    assert fixed.preset == "lklhd-13"


def test_measured_latencies_calibrate_later_decisions(predictor):
    policy = SlaPolicy(predictor)
    workers = [busy_worker("a", 3, 30000)]
    request = RoutingRequest(30000, 200, ttft_ms=60000, tpot_ms=200)
    first = policy.decide(request, workers)
    budget = RoutingRequest(30000, 200, ttft_ms=first.prediction.ttft_ms * 1.5, tpot_ms=200)
    assert policy.decide(budget, workers).preset == "all-attention"
    for _ in range(100):  # served requests keep taking twice as long to their first token as predicted
        policy.observe(first.prediction, 2 * first.prediction.ttft_ms, first.prediction.tpot_ms)
    assert policy.error["ttft"] == pytest.approx(2.0, rel=0.01)
    assert policy.decide(budget, workers).preset != "all-attention"


def test_prefill_backlog_delays_the_first_token(predictor):
    from dataclasses import replace

    idle = busy_worker("idle", 2, 4000)
    backlogged = replace(idle, replica_id="backlogged", prefill_backlog_tokens=60000)
    forecast = predictor.predict(RoutingRequest(1000, 50), SlaPolicy(predictor).fleet([idle, backlogged]))
    assert (forecast.ttft[:, 1] > forecast.ttft[:, 0] + 100).all()


# ---- the prefills that arrive while a request decodes (kernels.add_future_load) ----

def test_poisson_quantile_is_the_smallest_k_whose_cdf_reaches_q():
    import math

    from policies.routing.kernels import poisson_quantile

    for mean in (0.0, 0.05, 0.4, 1.0, 3.7, 12.0):
        for q in (0.5, 0.9, 0.95, 0.99):
            cdf = lambda k: sum(math.exp(-mean) * mean**i / math.factorial(i) for i in range(k + 1))  # noqa: E731
            k = poisson_quantile(mean, q)
            assert cdf(k) >= q and (k == 0 or cdf(k - 1) < q), (mean, q, k)


def test_future_load_adds_the_quantile_of_arriving_prefills_to_each_pair(predictor):
    import numpy as np

    from policies.routing.kernels import add_future_load, poisson_quantile

    policy = SlaPolicy(predictor, future_load_quantile=0)
    request = RoutingRequest(4000, 201, tpot_ms=100)
    workers = [busy_worker("a", 2, 8000), busy_worker("b", 1, 2000)]
    forecast = predictor.predict(request, policy.fleet(workers))
    times = forecast.times.copy()
    rate, cost = np.array([0.002, 0.0005]), np.array([900.0, 300.0])  # per ms; ms of prefill per arrival
    add_future_load(times, rate, cost, 201.0, 0.95)
    for p in range(len(PRESETS)):
        for w in range(2):
            tpot = forecast.tpot[p, w]
            n = poisson_quantile(rate[w] * 200 * tpot, 0.95)
            n = poisson_quantile(rate[w] * 200 * (tpot + n * cost[w] / 200), 0.95) if n else 0
            assert times[2, p, w] == pytest.approx(tpot + n * cost[w] / 200, rel=1e-12)
            assert times[3, p, w] == pytest.approx(times[1, p, w] + 200 * times[2, p, w], rel=1e-12)
            assert times[1, p, w] == forecast.ttft[p, w]  # the prefills queue behind this prompt: TTFT is as it was
    quiet = forecast.times.copy()
    add_future_load(quiet, np.zeros(2), cost, 201.0, 0.95)
    assert np.array_equal(quiet, forecast.times)


def test_a_replica_that_keeps_receiving_prompts_gets_a_faster_preset():
    """On a small CPU-like table (attention twice GDN's cost): a budget the best preset meets exactly while
    nothing else arrives keeps it on a quiet replica; where prompts keep arriving, their prefills will stretch
    its decode past the budget, and the policy takes the faster preset, whose slack absorbs them."""
    from dataclasses import replace

    from policies.cost import SpeedModel
    from policies.placement import Placement
    from policies.routing import PresetInfo
    from policies.routing.predict import Predictor
    from policies.routing.types import WorkerState
    from policies.tables import SpeedFile, parse_table
    from tests.unit.policies.test_tables import speed_dict

    speed = SpeedModel.from_file(parse_table(speed_dict(), SpeedFile, "speed.json"))
    small = Predictor(speed, [PresetInfo("careful", Placement.parse("AAA"), 1.0),
                              PresetInfo("quick", Placement.parse("GGG"), 0.9)])
    quiet = WorkerState("a", cache_budget_bytes=2**40)
    alone = small.predict(RoutingRequest(16, 101), SlaPolicy(small).fleet([quiet]))
    assert alone.tpot[1, 0] < alone.tpot[0, 0]
    request = RoutingRequest(16, 101, tpot_ms=alone.tpot[0, 0] / 0.9)  # met by "careful" with nothing to spare
    assert SlaPolicy(small).decide(request, [quiet]).preset == "careful"
    busy = replace(quiet, arrivals_per_s=5.0, arrival_prompt_tokens=8)
    degraded = SlaPolicy(small).decide(request, [busy])
    assert degraded.preset == "quick" and not degraded.sla_at_risk
    assert degraded.prediction.tpot_ms > alone.tpot[1, 0]  # it counts the arriving prefills
    # the same arrivals, with the policy told to look at today's load only
    assert SlaPolicy(small, future_load_quantile=0).decide(request, [busy]).preset == "careful"
    with pytest.raises(Exception, match="future_load_quantile must be in"):
        SlaPolicy(small, future_load_quantile=1.0)


def test_a_step_allowance_is_the_mean_step_that_lands_exactly_on_the_budget():
    from policies.routing.types import step_allowance_ms

    assert step_allowance_ms(10.0, 101, 0, 0.0) == 10.0  # before its first token: the budget itself
    allowance = step_allowance_ms(10.0, 101, 50, 600.0)  # 49 steps took 600 ms: 51 left
    assert allowance == pytest.approx(400 / 51)
    assert (600 + 51 * allowance) / 100 == pytest.approx(10.0)  # every step at the allowance: TPOT on budget
    assert step_allowance_ms(10.0, 101, 50, 1200.0) < 0  # already lost
    assert step_allowance_ms(None, 101, 50, 600.0) == math.inf
    assert step_allowance_ms(10.0, 101, 101, 600.0) == math.inf  # nothing left to generate


def _with_allowance(worker, allowance_ms):
    from dataclasses import replace

    return replace(worker, running=tuple(replace(r, step_allowance_ms=allowance_ms) for r in worker.running))


FAST = PRESETS[-1].placement  # running rows of the fastest preset: a full-attention row is the costliest to add


def test_a_new_row_never_slows_the_running_rows_past_their_budgets(predictor):
    """A loose budget alone would take the best preset; the rows already running there have a TPOT budget that
    the best preset's step would break, so the request gets the best preset whose step they can take, or
    goes to a replica whose rows have room."""
    policy = SlaPolicy(predictor)
    request = RoutingRequest(30000, 200, ttft_ms=60000, tpot_ms=500)
    worker = busy_worker("a", 3, 30000, FAST)
    fleet = policy.fleet([worker])
    tpot = predictor.predict(request, fleet).tpot[:, 0]
    assert policy.decide(request, [worker]).preset == "all-attention"
    best = tpot[0]
    tight = _with_allowance(worker, 0.98 * best / policy.margin)  # the running rows can take a little less
    assert fleet.step_now[0] < 0.98 * best  # and they are on budget today: worth protecting
    decision = policy.decide(request, [tight])
    assert decision.preset != "all-attention" and not decision.sla_at_risk
    assert decision.reason == "best quality that meets the budget"
    assert decision.prediction.tpot_ms <= 0.98 * best
    assert QUALITY[decision.preset] == max(QUALITY[p.name] for i, p in enumerate(PRESETS) if tpot[i] <= 0.98 * best)
    # the same rows, with a replica beside them whose rows have no budget: the best preset goes there
    roomy = policy.decide(request, [tight, busy_worker("b", 3, 30000, FAST)])
    assert (roomy.preset, roomy.replica_id) == ("all-attention", "b")
    # off: only the request's own budget counts
    assert SlaPolicy(predictor, protect_running=False).decide(request, [tight]).preset == "all-attention"


def test_rows_already_past_their_budget_do_not_hold_new_requests_back(predictor):
    policy = SlaPolicy(predictor)
    request = RoutingRequest(30000, 200, ttft_ms=60000, tpot_ms=500)
    worker = busy_worker("a", 3, 30000, FAST)
    lost = _with_allowance(worker, 0.5 * policy.fleet([worker]).step_now[0])  # today's step already misses it
    assert policy.decide(request, [lost]).preset == "all-attention"


def test_when_every_preset_would_break_a_running_budget_the_fastest_does_least_harm(predictor):
    policy = SlaPolicy(predictor)
    request = RoutingRequest(30000, 200, ttft_ms=60000, tpot_ms=500)
    worker = busy_worker("a", 3, 30000, FAST)
    fleet = policy.fleet([worker])
    tpot = predictor.predict(request, fleet).tpot[:, 0]
    boxed = _with_allowance(worker, (fleet.step_now[0] + 0.5 * (tpot.min() - fleet.step_now[0])) / policy.margin)
    decision = policy.decide(request, [boxed])
    assert decision.reason.endswith("the running requests' budgets leave no room for a better one")
    assert decision.prediction.completion_ms == pytest.approx(min(
        policy.decide(RoutingRequest(30000, 200, preset=p.name), [worker]).prediction.completion_ms
        for p in PRESETS))
    assert not decision.sla_at_risk  # its own budget is met
    forced = policy.decide(RoutingRequest(30000, 200, tpot_ms=500, ttft_ms=60000, preset="all-attention"), [boxed])
    assert forced.preset == "all-attention" and forced.reason == "preset forced by the request"
