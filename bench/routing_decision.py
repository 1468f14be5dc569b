"""Time one routing decision: 16 presets x 64 replicas, 15B shapes, the roofline H100 speed table.

Replica snapshots are prepared once (the server rebuilds a replica's view only
when its stats change); each timed call predicts every (preset, replica) pair
and picks. Prints one JSON line with the median and p99 in microseconds. The
first policy built compiles the numba kernels (or loads them from the cache)
before anything is timed.

    taskset -c 0 .venv/bin/python bench/routing_decision.py
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.cost import SpeedModel  # noqa: E402
from policies.placement import MIXERS, Placement  # noqa: E402
from policies.roofline import roofline_speed_dict, super_apriel_memory  # noqa: E402
from policies.routing import PresetInfo, RoutingRequest, SlaPolicy  # noqa: E402
from policies.routing.predict import Predictor  # noqa: E402
from policies.routing.types import RunningRow, WorkerState  # noqa: E402
from policies.tables import SpeedFile  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    memory = super_apriel_memory(48)
    speed = SpeedModel.from_file(SpeedFile.model_validate(roofline_speed_dict(memory)))
    presets = [PresetInfo("p0", Placement.uniform("attention", 48), 1.0)]
    for i in range(1, args.presets):
        presets.append(PresetInfo(f"p{i}", Placement(tuple(rng.choice(MIXERS) for _ in range(48))), 1 - i / 40))
    workers = []
    for r in range(args.replicas):
        rows = tuple(RunningRow(rng.choice(presets).placement, rng.randrange(100, 32000), rng.randrange(1, 500),
                                rng.randrange(10**8, 10**9)) for _ in range(rng.randrange(0, 48)))
        used = sum(row.cache_bytes for row in rows)
        workers.append(WorkerState(f"r{r}", rows, rng.randrange(0, 4), rng.randrange(0, 20000),
                                   cache_budget_bytes=max(used, 1) + rng.randrange(0, 20 * 2**30), cache_used_bytes=used))
    policy = SlaPolicy(Predictor(speed, presets))
    policy.decide(RoutingRequest(100, 100), workers)  # builds the per-replica views once
    requests = [RoutingRequest(rng.randrange(10, 32000), rng.randrange(1, 2000), ttft_ms=rng.choice([None, 500, 3000]),
                               tpot_ms=rng.choice([None, 20, 60]), deadline_ms=rng.choice([None, 30000]),
                               min_quality=rng.choice([None, 0.8]), priority=rng.choice([-1, 0]))
                for _ in range(args.decisions)]
    times = []
    for request in requests:
        start = time.perf_counter()
        policy.decide(request, workers)
        times.append(time.perf_counter() - start)
    us = np.array(times) * 1e6
    print(json.dumps({"bench": "routing_decision", "presets": args.presets, "replicas": args.replicas,
                      "decisions": args.decisions, "median_us": round(float(np.median(us)), 1),
                      "p99_us": round(float(np.percentile(us, 99)), 1), "python": platform.python_version(),
                      "numpy": np.__version__, "numba": numba.__version__}))


if __name__ == "__main__":
    main()
