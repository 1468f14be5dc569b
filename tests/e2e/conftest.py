"""One local Ray + Serve for the whole e2e run (router/local_ray.py's environment), with four applications:
the default one, one with API keys, one with tiny queues for the overload path, and one routed by
budget. Ray's metrics agent listens on ``ServeCluster.metrics_port`` (test_metrics.py scrapes it)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import httpx
import pytest

# On a loaded 2-core machine a new process takes seconds to import Ray Serve: Serve's defaults (its HTTP proxy
# ready within 5 s, health checks answered within 10 s) kill a healthy proxy there, and the whole session's
# cluster with it. The cluster inherits these from this process at ray.init.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRESETS = [
    {"name": "quality", "placement": "AAAAAA", "quality": 1.0},
    {"name": "balanced", "placement": "ASASGK", "quality": 0.9},
    {"name": "fast", "placement": "SGKGKG", "quality": 0.8},
    {"name": "fastest", "placement": "GGGGGG", "quality": 0.7},
]


def routed_presets(checkpoint, folder, attention_factor: float = 10.0):
    """A speed table for the tiny checkpoint and two presets where the slower one (all attention) is rated better.

    The table is computed (the roofline arithmetic on the tiny shapes, attention's decode times multiplied
    by ``attention_factor``), not profiled here: a profile of this shared machine reorders close mixers from
    run to run, and a test must not depend on its timing. What the server predicts is the table times the
    replica's online calibration (measured / predicted step, kept within 0.2..20): a test that compares
    predictions across requests needs presets whose predicted steps differ by more than that range."""
    from policies.placement import Placement
    from policies.roofline import roofline_speed_dict
    from policies.tables import SpeedFile, read_speed_model, write_table
    from workers.model.config import load_config
    from workers.model.tiny import TINY_SHAPE

    config = load_config(checkpoint)
    t = TINY_SHAPE
    shape = {"hidden": t["hidden_size"], "ffn": t["intermediate_size"], "vocab": config.vocab_size,
             "layers": config.num_layers, "heads": t["heads"], "kv_heads": t["head_groups"],
             "head_size": t["head_size"], "window": t["window_size"], "gdn_key_heads": t["gdn_key_heads"],
             "gdn_value_heads": t["gdn_value_heads"], "gdn_dim": t["gdn_key_head_dim"], "kda_heads": t["kda_heads"],
             "kda_dim": t["kda_head_dim"]}
    cpu = {"name": "a CPU core", "bandwidth": 5e9, "flops": 2e10}  # about this machine's order of magnitude
    table = roofline_speed_dict(config.memory_model(kv_bytes=4), shape, cpu, batches=(1, 2, 4, 8),
                                contexts=(64, 256, 1024), prefill_contexts=(0, 256, 1024), tokens=(1, 16, 64),
                                prefill_chunk=64, weight_bytes=4)
    table["decode_ms"]["attention"] = [[attention_factor * ms for ms in row] for row in table["decode_ms"]["attention"]]
    table["fingerprint"].update(model=checkpoint.name, dtype="float32")
    speed = folder / f"speed-x{attention_factor:g}.json"
    write_table(speed, SpeedFile.model_validate(table))
    model = read_speed_model(speed)
    slower, faster = sorted(["AAAAAA", "KKKKKK"], key=lambda c: -model.homogeneous_step(Placement.parse(c), 1, 64).ms)
    assert (slower, faster) == ("AAAAAA", "KKKKKK")
    return speed, [{"name": "careful", "placement": slower, "quality": 1.0},
                   {"name": "quick", "placement": faster, "quality": 0.8}]


@dataclass(frozen=True)
class ServeCluster:
    url: str  # the Serve HTTP proxy
    metrics_port: int  # Ray's metrics export port: every process's ray.util.metrics, at /metrics


@pytest.fixture(scope="session")
def routed_tables(tiny_checkpoint, tmp_path_factory):
    """(speed table path, presets) for a routed application on the tiny checkpoint."""
    return routed_presets(tiny_checkpoint, tmp_path_factory.mktemp("tables"))


@pytest.fixture(scope="session")
def budget_tables(tiny_checkpoint, tmp_path_factory):
    """As ``routed_tables``, with attention a million times slower in the table: the budget test's presets stay
    apart (by 1000 times at the geometric mean) whatever the calibration does."""
    return routed_presets(tiny_checkpoint, tmp_path_factory.mktemp("tables"), attention_factor=1e6)


@pytest.fixture(scope="session")
def serve_url(serve_cluster):
    return serve_cluster.url


@pytest.fixture(scope="session")
def serve_cluster(tiny_checkpoint, tmp_path_factory, budget_tables):
    import ray
    from ray import serve

    from router.app import build_app
    from router.config import AppConfig

    metrics_port = free_port()  # metrics exported every second (Ray's default: 10 s)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = {"model": {"checkpoint": str(tiny_checkpoint)}, "presets": PRESETS,
            "worker": {"cache_budget_bytes": 64 * 2**20, "max_ongoing_requests": 64, "max_queued_requests": 64},
            "ingress": {"max_body_bytes": 64 * 1024}}
    serve.run(build_app(AppConfig.from_dict(base)), name="main", route_prefix="/")
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# one key per line\nsecret-key-1\n")
    secured = {**base, "ingress": {"api_keys_file": str(keys)}}
    serve.run(build_app(AppConfig.from_dict(secured)), name="secured", route_prefix="/secured")
    small = {**base, "worker": {"cache_budget_bytes": 64 * 2**20, "max_ongoing_requests": 1,
                                "max_queued_requests": 1, "max_running": 1}}
    serve.run(build_app(AppConfig.from_dict(small)), name="small", route_prefix="/small")
    speed, presets = budget_tables
    routed = {**base, "presets": presets, "tables": {"speed": str(speed)}, "routing": {"stats_period_s": 0.2},
              "ingress": {"model_name": "tiny"}}
    serve.run(build_app(AppConfig.from_dict(routed)), name="routed", route_prefix="/routed")
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    yield ServeCluster(url, metrics_port)
    serve.shutdown()
    ray.shutdown()
