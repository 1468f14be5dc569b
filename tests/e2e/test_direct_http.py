"""The ingress serving HTTP itself (router/http_server.py, as `supernet-router serve` runs it): the same API on
its own port, off Serve's proxy. Counts tokens and compares texts, never timings."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.e2e.conftest import PRESETS

NEVER_HANGS_S = 120.0


def listen_port() -> int:
    """A free port below the kernel's ephemeral range: a port the kernel handed out (``free_port``) can be
    taken again by any outgoing connection before the ingress binds it, on a machine busy with Ray's."""
    import random
    import socket

    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for port in random.Random().sample(range(20000, max(20001, low)), 50):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port below the ephemeral range")


@pytest.fixture(scope="module")
def direct(serve_cluster, tiny_checkpoint):
    from ray import serve

    from router.app import build_app
    from router.config import AppConfig

    port = listen_port()
    config = {"model": {"checkpoint": str(tiny_checkpoint)}, "presets": PRESETS,
              "worker": {"cache_budget_bytes": 64 * 2**20}}
    serve.run(build_app(AppConfig.from_dict(config), listen=("127.0.0.1", port)), name="direct",
              route_prefix="/direct")
    yield f"http://127.0.0.1:{port}"
    serve.delete("direct")


async def stream(http: httpx.AsyncClient, body: dict) -> tuple[str, int, bool]:
    """(text, completion tokens, saw [DONE]) of one streamed completion."""
    text, tokens, done = "", 0, False
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                if event.get("choices"):
                    text += event["choices"][0]["text"]
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    return text, tokens, done


def test_the_ingress_serves_the_api_on_its_own_port(direct):
    assert httpx.get(f"{direct}/health", timeout=60).status_code == 200
    assert httpx.get(f"{direct}/metrics", timeout=60).status_code in (200, 503)
    assert {m["id"] for m in httpx.get(f"{direct}/v1/models", timeout=60).json()["data"]} >= {"quality", "fast"}
    bad = httpx.post(f"{direct}/v1/completions", json={"model": "quality", "prompt": "x", "max_tokens": 0}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_concurrent_streams_each_get_what_they_get_alone(direct):
    prompts = [f"def f{i}(x):\n    return" for i in range(8)]
    bodies = [{"model": "quality" if i % 2 else "fast", "prompt": p, "max_tokens": 20 + i, "temperature": 0,
               "ignore_eos": True} for i, p in enumerate(prompts)]
    alone = [httpx.post(f"{direct}/v1/completions", json=b, timeout=NEVER_HANGS_S).json() for b in bodies]

    async def together():
        async with httpx.AsyncClient(base_url=direct, timeout=NEVER_HANGS_S) as http:
            return await asyncio.gather(*(stream(http, b) for b in bodies))

    streamed = asyncio.run(together())
    assert [(t, n) for t, n, _ in streamed] == [(a["choices"][0]["text"], a["usage"]["completion_tokens"])
                                                for a in alone]
    assert all(done for _, _, done in streamed)


def test_a_client_that_leaves_mid_stream_frees_its_request(direct):
    from ray import serve

    worker = serve.get_deployment_handle("SupernetWorker", app_name="direct")
    body = {"model": "quality", "prompt": "import os\n", "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{direct}/v1/completions", json=body, timeout=NEVER_HANGS_S) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {") and '"text":"' in line:
                break  # one token seen: leave
    deadline = time.monotonic() + NEVER_HANGS_S
    while time.monotonic() < deadline:
        stats = worker.stats.remote().result()
        if not stats["running"] and not stats["waiting"] and stats["cache_used_bytes"] == 0:
            break
        time.sleep(0.2)
    assert not stats["running"] and stats["cache_used_bytes"] == 0, stats
