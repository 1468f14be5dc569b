"""The benches' process helpers: a free loopback port, and the CPU time of a running Serve application's
processes, read from /proc (Linux)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

TICK_S = os.sysconf("SC_CLK_TCK")
PROCESSES = {"ingress": ":SupernetIngress", "proxy": "ProxyActor", "worker": ":SupernetWorker"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_pid(port: int) -> int:
    """The process listening on a loopback TCP port (Serve's HTTP proxy), from /proc/net/tcp and fd links."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    inodes = {f"socket:[{r[9]}]" for r in rows if r[1].endswith(f":{port:04X}") and r[3] == "0A"}
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes:
                return int(fd.parts[2])
        except OSError:
            continue
    sys.exit(f"stream_cpu.py: nothing listens on port {port}")


def find_pids(port: int) -> dict[str, int | None]:
    """The process listening on ``port`` (Serve's HTTP proxy, or the ingress replica when it serves HTTP
    itself: then ``proxy`` is None) and, among its raylet's other children, the ingress and worker replicas by
    their titles (``ray::ServeReplica:<app>:<deployment>``): another Ray on the machine is never counted."""
    listener = listening_pid(port)
    raylet = Path(f"/proc/{listener}/stat").read_text().rsplit(")", 1)[1].split()[1]
    found: dict[str, int | None] = {"proxy": listener}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for role, marker in PROCESSES.items():
            if parent == raylet and title.startswith("ray::ServeReplica") and marker in title:
                found[role] = int(entry.name)
    if found.get("ingress") == listener:
        found["proxy"] = None  # no proxy on the token path
    if set(found) != set(PROCESSES):
        sys.exit(f"stream_cpu.py: no process found for {sorted(set(PROCESSES) - set(found))}")
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK_S  # utime, stime


def thread_cpu_seconds(pid: int, name: str) -> float:
    """CPU seconds of the process's threads with this OS-level name (``workers.engine.async_engine`` names
    its step thread ``engine-step``); 0 if none has it."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == name:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / TICK_S
        except OSError:
            continue
    return total
