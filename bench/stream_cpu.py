"""CPU per streamed token: N concurrent HTTP streams against the running default service, per process.

Streams ``--streams`` completions of ``--tokens`` tokens at once (after a warm-up) and prints HTTP
tokens/s; the engine's own decode tokens/s at that batch (``engine_``: the worker's full-batch decode
steps during the HTTP run; ``alone_``: the same engine stepped in this process afterwards with the
worker's torch threads, nothing else running; ``alone_cpu_ms_per_token``: its CPU time, the comparison a busy machine leaves intact); and the CPU
ms (utime + stime from /proc, streaming phase only) per streamed token of the ingress replica, the Serve
HTTP proxy and the worker replica. One JSON line. As ``supernet-router serve`` runs it, the ingress serves HTTP
itself (``path: "ingress"``, proxy 0); ``--serve-proxy``: through Serve's HTTP proxy (the Helm chart's path).

    .venv/bin/python bench/stream_cpu.py --streams 32 --tokens 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procstat import cpu_seconds, find_pids, free_port  # noqa: E402
from router.local_ray import local_ray_environment  # noqa: E402

local_ray_environment()


async def stream_all(url: str, body: dict, streams: int) -> list[tuple[int, int]]:
    """(completion tokens, SSE events) per stream."""
    import httpx

    async def one(http) -> tuple[int, int]:
        tokens = events = 0
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                events += line.startswith("data: ")
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
        return tokens, events

    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        return await asyncio.gather(*(one(http) for _ in range(streams)))


async def poll_steps(handle, stop: asyncio.Event, steps: dict) -> None:
    """The worker's step records, collected while the streams run (it keeps only the latest)."""
    while not stop.is_set():
        for step in (await handle.stats.remote())["recent_steps"]:
            steps[step["ended_at"]] = step
        await asyncio.sleep(0.2)


def engine_alone(config, streams: int, tokens: int, prompt: str) -> tuple[float, float]:
    """Decode tokens/s of the engine itself at batch ``streams`` (the worker's engine, stepped here), and its
    CPU ms per token (this process's, robust to a busy machine where the wall-clock rate is not)."""
    from router.app import worker_spec
    from router.config import resolve_checkpoint
    from workers.deployment import build_engine
    from workers.engine import Request
    from workers.model.tokenizer import Tokenizer
    from workers.sampling import SamplingParams

    import torch

    checkpoint = str(resolve_checkpoint(config).resolve())
    spec = worker_spec(config, checkpoint)
    torch.set_num_threads(max(1, spec.num_threads))  # as the worker replica runs it (workers/deployment.py)
    engine = build_engine(spec)
    ids, code = Tokenizer.load(checkpoint).encode(prompt), config.presets[0].placement
    for _ in range(streams):
        engine.add_request(Request(ids, engine.model.config.placement(code),
                                   SamplingParams(max_tokens=tokens, ignore_eos=True)))
    rows, seconds, cpu = 0, 0.0, 0.0
    while engine.has_work():
        cpu_before = time.process_time()
        engine.step()
        step = engine.stats().recent_steps[-1]
        if step.num_prefill_tokens == 0 and step.num_rows == streams:
            rows, seconds = rows + step.num_generated, seconds + step.seconds
            cpu += time.process_time() - cpu_before
    return rows / seconds, 1000 * cpu / rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--no-ignore-eos", action="store_true", help="for servers that refuse ignore_eos")
    parser.add_argument("--serve-proxy", action="store_true", help="HTTP through Serve's proxy, not the ingress")
    args = parser.parse_args()
    import ray
    from ray import serve

    from router.app import build_app
    from router.defaults import default_config

    config = default_config()
    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    if args.serve_proxy:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="bench", route_prefix="/")
    else:
        serve.start(proxy_location="Disabled")
        serve.run(build_app(config, listen=("127.0.0.1", port)), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    body = {"model": config.presets[0].name, "prompt": "def fibonacci(n):", "max_tokens": args.tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if not args.no_ignore_eos:
        body["ignore_eos"] = True
    pids = find_pids(port)
    handle = serve.get_deployment_handle("SupernetWorker", app_name="bench")

    async def measured():  # one event loop for every phase: the handle binds to the loop it is first used in
        await stream_all(url, {**body, "max_tokens": 16}, args.streams)  # warm-up: every path compiled
        stop, steps = asyncio.Event(), {}
        poller = asyncio.create_task(poll_steps(handle, stop, steps))
        before = {role: cpu_seconds(pid) if pid else 0.0 for role, pid in pids.items()}
        start = time.perf_counter()
        tokens = await stream_all(url, body, args.streams)
        elapsed = time.perf_counter() - start
        after = {role: cpu_seconds(pid) if pid else 0.0 for role, pid in pids.items()}
        stop.set()
        await poller
        await serve.shutdown_async()  # in this loop: the handle's router lives here
        return tokens, elapsed, {role: after[role] - before[role] for role in pids}, list(steps.values())

    tokens, elapsed, cpu, steps = asyncio.run(measured())
    ray.shutdown()
    alone_tps, alone_cpu_ms = engine_alone(config, args.streams, args.tokens, body["prompt"])
    total, events = sum(t for t, _ in tokens), sum(e for _, e in tokens)
    full = [s for s in steps if s["num_prefill_tokens"] == 0 and s["num_rows"] == args.streams]
    engine_tps = sum(s["num_generated"] for s in full) / sum(s["seconds"] for s in full) if full else None
    ms = {role: round(1000 * seconds / total, 4) for role, seconds in cpu.items()}
    print(json.dumps({
        "bench": "stream_cpu", "path": "serve-proxy" if args.serve_proxy else "ingress", "streams": args.streams,
        "tokens": args.tokens, "streamed_tokens": total, "sse_events": events, "http_tokens_per_s": round(total / elapsed, 1),
        "engine_tokens_per_s": engine_tps and round(engine_tps, 1), "alone_tokens_per_s": round(alone_tps, 1),
        "http_over_alone": round(total / elapsed / alone_tps, 3),
        **{f"{role}_cpu_ms_per_token": value for role, value in ms.items()},
        "ingress_plus_proxy_ms": round(ms["ingress"] + ms["proxy"], 4), "alone_ms_per_token": round(1000 / alone_tps, 4),
        "worker_over_alone": round(ms["worker"] * alone_tps / 1000, 3),
        "alone_cpu_ms_per_token": round(alone_cpu_ms, 4), "worker_over_alone_cpu": round(ms["worker"] / alone_cpu_ms, 3),
        "proxy_cpu_ms_per_event": round(1000 * cpu["proxy"] / events, 4), "load_1min": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
