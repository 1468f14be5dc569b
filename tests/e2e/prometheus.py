"""A real Prometheus server (the Debian package's binary) on loopback, for the tests: start, query, stop by PID.

Its scrape config is the one docs/metrics.md gives a cluster: Ray's metrics export port, with the
``ray_`` prefix that Ray's agent adds stripped again, so series are stored under their supernet_* names.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

BINARY = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
MISSING = ("the Prometheus server binary is not installed (Debian: `apt-get install -y prometheus`; "
           "`make test` installs it when it runs as root)")

CONFIG = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: ray
    static_configs:
      - targets: [{targets}]
    metric_relabel_configs:
      - source_labels: [__name__]
        regex: "ray_(supernet_.*)"
        target_label: __name__
        replacement: "$1"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """``with Prometheus(folder, ["127.0.0.1:8080"]) as prom: prom.query("up")``."""

    def __init__(self, folder: Path, targets: list[str], scrape_interval_s: float = 1.0):
        """A scrape times out after ``scrape_interval_s`` (Prometheus allows no longer): a target that takes longer
        to answer has no data at all. Ray's metrics agent, once a test session has run a few applications,
        answers with thousands of series (2.5 MB) and takes about a second on a busy 2-core machine."""
        if BINARY is None:
            raise FileNotFoundError(MISSING)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = self.folder / "prometheus.yml"
        self.config.write_text(CONFIG.format(interval=f"{scrape_interval_s:g}s",
                                             targets=", ".join(f'"{t}"' for t in targets)))
        self.log = self.folder / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> "Prometheus":
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [BINARY, f"--config.file={self.config}", f"--storage.tsdb.path={self.folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout_s} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # by PID: this process only
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def query(self, expr: str) -> list[dict]:
        """An instant query's result list; raises on a PromQL error."""
        return self._api("query", expr, {})

    def query_range(self, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict]:
        """A range query's series (as a dashboard panel asks, over ``start``..``end``, unix seconds)."""
        return self._api("query_range", expr, {"start": start, "end": end, "step": step_s})

    def _api(self, endpoint: str, expr: str, params: dict) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/{endpoint}", params={"query": expr, **params}, timeout=10)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise ValueError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def names_since(self, selector: str, start: float) -> set[str]:
        """Metric names of the series matching ``selector`` with samples since ``start`` (unix seconds),
        including series that ended since (a gauge nobody sets any more ages out of Ray's export)."""
        response = httpx.get(f"{self.url}/api/v1/label/__name__/values",
                             params={"match[]": selector, "start": start, "end": time.time()}, timeout=10).json()
        return set(response["data"])

    def scrape_health(self) -> list[str]:
        """Each target's health, last error and last scrape's duration: what a test says when data is missing."""
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        return [f"{t['scrapeUrl']}: {t['health']}, last scrape {t['lastScrapeDuration']:.2f} s of "
                f"{t['scrapeTimeout']} allowed{', error: ' + t['lastError'] if t['lastError'] else ''}"
                for t in body["data"]["activeTargets"]]

    def value(self, expr: str) -> float | None:
        """The first sample's value, or None for an empty result."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def metric_names(self, prefix: str = "supernet_") -> set[str]:
        response = httpx.get(f"{self.url}/api/v1/label/__name__/values", timeout=10).json()
        return {name for name in response["data"] if name.startswith(prefix)}
