"""CPU per streamed token: N concurrent HTTP streams against the running default service, per process.

Streams ``--streams`` completions of ``--tokens`` tokens at once (after a warm-up) and measures HTTP
tokens/s; the engine's own decode tokens/s at that batch (``engine_``: the worker's full-batch decode
steps during the HTTP run; ``alone_``: the same engine stepped in this process right after, with the
worker's torch threads, while the service idles; ``alone_cpu_ms_per_token``: its CPU time, the comparison a
busy machine leaves intact); and the CPU ms (utime + stime from /proc, streaming phase only) per streamed
token of the ingress replica, the Serve HTTP proxy, the worker replica and this process (``client``: the
load generator). ``--rounds`` times in turn (this VM's speed drifts by tens of percent within minutes, so
each HTTP phase is compared with the engine alone measured right after it); one JSON line of the medians.
As ``supernet-router serve`` runs it, the ingress serves HTTP itself (``path: "ingress"``, proxy 0);
``--serve-proxy``: through Serve's HTTP proxy (the Helm chart's path).

    .venv/bin/python bench/stream_cpu.py --streams 32 --tokens 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procstat import cpu_seconds, find_pids, free_port, thread_cpu_seconds  # noqa: E402
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
        await asyncio.sleep(0.5)  # the engine keeps its last 64 steps: over a second at this batch


class EngineAlone:
    """The worker's engine built in this process with the worker's torch threads: ``run()`` steps ``streams``
    requests of ``tokens`` tokens to the end and returns the full-batch decode tokens/s and CPU ms per token
    (this process's CPU, the comparison a busy machine leaves intact where the wall-clock rate is not)."""

    def __init__(self, config, streams: int, tokens: int, prompt: str):
        from router.app import worker_spec
        from router.config import resolve_checkpoint
        from workers.deployment import build_engine
        from workers.model.tokenizer import Tokenizer

        import torch

        checkpoint = str(resolve_checkpoint(config).resolve())
        spec = worker_spec(config, checkpoint)
        torch.set_num_threads(max(1, spec.num_threads))  # as the worker replica runs it (workers/deployment.py)
        self.engine = build_engine(spec)
        self.ids, self.code = Tokenizer.load(checkpoint).encode(prompt), config.presets[0].placement
        self.streams, self.tokens = streams, tokens

    def run(self) -> tuple[float, float]:
        from workers.engine import Request
        from workers.sampling import SamplingParams

        engine = self.engine
        for _ in range(self.streams):
            engine.add_request(Request(self.ids, engine.model.config.placement(self.code),
                                       SamplingParams(max_tokens=self.tokens, ignore_eos=True)))
        rows, seconds, cpu = 0, 0.0, 0.0
        while engine.has_work():
            cpu_before = time.process_time()
            engine.step()
            step = engine.stats().recent_steps[-1]
            if step.num_prefill_tokens == 0 and step.num_rows == self.streams:
                rows, seconds = rows + step.num_generated, seconds + step.seconds
                cpu += time.process_time() - cpu_before
        return rows / seconds, 1000 * cpu / rows


def round_figures(tokens: list, elapsed: float, cpu: dict, steps: list, streams: int,
                  alone: tuple[float, float]) -> dict:
    """One round's figures: the HTTP phase's rates and CPU per token, beside the engine alone's right after."""
    alone_tps, alone_cpu_ms = alone
    total, events = sum(t for t, _ in tokens), sum(e for _, e in tokens)
    full = [s for s in steps if s["num_prefill_tokens"] == 0 and s["num_rows"] == streams]
    engine_tps = sum(s["num_generated"] for s in full) / sum(s["seconds"] for s in full) if full else None
    ms = {role: round(1000 * seconds / total, 4) for role, seconds in cpu.items()}
    return {
        "streamed_tokens": total, "sse_events": events, "http_tokens_per_s": round(total / elapsed, 1),
        "engine_tokens_per_s": engine_tps and round(engine_tps, 1), "alone_tokens_per_s": round(alone_tps, 1),
        "http_over_alone": round(total / elapsed / alone_tps, 3),
        **{f"{role}_cpu_ms_per_token": value for role, value in ms.items()},
        "ingress_plus_proxy_ms": round(ms["ingress"] + ms["proxy"], 4), "alone_ms_per_token": round(1000 / alone_tps, 4),
        "worker_over_alone": round(ms["worker"] * alone_tps / 1000, 3),
        "alone_cpu_ms_per_token": round(alone_cpu_ms, 4), "worker_over_alone_cpu": round(ms["worker"] / alone_cpu_ms, 3),
        # The worker's CPU beside its step thread's (Ray, Serve, the subscriptions, stats), over the step thread's:
        # both from the same seconds, so the machine's drift cancels out.
        "worker_rest_over_step_thread": round((ms["worker"] - ms["worker_step_thread"]) / ms["worker_step_thread"], 3),
        "proxy_cpu_ms_per_event": round(1000 * cpu["proxy"] / events, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3,
                        help="HTTP phase then the engine alone, this many times; the line gives each figure's median")
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
    alone = EngineAlone(config, args.streams, args.tokens, body["prompt"])

    async def http_phase():
        stop, steps = asyncio.Event(), {}
        poller = asyncio.create_task(poll_steps(handle, stop, steps))
        before = {role: cpu_seconds(pid) if pid else 0.0 for role, pid in pids.items()}
        before["client"] = time.process_time()  # this process: the load generator's own CPU
        before["worker_step_thread"] = thread_cpu_seconds(pids["worker"], "engine-step")
        start = time.perf_counter()
        tokens = await stream_all(url, body, args.streams)
        elapsed = time.perf_counter() - start
        after = {role: cpu_seconds(pid) if pid else 0.0 for role, pid in pids.items()}
        after["client"] = time.process_time()
        after["worker_step_thread"] = thread_cpu_seconds(pids["worker"], "engine-step")
        stop.set()
        await poller
        return tokens, elapsed, {role: after[role] - before[role] for role in after}, list(steps.values())

    async def measured():  # one event loop for every phase: the handle binds to the loop it is first used in
        await stream_all(url, {**body, "max_tokens": 16}, args.streams)  # warm-up: every path compiled
        alone.run()
        rounds = []
        for _ in range(args.rounds):  # alternating, so that the machine's drift hits both sides alike
            phase = await http_phase()
            rounds.append(round_figures(*phase, args.streams, alone.run()))
        await serve.shutdown_async()  # in this loop: the handle's router lives here
        return rounds

    rounds = asyncio.run(measured())
    ray.shutdown()
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]
              if all(isinstance(r[key], (int, float)) for r in rounds)}
    print(json.dumps({
        "bench": "stream_cpu", "path": "serve-proxy" if args.serve_proxy else "ingress", "streams": args.streams,
        "tokens": args.tokens, "rounds": args.rounds, **median, "load_1min": os.getloadavg()[0],
        "per_round": [{k: r[k] for k in ("http_over_alone", "worker_over_alone_cpu", "alone_tokens_per_s",
                                         "worker_rest_over_step_thread")}
                      for r in rounds],
    }))


if __name__ == "__main__":
    main()
