"""``GET /metrics`` on the service: this node's supernet_* metrics in the Prometheus text format.

Ray's metrics agent already serves every process's ``ray.util.metrics`` on the node's metrics export
port (8080 with ``supernet-router serve`` and on KubeRay), but under a ``ray_`` prefix and beside all of
Ray's own series. This reads that page once per scrape and keeps the application's series under the
names the dashboards query (the same rewrite the scrape config in docs/metrics.md applies).
"""

from __future__ import annotations

import re

import httpx

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_RAY_PREFIXED = re.compile(r"^(# (?:HELP|TYPE) )?ray_(supernet_)", flags=re.MULTILINE)


def metrics_url() -> str | None:
    """This node's metrics agent page, from Ray's node table (None outside Ray or without an export port)."""
    import ray

    if not ray.is_initialized():
        return None
    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
    port = node.get("MetricsExportPort") if node else None
    return f"http://{node['NodeManagerAddress']}:{port}/metrics" if port else None


def supernet_only(text: str) -> str:
    """The ``ray_supernet_*`` samples and their HELP/TYPE lines, renamed ``supernet_*``; nothing else."""
    kept = [_RAY_PREFIXED.sub(r"\1\2", line) for line in text.splitlines() if _RAY_PREFIXED.match(line)]
    return "\n".join(kept) + "\n" if kept else ""


async def application_metrics(url: str, timeout_s: float = 5.0) -> str:
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        response = await client.get(url)
    response.raise_for_status()
    return supernet_only(response.text)
