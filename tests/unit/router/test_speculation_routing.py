"""The ingress's speculation: "auto" speculates on a replica state where the speed model predicts a win
and not on one where it loses; a given draft is passed through; the routing object and headers say so."""

import time
from types import SimpleNamespace

import pytest

from policies.tables import (AcceptanceCounts, AcceptanceData, AcceptanceEntry, AcceptanceFile, Fingerprint, utc_now,
                             write_table)
from router.api_models import CompletionRequest
from router.config import AppConfig
from policies.errors import InvalidPlacement
from router.gateway import Gateway
from tests.e2e.conftest import routed_presets


def counts():
    """Per-token acceptance 0.8: 400 kept, 100 steps that refused one."""
    return AcceptanceCounts(verify_steps=125, drafted=500, accepted=400, rejected_steps=100, accepted_per_verify=3.2,
                            acceptance_rate=0.8)


@pytest.fixture
def gateway(tiny_checkpoint, tmp_path):
    speed, presets = routed_presets(tiny_checkpoint, tmp_path, attention_factor=2.0)  # careful: all attention
    entry = AcceptanceEntry(target="AAAAAA", draft="KKKKKK", greedy=counts(), sampled=counts())
    table = AcceptanceFile(format="supernet-router/acceptance", version=1, fingerprint=Fingerprint(
        device="test", model="tiny", model_sha256="", num_layers=6, dtype="float32", created=utc_now(), software="test"),
                           draft_tokens=4, data=AcceptanceData(source="test", prompts=1, prompt_tokens=1,
                                                               max_tokens=1, seed=0), entries=[entry])
    acceptance = write_table(tmp_path / "acceptance.json", table)
    config = AppConfig.from_dict({"model": {"checkpoint": str(tiny_checkpoint)}, "presets": presets,
                                  "tables": {"speed": str(speed), "acceptance": str(acceptance)}})
    state = {}
    replica = SimpleNamespace(replica_id=SimpleNamespace(unique_id="r0"), routing_stats=None)

    def replicas():
        replica.routing_stats = state["stats"]
        return [replica]

    gw = Gateway(config, str(tiny_checkpoint), replicas)
    gw.state = state
    return gw


def stats(rows, context):
    running = [["AAAAAA", context, 100, 1024, f"r{i}"] for i in range(rows)]
    return {"taken_at": time.time(), "running": running, "cache_budget_bytes": 2**34, "cache_used_bytes": 0}


def request(prompt_tokens=900, max_tokens=100, **extra):
    return CompletionRequest(model="careful", prompt=[1] * prompt_tokens, max_tokens=max_tokens, temperature=0,
                             **extra)


def test_auto_speculates_where_it_wins_and_not_where_it_loses(gateway):
    gateway.state["stats"] = stats(0, 1)
    alone = gateway.prepare(request(60, 20), {})  # alone at a short context: the weights dominate a step
    gateway.state["stats"] = stats(7, 1000)  # seven rows of the same preset at 1k: attention reads dominate
    busy = gateway.prepare(request(), {})
    assert alone.draft is None and "x-draft-placement" not in alone.routing.headers()
    assert busy.draft is not None and busy.draft.code == "KKKKKK"
    headers = busy.routing.headers()
    assert headers["x-draft-placement"] == "KKKKKK" and int(headers["x-draft-tokens"]) == busy.draft_tokens >= 1
    assert busy.routing.predicted_speculation_gain > 1.05 and busy.routing.preset == "careful"
    assert gateway.worker_request(busy)["draft"] == "KKKKKK"
    off = gateway.prepare(request(speculation="off"), {})
    assert off.draft is None


def test_a_given_draft_is_passed_through_and_a_bad_one_is_named(gateway):
    gateway.state["stats"] = stats(0, 1)
    given = gateway.prepare(request(speculation={"draft": "quick", "tokens": 3}), {})
    assert (given.draft.code, given.draft_tokens, given.routing.draft_preset) == ("KKKKKK", 3, "quick")
    with pytest.raises(InvalidPlacement) as refused:
        gateway.prepare(request(speculation={"draft": "XYZ"}), {})
    assert refused.value.http_status == 400 and refused.value.param == "speculation.draft"


def test_the_replicas_acceptance_on_this_traffic_turns_speculation_off(gateway):
    """Workers report each pair's kept and examined proposals; summed over replicas they replace the table's
    rate, and a draft this traffic mostly refuses is no longer chosen."""
    gateway.state["stats"] = stats(7, 1000)
    assert gateway.prepare(request(), {}).draft is not None
    gateway.state["stats"] = {**stats(7, 1000), "speculation": [["AAAAAA", "KKKKKK", 100, 1000]]}
    refused = gateway.prepare(request(), {})  # this snapshot's counts are read before the decision
    assert gateway.routing.acceptance.rate("AAAAAA", "KKKKKK", sampled=False) == pytest.approx(0.1)
    assert refused.draft is None
