"""Faults on the real local Ray Serve: a worker replica's process SIGKILLed mid-stream, with two replicas and
with one. Real processes, real HTTP clients; every bound here is a "never hangs" bound, far above the
normal time (seconds), not a speed claim.

Two applications on the session's Serve: "faulty" (budget routing over two worker replicas of at most 3
requests each, so that 6 streams land 3 and 3) and "lonely" (one worker replica of 3 rows, which checks
its engine's bookkeeping after every step and lets the test make model steps fail). Its tests run in file
order: a failing step, a client that leaves, then the replica killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from tests.e2e.conftest import PRESETS

NEVER_HANGS_S = 120.0  # a stream on a dead replica must end well within this
RESTART_WITHIN_S = 240.0  # Serve replacing a dead replica: a new process importing torch, on 2 busy cores


def test_ray_workers_run_at_the_normal_priority_so_other_programs_cannot_starve_the_service(serve_cluster):
    """Ray's default (nice 15) lets any other busy program take the CPUs from the replicas (router/local_ray.py)."""
    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote(), timeout=NEVER_HANGS_S) == 0


def deploy(name: str, config: dict):
    from ray import serve

    from router.app import build_app
    from router.config import AppConfig

    serve.run(build_app(AppConfig.from_dict(config)), name=name, route_prefix=f"/{name}")


@pytest.fixture(scope="module")
def faulty(serve_cluster, routed_tables, tiny_checkpoint):
    from ray import serve

    speed, presets = routed_tables
    deploy("faulty", {"model": {"checkpoint": str(tiny_checkpoint)}, "presets": presets,
                      "tables": {"speed": str(speed)}, "routing": {"stats_period_s": 0.2},
                      "ingress": {"model_name": "tiny"},
                      "worker": {"num_replicas": 2, "num_cpus": 0.5, "cache_budget_bytes": 64 * 2**20,
                                 "max_ongoing_requests": 3, "max_queued_requests": 16}})
    yield f"{serve_cluster.url}/faulty"
    serve.delete("faulty")


@pytest.fixture(scope="module")
def lonely(serve_cluster, tiny_checkpoint):
    from ray import serve

    deploy("lonely", {"model": {"checkpoint": str(tiny_checkpoint)}, "presets": PRESETS,
                      "ingress": {"model_name": "tiny"},
                      "worker": {"num_replicas": 1, "num_cpus": 0.5, "cache_budget_bytes": 64 * 2**20,
                                 "max_running": 3, "fault_injection": True, "check_invariants": True}})
    yield f"{serve_cluster.url}/lonely"
    serve.delete("lonely")


def kill_replica(app: str, replica_id: str) -> None:
    """SIGKILL the process of one worker replica (found through its Ray actor)."""
    import ray

    actor = ray.get_actor(f"SERVE_REPLICA::{app}#SupernetWorker#{replica_id}", namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda replica: os.getpid()))
    os.kill(pid, signal.SIGKILL)


class Stream:
    """One streamed completion as a client sees it: the replica that answered, tokens, error event, [DONE]."""

    def __init__(self):
        self.status, self.replica, self.tokens, self.error, self.done = None, None, 0, None, False
        self.events = 0  # SSE events so far: progress, however slow the machine
        self.first_token = asyncio.Event()

    async def run(self, http: httpx.AsyncClient, body: dict) -> None:
        try:
            async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                self.status, self.replica = response.status_code, response.headers.get("x-supernet-replica")
                if response.status_code != 200:
                    self.error = json.loads(await response.aread())["error"]
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.done = True
                        continue
                    event = json.loads(line[6:])
                    self.events += 1
                    if "error" in event:
                        self.error = event["error"]
                    elif event.get("usage"):
                        self.tokens = event["usage"]["completion_tokens"]
                    if event.get("choices") and event["choices"][0]["text"]:
                        self.first_token.set()
        finally:
            self.first_token.set()  # never leave the test waiting on a stream that ended early


LONG = {"model": "tiny", "prompt": "def fibonacci(n):", "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
        "stream_options": {"include_usage": True}}
SHORT = {"model": "tiny", "prompt": "import os\n", "max_tokens": 4, "temperature": 0}


async def while_progressing(tasks: list[asyncio.Task], streams: list[Stream], stalled_s: float) -> None:
    """Until ``tasks`` end, as long as their streams make progress: a stream that runs to its end on a slow,
    busy machine is not a hang; no event on any of them for ``stalled_s`` is."""
    pending, seen, since = set(tasks), -1, time.monotonic()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=1.0)
        events = sum(s.events for s in streams)
        if events != seen:
            seen, since = events, time.monotonic()
        elif time.monotonic() - since > stalled_s:
            raise AssertionError(f"no stream event for {stalled_s:.0f} s: {[vars(s) for s in streams]}")
    for task in tasks:
        task.result()


def test_a_replica_killed_mid_stream_ends_its_streams_with_an_error_and_the_other_serves_on(faulty):
    async def main():
        async with httpx.AsyncClient(base_url=faulty, timeout=NEVER_HANGS_S) as http:
            streams = [Stream() for _ in range(6)]
            tasks = [asyncio.create_task(s.run(http, LONG)) for s in streams]
            await asyncio.wait_for(asyncio.gather(*(s.first_token.wait() for s in streams)), NEVER_HANGS_S)
            replicas = {s.replica for s in streams}
            assert len(replicas) == 2 and all(s.status == 200 for s in streams), [(s.status, s.error) for s in streams]
            dead = streams[0].replica
            kill_replica("faulty", dead)
            # The dead replica's streams end promptly (the wait would time out, failing the test); the
            # others run to their end, however long that takes here, as long as their tokens keep coming.
            await asyncio.wait_for(asyncio.gather(*(t for t, s in zip(tasks, streams) if s.replica == dead)),
                                   NEVER_HANGS_S)
            await while_progressing(tasks, streams, NEVER_HANGS_S)
            # The failure has been seen: from now on nothing goes to the dead replica.
            after = [await http.post("/v1/completions", json=SHORT) for _ in range(6)]
            return streams, dead, after

    streams, dead, after = asyncio.run(main())
    on_dead = [s for s in streams if s.replica == dead]
    on_live = [s for s in streams if s.replica != dead]
    for s in on_dead:  # an explicit error event, then [DONE]
        assert s.error is not None and s.error["code"] == "worker_unavailable" and s.done, vars(s)
    for s in on_live:  # untouched: every token
        assert s.error is None and s.done and s.tokens == LONG["max_tokens"], vars(s)
    assert [r.status_code for r in after] == [200] * 6, [r.text for r in after]
    assert dead not in {r.headers["x-supernet-replica"] for r in after}


def worker_stats(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("SupernetWorker", app_name=app).stats.remote().result()


def wait_for(condition, timeout_s: float = NEVER_HANGS_S, period_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(period_s)
    return value


def test_a_failing_model_step_ends_exactly_its_requests_and_the_worker_serves_on(lonely):
    from ray import serve

    before = worker_stats("lonely")["finished"]

    async def main():
        async with httpx.AsyncClient(base_url=lonely, timeout=NEVER_HANGS_S) as http:
            running = [Stream() for _ in range(3)]  # every row of the replica
            tasks = [asyncio.create_task(s.run(http, LONG)) for s in running]
            await asyncio.wait_for(asyncio.gather(*(s.first_token.wait() for s in running)), NEVER_HANGS_S)
            queued = Stream()  # waits for a row: not in the failing step
            tasks.append(asyncio.create_task(queued.run(http, {**LONG, "max_tokens": 20})))
            assert await asyncio.to_thread(wait_for, lambda: worker_stats("lonely")["waiting"])
            handle = serve.get_deployment_handle("SupernetWorker", app_name="lonely")
            assert await handle.inject_step_faults.remote(1) == 1
            await asyncio.wait_for(asyncio.gather(*tasks), NEVER_HANGS_S)
            after = await http.post("/v1/completions", json=SHORT)
            return running, queued, after

    running, queued, after = asyncio.run(main())
    for s in running:  # an explicit error event naming the failure, then [DONE]
        assert s.error is not None and s.error["code"] == "engine_failure" and s.done, vars(s)
        assert "OutOfMemoryError" in s.error["message"]
    assert queued.error is None and queued.tokens == 20 and queued.done, vars(queued)
    assert after.status_code == 200
    stats = worker_stats("lonely")  # the engine checked its bookkeeping after every step (check_invariants)
    assert stats["cache_used_bytes"] == 0 and not stats["running"] and not stats["waiting"]
    assert stats["finished"]["error"] - before["error"] == 3


def test_a_client_that_leaves_mid_stream_aborts_its_request_and_frees_its_cache(lonely):
    before = worker_stats("lonely")["finished"]

    async def main():
        async with httpx.AsyncClient(base_url=lonely, timeout=NEVER_HANGS_S) as http:
            body = {**LONG, "max_tokens": 4000, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"text":"' in line.replace(" ", ""):
                        break  # a token arrived: leave, closing the connection

    asyncio.run(main())
    assert wait_for(lambda: worker_stats("lonely")["finished"]["abort"] > before["abort"]), \
        f"the engine never aborted the request of a client that left: {worker_stats('lonely')}"
    stats = worker_stats("lonely")
    assert stats["cache_used_bytes"] == 0 and not stats["running"]
    assert stats["finished"]["length"] == before["length"]  # aborted, not run to its end


def in_flight(cluster, app: str) -> float | None:
    """The ingress's supernet_requests_in_flight for ``app``, from Ray's metrics port (None: not exported yet)."""
    text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=30).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("ray_supernet_requests_in_flight{") and f'application="{app}"' in line]
    return sum(values) if values else None


def test_clients_that_leave_early_leave_nothing_in_flight_and_no_cache(lonely, serve_cluster):
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(lonely)
    body = json.dumps({**LONG, "max_tokens": 200, "stream": True}).encode()
    before = worker_stats("lonely")["finished"]

    async def main():
        async with httpx.AsyncClient(base_url=lonely, timeout=NEVER_HANGS_S) as http:
            running = [Stream() for _ in range(3)]  # every row busy: the next requests would wait
            tasks = [asyncio.create_task(s.run(http, {**LONG, "max_tokens": 4000})) for s in running]
            await asyncio.wait_for(asyncio.gather(*(s.first_token.wait() for s in running)), NEVER_HANGS_S)
            for _ in range(4):  # send a request, then hang up at once (before any byte of the response)
                with socket.create_connection((url.hostname, url.port)) as sock:
                    sock.sendall(f"POST {url.path}/v1/completions HTTP/1.1\r\nHost: x\r\n"
                                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                                 + body)
            await asyncio.to_thread(wait_for, lambda: in_flight(serve_cluster, "lonely") == 3)
            for task in tasks:  # then the three streams' clients leave mid-stream
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert wait_for(lambda: in_flight(serve_cluster, "lonely") == 0), in_flight(serve_cluster, "lonely")
    assert wait_for(lambda: not (s := worker_stats("lonely"))["running"] and s["cache_used_bytes"] == 0)
    finished = worker_stats("lonely")["finished"]
    assert finished["abort"] - before["abort"] >= 3 and finished["length"] == before["length"], (before, finished)
    assert not worker_stats("lonely")["waiting"]


def test_with_one_replica_a_request_after_its_death_fails_explicitly_until_serve_replaces_it(lonely):
    first = httpx.post(f"{lonely}/v1/completions", json=SHORT, timeout=NEVER_HANGS_S)
    assert first.status_code == 200, first.text
    kill_replica("lonely", first.headers["x-supernet-replica"])
    deadline, statuses = time.monotonic() + RESTART_WITHIN_S, []
    while time.monotonic() < deadline:
        response = httpx.post(f"{lonely}/v1/completions", json=SHORT, timeout=NEVER_HANGS_S)
        statuses.append(response.status_code)
        if response.status_code == 200:
            break
        # Until the replacement runs: an explicit, retryable error, never a hang or a bare 500.
        assert response.status_code == 503 and response.json()["error"]["code"] == "worker_unavailable", \
            response.text
        assert "Retry-After" in response.headers
        time.sleep(1)
    assert statuses[-1] == 200, f"no answer {RESTART_WITHIN_S} s after the replica died: {statuses}"
    assert response.headers["x-supernet-replica"] != first.headers["x-supernet-replica"]
