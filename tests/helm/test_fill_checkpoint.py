"""The init container's checkpoint fill (helm/supernet-router/files/fill-checkpoint.sh), run here with sh.

The same script the chart mounts into every Ray pod: it fills once, skips a
filled volume by its marker, refills when the source changes, takes over a
stale lock and refuses what is not a checkpoint. Network sources are served
from a loopback HTTP server.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tests.helm.chart import CHART

SCRIPT = CHART / "files" / "fill-checkpoint.sh"


def fill(dest: Path, source: str, source_id: str, **env) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # python3, supernet-router of this venv
    environment = {**os.environ, "PATH": path, "SOURCE": source, "DEST": str(dest), "SOURCE_ID": source_id,
                   **{k: str(v) for k, v in env.items()}}
    return subprocess.run(["sh", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """A loopback HTTP server over a folder; yields (folder, base URL)."""
    root = tmp_path_factory.mktemp("www")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=5)


def write_archive(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> None:
    with tarfile.open(path, mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_tiny_fills_once_then_skips(tmp_path):
    dest = tmp_path / "models" / "checkpoint"
    first = fill(dest, "tiny", "tiny:layers=2,seed=0,window=16", TINY_LAYERS=2)
    assert first.returncode == 0, first.stderr
    from workers.model.config import load_config

    assert load_config(dest).num_layers == 2
    assert (dest / ".supernet-router-source").read_text() == "tiny:layers=2,seed=0,window=16"
    assert not (tmp_path / "models" / "checkpoint.lock").exists()
    second = fill(dest, "tiny", "tiny:layers=2,seed=0,window=16", TINY_LAYERS=2)
    assert second.returncode == 0 and "already holds" in second.stdout


def test_http_archive_and_refill_on_a_new_source(tmp_path, http_root):
    root, url = http_root
    write_archive(root / "v1.tar.gz", {"config.json": b'{"v": 1}', "model.safetensors": b"1" * 100})
    write_archive(root / "v2.tar", {"config.json": b'{"v": 2}'}, mode="w")
    dest = tmp_path / "checkpoint"
    result = fill(dest, "url", f"url:{url}/v1.tar.gz", URL=f"{url}/v1.tar.gz")
    assert result.returncode == 0, result.stderr
    assert (dest / "config.json").read_bytes() == b'{"v": 1}' and (dest / "model.safetensors").exists()
    result = fill(dest, "url", f"url:{url}/v2.tar", URL=f"{url}/v2.tar")
    assert result.returncode == 0, result.stderr
    assert "replacing url:" in result.stdout
    assert (dest / "config.json").read_bytes() == b'{"v": 2}' and not (dest / "model.safetensors").exists()


def test_an_archive_without_config_is_refused(tmp_path, http_root):
    root, url = http_root
    write_archive(root / "empty.tar.gz", {"README": b"not a checkpoint"})
    dest = tmp_path / "checkpoint"
    result = fill(dest, "url", f"url:{url}/empty.tar.gz", URL=f"{url}/empty.tar.gz")
    assert result.returncode == 1 and "no config.json" in result.stderr
    assert not (dest / ".supernet-router-source").exists()


def test_a_stale_lock_is_taken_over(tmp_path, http_root):
    root, url = http_root
    write_archive(root / "ok.tar.gz", {"config.json": b"{}"})
    dest = tmp_path / "checkpoint"
    lock = tmp_path / "checkpoint.lock"
    lock.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    result = fill(dest, "url", "url:ok", URL=f"{url}/ok.tar.gz", LOCK_STALE_MINUTES=1)
    assert result.returncode == 0, result.stderr
    assert "taking over a lock" in result.stdout and (dest / "config.json").exists() and not lock.exists()


def test_existing_needs_a_checkpoint(tmp_path):
    dest = tmp_path / "checkpoint"
    dest.mkdir()
    missing = fill(dest, "existing", "existing")
    assert missing.returncode == 1 and "config.json is missing" in missing.stderr
    (dest / "config.json").write_text("{}")
    assert fill(dest, "existing", "existing").returncode == 0


def test_unknown_source_and_url_scheme(tmp_path):
    assert fill(tmp_path / "a", "ftp", "ftp:x").returncode == 2
    result = fill(tmp_path / "b", "url", "url:ftp://x", URL="ftp://host/x.tar")
    assert result.returncode == 2 and "http(s):// or s3://" in result.stderr
