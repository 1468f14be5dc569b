"""Step time, TTFT and memory predictions from a speed table, and presets at an operating point."""

import numpy as np
import pytest

from policies.cost import OperatingCost, SpeedModel, interpolate, quantise, spread_presets
from policies.errors import TableMismatch
from policies.frontier import linear_count_cost
from policies.placement import MIXERS, Mixer, Placement
from policies.published import REGRESSION_COST
from policies.surrogate import ClusterExpansion
from policies.tables import SpeedFile, parse_table

from tests.unit.policies.test_tables import LAYERS, speed_dict

SPEED = SpeedModel.from_file(parse_table(speed_dict(), SpeedFile, "speed.json"))
DATA = speed_dict()


def grid(mixer: Mixer, batch: int, context: int) -> float:
    return DATA["decode_ms"][mixer.value][DATA["batches"].index(batch)][DATA["contexts"].index(context)]


def shared(tokens: int) -> float:
    return DATA["shared_ms"][DATA["tokens"].index(tokens)]


def head(tokens: int) -> float:
    return DATA["head_ms"][DATA["tokens"].index(tokens)]


def engine(rows: int) -> float:
    return DATA["engine_ms"][DATA["batches"].index(rows)]


@pytest.mark.parametrize("code", ["AAA", "SGK", "GGG", "KSA"])
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("context", [16, 64])
def test_homogeneous_batch_at_grid_points_is_the_measured_value(code, batch, context):
    placement = Placement.parse(code)
    for mixer in MIXERS:
        estimate = SPEED.mixer_decode(mixer, batch, context)
        assert estimate.ms == grid(mixer, batch, context) and not estimate.extrapolated
    expected = LAYERS * shared(batch) + head(batch) + engine(batch) + sum(grid(m, batch, context) for m in placement)
    step = SPEED.homogeneous_step(placement, batch, context)
    assert step.ms == pytest.approx(expected, rel=1e-12)
    assert not step.extrapolated and step.reasons == ()
    assert OperatingCost.from_speed(SPEED, batch, context)(placement) == pytest.approx(step.ms, rel=1e-12)


def test_a_mixed_batch_is_the_sum_of_its_groups():
    rows = [(Placement.parse("AGK"), 16)] * 2 + [(Placement.parse("ASG"), 16)] * 2
    # Layer 0: one attention group of 4 rows; layer 1: gdn x2 and sliding_window x2; layer 2: kda x2 and gdn x2.
    mixers = grid(Mixer.ATTENTION, 4, 16) + 2 * grid(Mixer.GDN, 2, 16) + grid(Mixer.SLIDING_WINDOW, 2, 16)
    mixers += grid(Mixer.KDA, 2, 16)
    assert SPEED.step(rows).ms == pytest.approx(LAYERS * shared(4) + head(4) + engine(4) + mixers, rel=1e-12)


def test_a_group_with_mixed_contexts_costs_its_mean_context():
    rows = [(Placement.parse("GGG"), 16), (Placement.parse("GGG"), 64)]
    expected = SPEED.homogeneous_step(Placement.parse("GGG"), 2, 40).ms
    assert SPEED.step(rows).ms == pytest.approx(expected, rel=1e-12)


def test_interpolation_between_grid_points_is_monotone_and_bracketed():
    for mixer in MIXERS:
        for batch in (1, 2, 4):
            values = [SPEED.mixer_decode(mixer, batch, c).ms for c in np.linspace(16, 64, 49)]
            assert np.all(np.diff(values) >= 0)
            assert values[0] == grid(mixer, batch, 16) and values[-1] == grid(mixer, batch, 64)
        for context in (16, 30, 64):
            values = [SPEED.mixer_decode(mixer, b, context).ms for b in np.linspace(1, 4, 31)]
            assert np.all(np.diff(values) >= 0)
    steps = [SPEED.homogeneous_step(Placement.parse("SGK"), b, 40).ms for b in (1, 2, 3, 4)]
    assert np.all(np.diff(steps) > 0)


def test_the_middle_of_a_cell_is_the_mean_of_its_corners():
    corners = [grid(Mixer.KDA, b, c) for b in (2, 4) for c in (16, 64)]
    assert SPEED.mixer_decode(Mixer.KDA, 3, 40).ms == pytest.approx(np.mean(corners), rel=1e-12)


@pytest.mark.parametrize("batch, context, fragments", [
    (8, 16, ["engine rows 8 is above the measured 4 (extrapolated)", "batch 8 is above the measured 4 (extrapolated)"]),
    (2, 1000, ["context 1000 is above the measured 64 (extrapolated)"]),
    (2, 4, ["context 4 is below the measured 16 (held at the edge)"]),
    (16, 128, ["tokens 16 is above", "head rows 16 is above", "engine rows 16 is above", "batch 16 is above",
               "context 128 is above"]),
])
def test_predictions_outside_the_grid_are_flagged(batch, context, fragments):
    estimate = SPEED.homogeneous_step(Placement.parse("AGK"), batch, context)
    assert estimate.extrapolated
    assert len(estimate.reasons) == len(fragments)
    for fragment, reason in zip(fragments, estimate.reasons):
        assert fragment in reason
    assert estimate.ms > SPEED.homogeneous_step(Placement.parse("AGK"), 1, 16).ms


def test_extrapolation_follows_the_last_segment_and_holds_below():
    assert interpolate([1, 2, 4], [1.0, 2.0, 3.0], 8, "batch") == (5.0, "batch 8 is above the measured 4 (extrapolated)")
    assert interpolate([16, 64], [1.0, 2.0], 4, "context")[0] == 1.0
    assert interpolate([16], [1.5], 64, "context")[0] == 1.5


def test_ttft_sums_prefill_chunks():
    placement = Placement.parse("AGK")
    per_token = lambda c: sum(DATA["prefill_ms_per_token"][m.value][DATA["prefill_contexts"].index(c)]  # noqa: E731
                              for m in placement)
    # 20 tokens in chunks of 8: 8 at context 0, 8 at 8 (between the grid's 0 and 16), 4 at 16.
    at_8 = (per_token(0) + per_token(16)) / 2
    shared_4 = (shared(4))  # 4 tokens is a grid point
    chunk = head(1) + engine(1)  # each chunk's step: one row's head and engine work
    expected = (LAYERS * shared(8) + chunk + 8 * per_token(0)) + (LAYERS * shared(8) + chunk + 8 * at_8)
    expected += LAYERS * shared_4 + chunk + 4 * per_token(16)
    estimate = SPEED.ttft(placement, 20)
    assert estimate.ms == pytest.approx(expected, rel=1e-12) and not estimate.extrapolated
    assert SPEED.ttft(placement, 200).extrapolated  # chunks start past the last prefill context


def test_max_sequences_agrees_with_the_memory_model():
    for code in ("AAA", "SSS", "GKG", "ASG"):
        placement = Placement.parse(code)
        for context in (16, 100, 4096):
            for budget in (10**5, 10**7, 3 * 10**9):
                assert SPEED.max_sequences(placement, context, budget) == SPEED.memory.max_sequences(
                    placement, context, budget)
                assert SPEED.sequence_bytes(placement, context) == SPEED.memory.sequence_bytes(placement, context)
    assert SPEED.max_sequences(Placement.parse("GGG"), 4096, 10**7) > SPEED.max_sequences(Placement.parse("AAA"), 4096, 10**7)


def test_placements_of_another_depth_and_untimed_mixers_are_refused():
    with pytest.raises(TableMismatch, match="has 4 layers but the speed table was measured for 3"):
        SPEED.homogeneous_step(Placement.parse("AAAA"), 1, 16)
    data = speed_dict()
    for key in ("decode_ms", "prefill_ms_per_token"):
        del data[key]["kda"]
    partial = SpeedModel.from_file(parse_table(data, SpeedFile, "speed.json"))
    with pytest.raises(TableMismatch, match="no times for kda"):
        partial.layer_costs(2, 16)


def test_quantise_makes_equal_counts_tie_exactly():
    cost, unit = quantise(linear_count_cost(REGRESSION_COST, 4))
    assert cost.dtype == np.int64 and cost.max() == 10_000 and unit == pytest.approx(1e-4)
    assert list(cost[0]) == [10_000, 4_800, 1_400, 2_100]  # MIXERS order: attention, sliding_window, gdn, kda


def surrogate(num_layers: int, seed: int = 0) -> ClusterExpansion:
    rng = np.random.default_rng(seed)
    unary = np.array([0.0, -0.02, -0.05, -0.04]) + rng.normal(0, 0.01, (num_layers, 4))
    pair = rng.normal(0, 0.003, (num_layers - 1, 4, 4))
    return ClusterExpansion(num_layers, 2, -2.0, unary, pair, np.zeros((num_layers - 2, 4, 4, 4)))


def test_presets_from_a_speed_table():
    model = surrogate(LAYERS)
    cost = OperatingCost.from_speed(SPEED, 4, 64)
    frontier, baseline, presets = spread_presets(model, cost, 4)
    assert baseline.placement.code == "AAA" and baseline.retention == 1.0 and baseline.speedup == 1.0
    assert baseline.name == "q100-x1.00"
    assert baseline.cost == pytest.approx(SPEED.homogeneous_step(Placement.parse("AAA"), 4, 64).ms)
    assert len(presets) == min(4, len(frontier)) and len({p.name for p in presets}) == len(presets)
    assert [p.cost for p in presets] == sorted(p.cost for p in presets)
    for p in presets:
        assert p.retention == pytest.approx(np.exp(p.predicted_quality - baseline.predicted_quality))
        assert p.speedup == pytest.approx(baseline.cost / p.cost)
        assert p.name == f"q{100 * p.retention:.0f}-x{p.speedup:.2f}"
    assert not cost.estimate.extrapolated
    assert OperatingCost.from_speed(SPEED, 64, 64).estimate.extrapolated


def test_presets_from_the_linear_cost_model_span_the_frontier():
    model = surrogate(8, seed=1)
    cost = OperatingCost(linear_count_cost(REGRESSION_COST, 8), 0.0, "fa-layers")
    frontier, baseline, presets = spread_presets(model, cost, 500)
    assert len(presets) == len(frontier)  # k is capped at the frontier's size
    assert [p.cost for p in frontier] == [cost(p.placement) for p in frontier]  # in the cost's own unit
    assert presets[0].cost == pytest.approx(min(p.cost for p in frontier))
    assert baseline.cost == pytest.approx(8.0)
