"""bench/live_trace.py: a request counts only if it meets every budget; goodput, nearest-rank percentiles and
errors from per-request records; the mix's rates and seeds; served quality from the service's counters."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.live_trace import (MIX, Record, budgets, class_rates, class_requests, class_seed,  # noqa: E402
                              mean_quality, meets, ok_by_preset, percentile, prediction_ratios,
                              served_between, summarize)


def record(ttft=100.0, tpot=10.0, ok=True, ttft_budget=200.0, tpot_budget=20.0, error=None):
    return Record("chat", ok, ttft, tpot, ttft_budget, tpot_budget, error)


@pytest.mark.parametrize("r, expected", [
    (record(), True),
    (record(ttft=200.0, tpot=20.0), True),  # at the budget is within it
    (record(ttft=201.0), False),
    (record(tpot=20.5), False),
    (record(ok=False, error="http-429"), False),  # shed: missed
    (record(tpot=None), False),  # a TPOT budget with no TPOT measured cannot be met
    (record(tpot=None, tpot_budget=None), True),
    (record(ttft=None), False),
    (record(ttft=5000.0, ttft_budget=None), True),
])
def test_a_request_meets_only_all_its_budgets(r, expected):
    assert meets(r) is expected


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_summary_counts_misses_and_errors_against_all_requests():
    records = [record(), record(), record(ttft=300.0), record(ok=False, ttft=None, tpot=None, error="http-429"),
               record(ok=False, ttft=None, tpot=None, error="cut-off")]
    summary = summarize(records, seconds=2.0)
    assert summary["requests"] == 5 and summary["served"] == 3 and summary["met"] == 2
    assert summary["attainment"] == 0.4
    assert summary["goodput_rps"] == 1.0
    assert summary["p50_ttft_ms"] == 100.0 and summary["p99_ttft_ms"] == 300.0  # served requests only
    assert summary["errors"] == {"cut-off": 1, "http-429": 1}


def test_an_empty_step_has_no_attainment():
    assert summarize([], seconds=10.0)["attainment"] is None


def test_class_rates_split_the_total_by_share():
    rates = class_rates(5.0)
    assert sum(rates.values()) == pytest.approx(5.0)
    for klass in MIX:
        assert rates[klass.name] == pytest.approx(5.0 * klass.share / sum(c.share for c in MIX))
    assert all(n >= 1 for n in class_requests(0.01, 10.0).values())
    assert sum(class_requests(2.0, 60.0).values()) == pytest.approx(120, abs=len(MIX))


def test_seeds_are_the_same_for_every_policy_and_differ_across_rates_and_classes():
    assert class_seed(0, 2.0, 1) == class_seed(0, 2.0, 1)
    seeds = {class_seed(0, rate, index) for rate in (0.5, 1.0, 2.0, 4.0) for index in range(len(MIX))}
    assert len(seeds) == 4 * len(MIX)
    assert class_seed(1, 2.0, 0) != class_seed(0, 2.0, 0)
    assert all(0 <= s < 2**31 - 1 for s in seeds)


def test_budgets_scale_the_idle_latency_of_each_class():
    idle = {c.name: (100.0 * (i + 1), 10.0) for i, c in enumerate(MIX)}
    result = budgets(idle)
    for i, klass in enumerate(MIX):
        assert result[klass.name] == {"ttft_ms": pytest.approx(klass.ttft_x * 100.0 * (i + 1)),
                                      "tpot_ms": pytest.approx(klass.tpot_x * 10.0)}


METRICS = """# HELP supernet_requests_total Requests by preset and outcome.
# TYPE supernet_requests_total counter
supernet_requests_total{WorkerId="a",application="x",outcome="ok",preset="quality"} 3.0
supernet_requests_total{WorkerId="b",application="x",outcome="ok",preset="quality"} 2.0
supernet_requests_total{WorkerId="a",application="x",outcome="shed",preset="none"} 4.0
supernet_requests_total{WorkerId="a",application="x",outcome="ok",preset="fastest"} 1.0
supernet_time_to_first_token_seconds_count{application="x",preset="quality"} 5.0
"""


def test_served_quality_from_the_service_counters():
    before = ok_by_preset(METRICS)
    assert before == {"quality": 5.0, "fastest": 1.0}
    after = {"quality": 7.0, "fastest": 4.0, "custom": 1.0}
    served = served_between(before, after)
    assert served == {"custom": 1, "fastest": 3, "quality": 2}
    assert mean_quality(served, {"quality": 1.0, "fastest": 0.9}) == pytest.approx((2 * 1.0 + 3 * 0.9) / 5)
    assert mean_quality({}, {"quality": 1.0}) is None


def test_prediction_ratios_are_the_mean_over_the_step():
    before = 'supernet_prediction_ratio_sum{kind="tpot",preset="quality"} 2.0\n' \
             'supernet_prediction_ratio_count{kind="tpot",preset="quality"} 2.0\n'
    after = 'supernet_prediction_ratio_sum{kind="tpot",preset="quality"} 8.0\n' \
            'supernet_prediction_ratio_sum{kind="tpot",preset="fast"} 1.0\n' \
            'supernet_prediction_ratio_count{kind="tpot",preset="quality"} 4.0\n' \
            'supernet_prediction_ratio_count{kind="tpot",preset="fast"} 1.0\n' \
            'supernet_prediction_ratio_sum{kind="ttft",preset="quality"} 0.0\n' \
            'supernet_prediction_ratio_count{kind="ttft",preset="quality"} 0.0\n'
    assert prediction_ratios(before, after) == {"tpot": pytest.approx((8.0 - 2.0 + 1.0) / (4.0 - 2.0 + 1.0), abs=1e-3)}


def test_a_mix_given_as_json_and_the_faults_it_names():
    from bench.live_trace import MIX, parse_mix

    assert parse_mix(None) == MIX and parse_mix("") == MIX
    (klass,) = parse_mix('[{"name": "long", "share": 1, "prompt_tokens": 3000, "output_tokens": 128, '
                         '"ttft_x": 3, "tpot_x": 2}]')
    assert (klass.name, klass.prompt_tokens, klass.tpot_x) == ("long", 3000, 2)
    for text, fault in (("nope", "JSON list"), ('[{"name": "x"}]', "missing 5 required"), ("[]", "at least one"),
                        ('[{"name": "a", "share": 0, "prompt_tokens": 1, "output_tokens": 1, "ttft_x": 1, '
                         '"tpot_x": 1}]', "positive shares")):
        with pytest.raises(ValueError, match=fault):
            parse_mix(text)
