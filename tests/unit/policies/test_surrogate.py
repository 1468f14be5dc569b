"""The cluster-expansion surrogate: recovery of planted terms, CV, serialisation, rank statistics."""

import json

import numpy as np
import pytest

from policies.errors import ConfigError, InvalidPlacement, TableMismatch
from policies.placement import MIXERS, Placement
from policies.surrogate import ClusterExpansion, average_ranks, evaluate, spearman

L = 8


def planted_model(seed=0, num_layers=L):
    rng = np.random.default_rng(seed)
    return ClusterExpansion(
        num_layers,
        3,
        70.0,
        rng.normal(0, 1.0, (num_layers, 4)),
        rng.normal(0, 0.5, (num_layers - 1, 4, 4)),
        rng.normal(0, 0.3, (num_layers - 2, 4, 4, 4)),
    )


def measurements(model, count, noise, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, (count, model.num_layers))
    return codes, model.predict_many(codes) + rng.normal(0, noise, count)


@pytest.fixture(scope="module")
def fitted():
    planted = planted_model()
    codes, scores = measurements(planted, 2000, 0.1, seed=1)
    return planted, ClusterExpansion.fit(codes, scores, seed=0)


def test_fit_ranks_held_out_placements(fitted):
    planted, model = fitted
    codes, scores = measurements(planted, 500, 0.1, seed=2)
    held_out = evaluate(model, codes, scores)
    assert held_out.num_samples == 500
    assert held_out.spearman > 0.95 and held_out.r2 > 0.9


def test_fit_recovers_planted_interactions(fitted):
    planted, model = fitted
    truth = planted.canonical()  # the fit reports this gauge, so terms compare one to one
    for order in ("unary", "pair", "triple"):
        assert np.corrcoef(getattr(truth, order).ravel(), getattr(model, order).ravel())[0, 1] > 0.95
    assert model.intercept == pytest.approx(truth.intercept, abs=0.05)


def test_cross_validation_shrinks_more_for_noisy_data():
    planted = planted_model(seed=3, num_layers=5)
    codes, clean = measurements(planted, 400, 0.01, seed=4)
    noisy = clean + np.random.default_rng(5).normal(0, 20.0, len(clean))
    clean_alpha = ClusterExpansion.fit(codes, clean).ridge_alpha
    noisy_alpha = ClusterExpansion.fit(codes, noisy).ridge_alpha
    assert noisy_alpha > 100 * clean_alpha


def test_fit_is_deterministic_given_a_seed():
    planted = planted_model(seed=6, num_layers=4)
    codes, scores = measurements(planted, 200, 0.5, seed=7)
    a = ClusterExpansion.fit(codes, scores, seed=11).to_dict()
    assert ClusterExpansion.fit(codes, scores, seed=11).to_dict() == a


def test_lower_range_fits_leave_higher_orders_zero():
    planted = planted_model(seed=8, num_layers=4)
    codes, scores = measurements(planted, 200, 0.1, seed=9)
    model = ClusterExpansion.fit(codes, scores, max_range=1)
    assert model.max_range == 1 and not model.pair.any() and not model.triple.any()
    assert "pair" not in model.to_dict() and "triple" not in model.to_dict()


def test_canonical_keeps_predictions_and_is_idempotent():
    planted = planted_model(seed=10)
    codes, _ = measurements(planted, 300, 0.0, seed=11)
    canonical = planted.canonical()
    assert np.allclose(canonical.predict_many(codes), planted.predict_many(codes), atol=1e-12)
    assert np.allclose(canonical.canonical().triple, canonical.triple, atol=1e-12)
    assert np.allclose(canonical.pair.sum(axis=1), 0) and np.allclose(canonical.pair.sum(axis=2), 0)
    assert np.allclose(canonical.unary.sum(axis=1), 0)


def test_predict_one_equals_predict_many():
    model = planted_model(seed=12)
    placements = [Placement.parse("AASGKGKS"), "SSSSAAAA", Placement.uniform("gdn", L)]
    many = model.predict_many(placements)
    assert [model.predict(p) for p in placements] == list(many)
    c = [MIXERS.index(m) for m in Placement.parse("SSSSAAAA")]
    by_hand = model.intercept + sum(model.unary[i, c[i]] for i in range(L))
    by_hand += sum(model.pair[i, c[i], c[i + 1]] for i in range(L - 1))
    by_hand += sum(model.triple[i, c[i], c[i + 1], c[i + 2]] for i in range(L - 2))
    assert many[1] == pytest.approx(by_hand, abs=1e-12)


def test_predict_refuses_wrong_lengths():
    with pytest.raises(InvalidPlacement, match="8"):
        planted_model().predict("AAAA")


def test_fit_refuses_bad_arguments():
    codes = np.zeros((10, 3), dtype=int)
    with pytest.raises(ConfigError):
        ClusterExpansion.fit(codes, np.zeros(9))
    with pytest.raises(ConfigError):
        ClusterExpansion.fit(codes, np.zeros(10), alphas=[0.0, 1.0])
    with pytest.raises(ConfigError):
        ClusterExpansion.fit(codes[:3], np.zeros(3), folds=5)


def test_round_trip_through_json(fitted):
    _, model = fitted
    loaded = ClusterExpansion.from_dict(json.loads(json.dumps(model.to_dict())))
    codes, _ = measurements(model, 100, 0.0, seed=13)
    assert np.array_equal(loaded.predict_many(codes), model.predict_many(codes))
    assert loaded.to_dict() == model.to_dict()


def test_from_dict_reads_mixers_in_any_order():
    model = planted_model(seed=14, num_layers=4)
    data = model.to_dict()
    permutation = [2, 0, 3, 1]
    data["mixers"] = [data["mixers"][i] for i in permutation]
    for key, order in (("unary", 1), ("pair", 2), ("triple", 3)):
        array = np.array(data[key])
        data[key] = array[(slice(None),) + np.ix_(*[permutation] * order)].tolist()
    loaded = ClusterExpansion.from_dict(data)
    assert np.array_equal(loaded.triple, model.triple) and np.array_equal(loaded.unary, model.unary)


def corrupt(change):
    data = planted_model(seed=15, num_layers=4).to_dict()
    change(data)
    return data


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda d: d.pop("pair"), "missing key.*pair"),
        (lambda d: d.update(num_layers=5), "'unary' has shape \\[4, 4\\], expected \\[5, 4\\]"),
        (lambda d: d.update(unary=d["unary"][:3]), "'unary' has shape"),
        (lambda d: d.update(mixers=["attention", "swa", "gdn", "kda"]), "unknown mixer.*swa"),
        (lambda d: d.update(mixers=["attention", "attention", "gdn", "kda"]), "each of"),
        (lambda d: d.update(format="something-else"), "format"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(max_range=1), "unexpected key.*pair"),
        (lambda d: d.update(extra=1), "unexpected key.*extra"),
        (lambda d: d.update(intercept="high"), "intercept"),
        (lambda d: d["triple"][0][0][0].__setitem__(0, "x"), "'triple' is not"),
        (lambda d: d["pair"][0][0].__setitem__(0, float("nan")), "non-finite"),
    ],
)
def test_from_dict_names_what_is_wrong(change, named):
    with pytest.raises(TableMismatch, match=named):
        ClusterExpansion.from_dict(corrupt(change))


def test_from_dict_refuses_non_objects():
    with pytest.raises(TableMismatch, match="JSON object"):
        ClusterExpansion.from_dict([1, 2])


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 5, 20]).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # Ties: ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4] -> Pearson of the ranks.
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
