"""A bounded soak: thousands of mixed requests at a concurrency above the queue bound, then the books.

The default service (the embedded checkpoint on the CPU) with small queues (``--queue`` requests per
worker replica running plus as many waiting at its handle), driven by ``--concurrency`` closed-loop clients
for ``--requests`` requests or ``--duration-s`` seconds, whichever ends first. The mix, drawn from a
seeded generator: completions and chat, streamed or not, a share of clients that hang up after the first
token or before any byte, budgets tight enough to be shed, loose, or none; a client refused with 429 waits
0.2 s before its next request. Afterwards (the service idle):
every request must have ended in a response or an explicit error; the worker holds no cache bytes, the
ingress no in-flight request; the worker's resident memory is compared with its size after the warm-up.
Prints one JSON line (exit 1 if a check fails).

    .venv/bin/python bench/soak.py --requests 2000 --concurrency 20
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procstat import free_port  # noqa: E402

from router.local_ray import local_ray_environment  # noqa: E402

local_ray_environment()
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, item):", "# sort a list\n",
           "SELECT name FROM users WHERE", "for i in range(10):"]


def draw(rng: random.Random, model: str) -> dict:
    """One request: its body, whether it streams, and how its client behaves."""
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    prompt = rng.choice(PROMPTS)
    body = {"model": model, "max_tokens": rng.randint(4, 48), "temperature": rng.choice([0, 0.8]), "seed": 7}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    budget = rng.random()
    if budget < 0.15:  # no preset can meet it: shed (429) when sheddable, else served at risk
        body["sla"], body["priority"] = {"tpot_ms": 1e-6}, rng.choice([-1, 0])
    elif budget < 0.55:
        body["sla"] = {"ttft_ms": 30000, "tpot_ms": 5000}
    leave = rng.random()
    behaviour = "hang-up-at-once" if leave < 0.05 else "leave-after-first-token" if leave < 0.12 else "stay"
    if behaviour != "stay":
        stream = True
    body["stream"] = stream
    return {"path": "/v1/chat/completions" if chat else "/v1/completions", "body": body, "behaviour": behaviour}


async def one(http, url: str, request: dict) -> tuple[str, float]:
    """(outcome, seconds): ``ok``, ``http-<status>`` with a JSON error body, ``stream-error`` (an error event
    before [DONE]), ``left`` (the client hung up), or ``silent`` (the server ended without either)."""
    started = time.perf_counter()
    if request["behaviour"] == "hang-up-at-once":
        from urllib.parse import urlsplit

        parts, body = urlsplit(url), json.dumps(request["body"]).encode()
        _, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(f"POST {request['path']} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()
        return "left", time.perf_counter() - started
    if not request["body"]["stream"]:
        response = await http.post(request["path"], json=request["body"])
        if response.status_code != 200:
            response.json()["error"]["code"]  # an explicit error: a JSON body with a code
            return f"http-{response.status_code}", time.perf_counter() - started
        response.json()["choices"]
        return "ok", time.perf_counter() - started
    async with http.stream("POST", request["path"], json=request["body"]) as response:
        if response.status_code != 200:
            json.loads(await response.aread())["error"]["code"]
            return f"http-{response.status_code}", time.perf_counter() - started
        error, done = False, False
        async for line in response.aiter_lines():
            if request["behaviour"] == "leave-after-first-token" and line.startswith("data: {"):
                return "left", time.perf_counter() - started
            error |= line.startswith('data: {"error"')
            done |= line == "data: [DONE]"
    outcome = "stream-error" if error and done else "ok" if done else "silent"
    return outcome, time.perf_counter() - started


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def scrape(metrics_port: int, name: str) -> float | None:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"ray_{name}{{")]
    return sum(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--queue", type=int, default=8, help="requests per worker replica running, and waiting")
    parser.add_argument("--duration-s", type=float, default=900.0, help="stop issuing requests after this long")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import httpx
    import ray
    from ray import serve

    from router.app import build_app
    from router.config import AppConfig
    from router.defaults import default_config

    config = default_config().model_dump()
    config["worker"].update(max_ongoing_requests=args.queue, max_queued_requests=args.queue)
    metrics_port = free_port()
    ray.init(include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(proxy_location="Disabled")  # as `supernet-router serve`: the ingress serves HTTP itself
    serve.run(build_app(AppConfig.from_dict(config), listen=("127.0.0.1", port)), name="soak", route_prefix="/")
    url, model = f"http://127.0.0.1:{port}", config["presets"][0]["name"]
    handle = serve.get_deployment_handle("SupernetWorker", app_name="soak")
    worker = ray.get_actor(next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                                if a["name"].startswith("SERVE_REPLICA::soak#SupernetWorker#")), namespace="serve")
    worker_pid = ray.get(worker.__ray_call__.remote(lambda replica: os.getpid()))
    rng = random.Random(args.seed)
    requests = [draw(rng, model) for _ in range(args.requests)]

    async def run() -> dict:
        limits = httpx.Limits(max_connections=args.concurrency + 8)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
            for request in requests[:32]:  # warm-up: every path once, then the memory baseline
                await one(http, url, request)
            await asyncio.sleep(2)
            rss_start = rss_mb(worker_pid)
            outcomes, latencies, queue = collections.Counter(), collections.defaultdict(list), iter(requests)
            deadline, started = time.monotonic() + args.duration_s, time.perf_counter()

            async def client() -> None:
                for request in queue:
                    if time.monotonic() > deadline:
                        return
                    try:
                        outcome, seconds = await one(http, url, request)
                    except Exception as exc:  # noqa: BLE001: a transport failure, or a body with no error code
                        outcome, seconds = f"broken-{type(exc).__name__}", 0.0
                    outcomes[outcome] += 1
                    latencies[outcome].append(seconds)
                    if outcome == "http-429":  # a client that backs off a little, as the 429 asks
                        await asyncio.sleep(0.2)

            await asyncio.gather(*(client() for _ in range(args.concurrency)))
            elapsed = time.perf_counter() - started
            idle_by = time.monotonic() + 60  # then wait for the service to go idle
            while time.monotonic() < idle_by:
                stats = await handle.stats.remote()
                if not stats["running"] and not stats["waiting"] and scrape(metrics_port, "supernet_requests_in_flight") == 0:
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)
            stats = await handle.stats.remote()
            ok = sorted(latencies["ok"])
            result = {
                "bench": "soak", "requests": sum(outcomes.values()), "concurrency": args.concurrency,
                "queue_bound": 2 * args.queue, "seconds": round(elapsed, 1),
                "outcomes": dict(sorted(outcomes.items())),
                "p50_ok_s": round(ok[len(ok) // 2], 3) if ok else None,
                "p99_ok_s": round(ok[min(len(ok) - 1, int(0.99 * len(ok)))], 3) if ok else None,
                "engine_finished": stats["finished"], "cache_used_bytes_after": stats["cache_used_bytes"],
                "running_after": len(stats["running"]), "waiting_after": len(stats["waiting"]),
                "in_flight_after": scrape(metrics_port, "supernet_requests_in_flight"),
                "worker_rss_mb_start": round(rss_start, 1), "worker_rss_mb_after": round(rss_mb(worker_pid), 1),
            }
            await serve.shutdown_async()
            return result

    result = asyncio.run(run())
    ray.shutdown()
    result["rss_growth"] = round(result["worker_rss_mb_after"] / result["worker_rss_mb_start"] - 1, 3)
    failures = [name for name, bad in (
        ("silent or broken requests", any(k == "silent" or k.startswith("broken") for k in result["outcomes"])),
        ("cache bytes held", result["cache_used_bytes_after"] != 0),
        ("requests left running or waiting", result["running_after"] or result["waiting_after"]),
        ("requests left in flight at the ingress", result["in_flight_after"] != 0),
        ("worker memory grew by more than 10%", result["rss_growth"] > 0.10)) if bad]
    result["checks"] = "ok" if not failures else "; ".join(failures)
    print(json.dumps(result))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
