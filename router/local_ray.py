"""What a Ray started by this process on its own machine needs before ``ray.init``: ``supernet-router serve``,
the e2e tests and the benchmarks call ``local_ray_environment()`` first. Values the user set are kept."""

from __future__ import annotations

import os

LOCAL_RAY_ENV = {
    # No token between this machine's own processes (Ray 2.5x asks for one by default).
    "RAY_AUTH_MODE": "disabled",
    # Ray starts its worker processes at nice 15, so that its driver stays responsive. Here the workers are
    # the service (its replicas and Serve's controller): at nice 15, any program at the normal priority on
    # the same machine (a load generator, a build, another test run) takes nearly all the CPU from them. Two
    # busy loops beside the test suite kept its Serve cluster from deploying within 10 minutes.
    "RAY_worker_niceness": "0",
}


def local_ray_environment() -> None:
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)
