"""The paper's linear cost models reproduce the budgets in the published preset names."""

import numpy as np
import pytest

from policies.errors import ConfigError, UnknownPreset
from policies.frontier import linear_count_cost, published_budget
from policies.placement import MIXERS, Mixer, Placement
from policies.published import (
    COST_MODELS,
    IDEALIZED_COST,
    PUBLISHED_PRESETS,
    REGRESSION_COST,
    published_preset,
)


@pytest.mark.parametrize(
    "name, coefficients, budget",
    [
        ("Reg/Lklhd-26", REGRESSION_COST, 26.3),
        ("Reg/Lklhd-18", REGRESSION_COST, 18.1),
        ("Reg/Lklhd-13", REGRESSION_COST, 13.1),
        ("Reg/Lklhd-10", REGRESSION_COST, 10.5),
        ("Idealized/All-18", IDEALIZED_COST, 18.4),
        ("Idealized/Lklhd-6", IDEALIZED_COST, 6.5),
    ],
)
def test_published_budgets(name, coefficients, budget):
    assert round(published_budget(published_preset(name).counts(), coefficients), 1) == budget


@pytest.mark.parametrize("preset", [p for p in PUBLISHED_PRESETS if p.cost_model], ids=lambda p: p.name)
def test_name_is_truncated_budget_of_its_cost_model(preset):
    budget = published_budget(preset.counts(), COST_MODELS[preset.cost_model])
    assert int(budget) == int(preset.name.rsplit("-", 1)[1])


def test_table_is_consistent():
    baseline = published_preset("all-attention")
    assert published_budget(baseline.counts(), REGRESSION_COST) == 48.0
    for preset in PUBLISHED_PRESETS:
        assert preset.num_layers == 48
        assert round(100 * preset.avg_score / baseline.avg_score) == preset.retention_pct
        assert preset.speedup_32k >= preset.speedup_16k >= 1.0


def test_counts_match_the_published_columns():
    preset = published_preset("Reg/Lklhd-26")
    assert preset.counts() == {Mixer.ATTENTION: 12, Mixer.SLIDING_WINDOW: 26, Mixer.KDA: 6, Mixer.GDN: 4}


def test_budget_of_a_placement_and_of_named_counts_agree():
    placement = Placement.parse("A" * 12 + "S" * 26 + "K" * 6 + "G" * 4)
    by_name = {"attention": 12, "sliding_window": 26, "kda": 6, "gdn": 4}
    assert published_budget(placement, REGRESSION_COST) == published_budget(by_name, REGRESSION_COST)


def test_linear_count_cost_rows_follow_mixers_order():
    cost = linear_count_cost(REGRESSION_COST, 3)
    assert cost.shape == (3, 4)
    assert np.array_equal(cost[2], [REGRESSION_COST[m] for m in MIXERS])
    with pytest.raises(ConfigError, match="kda"):
        linear_count_cost({"attention": 1.0, "sliding_window": 0.5, "gdn": 0.1}, 3)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(UnknownPreset, match="Reg/Lklhd-26"):
        published_preset("Reg/Lklhd-99")
