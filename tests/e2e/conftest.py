"""One local Ray + Serve for the whole e2e run (RAY_AUTH_MODE=disabled), with four applications:
the default one, one with API keys, one with tiny queues for the overload path, and one routed by
budget. Ray's metrics agent listens on ``ServeCluster.metrics_port`` (test_metrics.py scrapes it)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import httpx
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


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


def routed_presets(checkpoint, folder):
    """A CPU speed table for the tiny checkpoint, and two presets where the slower one is rated better
    (on a CPU attention is often the fastest mixer, so which is slower is read from the measured table)."""
    from policies.tables import read_speed_model, write_table
    from workers import profiling

    device = profiling.resolve_device("cpu")
    target = profiling.load_target(checkpoint, None, device, profiling.resolve_dtype(None, device))
    speed = folder / "speed.json"
    write_table(speed, profiling.profile(target, [1, 2, 4, 8], [64, 256, 1024], 64, warmup=1, repeats=3,
                                         progress=False))
    model = read_speed_model(speed)
    from policies.placement import Placement

    codes = ["AAAAAA", "KKKKKK"]
    slower, faster = sorted(codes, key=lambda c: -model.homogeneous_step(Placement.parse(c), 1, 64).ms)
    return speed, [{"name": "careful", "placement": slower, "quality": 1.0},
                   {"name": "quick", "placement": faster, "quality": 0.8}]


@dataclass(frozen=True)
class ServeCluster:
    url: str  # the Serve HTTP proxy
    metrics_port: int  # Ray's metrics export port: every process's ray.util.metrics, at /metrics


@pytest.fixture(scope="session")
def routed_tables(tiny_checkpoint, tmp_path_factory):
    """(speed table path, presets) for budget routing on the tiny checkpoint."""
    return routed_presets(tiny_checkpoint, tmp_path_factory.mktemp("tables"))


@pytest.fixture(scope="session")
def serve_url(serve_cluster):
    return serve_cluster.url


@pytest.fixture(scope="session")
def serve_cluster(tiny_checkpoint, tmp_path_factory, routed_tables):
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
    speed, presets = routed_tables
    routed = {**base, "presets": presets, "tables": {"speed": str(speed)}, "routing": {"stats_period_s": 0.2},
              "ingress": {"model_name": "tiny"}}
    serve.run(build_app(AppConfig.from_dict(routed)), name="routed", route_prefix="/routed")
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    yield ServeCluster(url, metrics_port)
    serve.shutdown()
    ray.shutdown()
