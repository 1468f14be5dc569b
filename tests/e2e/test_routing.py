"""End to end: the SLA-aware router on the running server picks presets from the budget and says so."""

import httpx


def post(url, body, headers=None):
    response = httpx.post(f"{url}/routed/v1/completions", json=body, headers=headers or {}, timeout=120)
    assert response.status_code == 200, response.text
    return response


def test_two_requests_that_differ_only_in_budget_get_different_presets(serve_url):
    body = {"model": "tiny", "prompt": "def area(r):", "max_tokens": 4, "temperature": 0}  # the router chooses
    loose = post(serve_url, body)
    assert loose.headers["x-preset"] == "careful"  # no budget: the best quality
    careful_tpot = float(loose.headers["x-predicted-tpot-ms"])
    quick = post(serve_url, {**body, "preset": "quick"})
    quick_tpot = float(quick.headers["x-predicted-tpot-ms"])
    assert quick_tpot < careful_tpot
    # Meets quick's prediction with the margin, not careful's, under any calibration (conftest.budget_tables).
    # (A finished request still listed by the replica's last stats snapshot is not counted: the router saw it
    # finish, router/routing.py; counted, careful's row would make quick's step as slow as careful's.)
    budget = (quick_tpot * careful_tpot) ** 0.5 / 0.9
    tight = post(serve_url, body, {"x-slo-tpot-ms": f"{budget:.4f}"})
    assert tight.headers["x-preset"] == "quick", (careful_tpot, quick_tpot, budget, tight.json()["routing"])
    assert tight.headers["x-placement"] != loose.headers["x-placement"]
    routing = tight.json()["routing"]
    assert routing["preset"] == "quick" and routing["reason"] == "best quality that meets the budget"
    assert not routing["sla_at_risk"] and float(tight.headers["x-predicted-tpot-ms"]) <= budget * 0.9


def test_impossible_budget_sheds_sheddable_requests_and_flags_the_rest(serve_url):
    body = {"model": "tiny", "prompt": "import os", "max_tokens": 4, "sla": {"tpot_ms": 1e-6}}
    shed = httpx.post(f"{serve_url}/routed/v1/completions", json={**body, "priority": -1}, timeout=120)
    assert shed.status_code == 429 and shed.headers["x-supernet-shed-reason"] == "no-preset-meets-slo"
    assert shed.headers["retry-after"] and "latency budget" in shed.json()["error"]["message"]
    kept = post(serve_url, body)
    assert kept.json()["routing"]["sla_at_risk"] is True


def test_min_quality_is_respected_on_the_server(serve_url):
    body = {"model": "tiny", "prompt": "x = ", "max_tokens": 2, "min_quality": 0.9, "sla": {"tpot_ms": 1e-6}}
    assert post(serve_url, body).headers["x-preset"] == "careful"
    too_high = httpx.post(f"{serve_url}/routed/v1/completions", json={**body, "min_quality": 1.0, "sla": None,
                                                                       "priority": 0}, timeout=120)
    assert too_high.status_code == 200
