"""The ingress replica's own HTTP server: uvicorn on the replica's event loop, serving ``router.ingress.api``.

Behind Serve's HTTP proxy every server-sent event is one more actor message (ingress -> proxy) and the
proxy's own work per event: measured, that hop cost more CPU per token than everything else on the path
(docs/benchmarks.md, stream_cpu). Serving HTTP in the ingress takes it out of the token path; the ingress
still calls the workers through their Serve handles. The routes are the same FastAPI app that Serve's
proxy would call (their ``self`` is this replica's Ingress, as Serve binds it).

The socket is bound with SO_REUSEPORT, so several ingress replicas on one node share the port (the kernel
spreads connections over them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from policies.errors import ConfigError

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or ConfigError naming the address (so a taken port fails the replica's start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"the ingress cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the replica's signals are Ray's to handle
        yield


class HttpServer:
    """``HttpServer(app, host, port).start()`` from the loop that will serve; ``await stop()``."""

    def __init__(self, app, host: str, port: int):
        self.host, self.port = host, port
        self._socket = bind(host, port)
        config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning",
                                timeout_keep_alive=30)
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._socket]))
        self._task.add_done_callback(self._ended)
        log.info("the ingress serves HTTP at http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the ingress's HTTP server stopped: %r", task.exception())
