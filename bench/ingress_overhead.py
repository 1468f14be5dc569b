"""The ingress's added latency: the same one-token request through HTTP (ingress) and straight to the worker.

Starts a local Ray Serve app on the small checkpoint, then alternates the two
paths (so drift hits both alike): HTTP POST /v1/completions with
max_tokens=1, and the worker's streaming handle called from this process with
the same token ids and placement. The difference of the medians (and of the
p99s) is what the ingress adds: parsing, auth, tokenizing, the routing
decision, the extra actor hop and HTTP framing. Prints one JSON line.

    .venv/bin/python bench/ingress_overhead.py --requests 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procstat import free_port  # noqa: E402
from router.local_ray import local_ray_environment  # noqa: E402

local_ray_environment()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--checkpoint", type=Path, help="default: a fresh tiny checkpoint")
    parser.add_argument("--routed", action="store_true", help="with a speed table: the SLA policy decides")
    args = parser.parse_args()
    import httpx
    import ray
    from ray import serve

    from router.app import build_app
    from router.config import AppConfig
    from workers.model.tokenizer import Tokenizer

    folder = args.checkpoint or Path(tempfile.mkdtemp()) / "tiny"
    if args.checkpoint is None:
        from workers.model.tiny import make_tiny_checkpoint
        make_tiny_checkpoint(folder)
    config = {"model": {"checkpoint": str(folder)}, "ingress": {"model_name": "tiny"},
              "presets": [{"name": "quality", "placement": "AAAAAA", "quality": 1.0}]}
    if args.routed:
        from policies.tables import write_table
        from workers import profiling
        device = profiling.resolve_device("cpu")
        target = profiling.load_target(folder, None, device, profiling.resolve_dtype(None, device))
        speed = folder / "speed.json"
        write_table(speed, profiling.profile(target, [1, 2, 4], [64, 256], 64, warmup=1, repeats=3, progress=False))
        config["tables"] = {"speed": str(speed)}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppConfig.from_dict(config)), name="bench", route_prefix="/")
    worker = serve.get_deployment_handle("SupernetWorker", app_name="bench").options(stream=True)
    prompt = "def fibonacci(n):"
    ids = Tokenizer.load(folder).encode(prompt)
    body = {"model": "quality", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    http, direct = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        for i in range(args.requests + 20):  # the first 20 of each warm up
            start = time.perf_counter()
            assert client.post("/v1/completions", json=body).status_code == 200
            middle = time.perf_counter()
            request = {"request_id": uuid.uuid4().hex, "prompt_ids": ids, "placement": "AAAAAA",
                       "params": {"max_tokens": 1, "temperature": 0.0}}
            events = list(worker.generate.remote(request))
            end = time.perf_counter()
            assert events and events[-1]["finish_reason"]
            if i >= 20:
                http.append(middle - start)
                direct.append(end - middle)
    serve.shutdown()
    ray.shutdown()
    http_ms, direct_ms = np.array(http) * 1000, np.array(direct) * 1000
    print(json.dumps({
        "bench": "ingress_overhead", "requests": args.requests, "routed": args.routed,
        "http_p50_ms": round(float(np.median(http_ms)), 2), "http_p99_ms": round(float(np.percentile(http_ms, 99)), 2),
        "direct_p50_ms": round(float(np.median(direct_ms)), 2),
        "direct_p99_ms": round(float(np.percentile(direct_ms, 99)), 2),
        "added_p50_ms": round(float(np.median(http_ms) - np.median(direct_ms)), 2),
        "added_p99_ms": round(float(np.percentile(http_ms, 99) - np.percentile(direct_ms, 99)), 2),
    }))


if __name__ == "__main__":
    main()
