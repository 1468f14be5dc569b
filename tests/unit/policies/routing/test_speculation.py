"""The router speculates where its speed model says it wins, and only there (15B roofline world)."""

import pytest

from policies.routing.policy import SlaPolicy
from policies.routing.types import RoutingRequest
from policies.speculation import AcceptanceRates, expected_tokens

from .conftest import GIB, PRESETS, busy_worker

QUALITY, CHEAPEST = PRESETS[0], PRESETS[-1]


@pytest.fixture()
def policy(predictor):
    rates = AcceptanceRates({(QUALITY.placement.code, p.placement.code): (0.75, 0.8) for p in PRESETS[1:]})
    return SlaPolicy(predictor, acceptance=rates)


def test_expected_tokens_per_verify_step():
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5 and expected_tokens(0.0, 4) == 1


def test_speculation_is_off_alone_and_at_short_context_and_on_for_a_long_context_batch(policy):
    """Alone, a step reads all the weights whatever the mixers, so a draft step costs about a target step;
    beside 16 rows of the same preset at 32k, their attention reads dominate and the draft's are small."""
    quality = RoutingRequest(32_000, 200, preset=QUALITY.name)
    alone = policy.decide(quality, [busy_worker("idle", 0, 1, budget=200 * GIB)])
    short = policy.decide(RoutingRequest(2_000, 200, preset=QUALITY.name),
                          [busy_worker("short", 16, 2_000, budget=200 * GIB)])
    long = policy.decide(quality, [busy_worker("long", 16, 32_000, budget=200 * GIB)])
    assert alone.draft is None and short.draft is None
    assert long.draft is not None and long.draft_preset in {p.name for p in PRESETS[1:]} and long.draft_tokens >= 1
    assert long.prediction.tpot_ms < 0.95 * long.plain_tpot_ms
    assert long.preset == QUALITY.name  # speculation keeps the target's quality


def test_a_budget_only_the_speculated_quality_preset_meets_gets_the_quality_preset(policy, predictor):
    states = [busy_worker("long", 16, 32_000, budget=200 * GIB)]
    request = RoutingRequest(32_000, 200, tpot_ms=36.0)
    chosen = policy.decide(request, states)
    assert chosen.preset == QUALITY.name and chosen.draft is not None and not chosen.sla_at_risk
    plain = SlaPolicy(predictor).decide(request, states)  # no acceptance table: no speculation
    assert plain.draft is None and plain.sla_at_risk


def test_off_and_given_speculation(policy):
    states = [busy_worker("long", 16, 32_000, budget=200 * GIB)]
    off = policy.decide(RoutingRequest(32_000, 200, preset=QUALITY.name, speculation="off"), states)
    assert off.draft is None and off.plain_tpot_ms is None
    given = policy.decide(RoutingRequest(500, 20, preset=QUALITY.name, speculation="given",
                                         draft=CHEAPEST.placement, draft_tokens=3), states)
    assert (given.draft, given.draft_tokens, given.draft_preset) == (CHEAPEST.placement, 3, CHEAPEST.name)


def test_the_service_s_own_acceptance_replaces_the_table_s_once_there_is_enough_of_it(policy):
    """The table rates its own prompts; traffic whose text the draft predicts worse must stop speculating."""
    from policies.speculation import LIVE_MIN_PROPOSALS

    quality = RoutingRequest(32_000, 200, preset=QUALITY.name)
    long = [busy_worker("long", 16, 32_000, budget=200 * GIB)]
    assert policy.decide(quality, long).draft is not None
    rates = policy.acceptance
    for pair in [(QUALITY.placement.code, p.placement.code) for p in PRESETS[1:]]:
        rates.observe(*pair, accepted=LIVE_MIN_PROPOSALS // 10, examined=LIVE_MIN_PROPOSALS - 1)  # too few yet
    assert rates.rate(QUALITY.placement.code, CHEAPEST.placement.code, sampled=False) == 0.75
    assert policy.decide(quality, long).draft is not None
    for pair in [(QUALITY.placement.code, p.placement.code) for p in PRESETS[1:]]:
        rates.observe(*pair, accepted=LIVE_MIN_PROPOSALS // 10, examined=LIVE_MIN_PROPOSALS)
    assert rates.rate(QUALITY.placement.code, CHEAPEST.placement.code, sampled=True) == pytest.approx(0.1)
    assert policy.decide(quality, long).draft is None  # a draft that is mostly refused costs more than it saves
    rates.observe(CHEAPEST.placement.code, QUALITY.placement.code, accepted=900, examined=1000)
    assert rates.rate(CHEAPEST.placement.code, QUALITY.placement.code, sampled=False) is None  # unrated stays so
