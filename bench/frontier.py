"""Time the exact Pareto-frontier DP at the supernet's depth (48 layers, pair and triple terms).

The surrogate is random but shaped like the real one: attention best, then
sliding window, KDA, GDN, with neighbour interactions on top. Cost is the
paper's regression linear count model. Prints one JSON line.

    taskset -c 0 .venv/bin/python bench/frontier.py
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.frontier import linear_count_cost, pareto_frontier  # noqa: E402
from policies.placement import MIXERS, Mixer  # noqa: E402
from policies.published import REGRESSION_COST  # noqa: E402
from policies.surrogate import ClusterExpansion  # noqa: E402
from workers.profiling import cpu_name  # noqa: E402

# Mean per-layer quality of each mixer against attention (log-likelihood-like units).
MIXER_QUALITY = {Mixer.ATTENTION: 0.0, Mixer.SLIDING_WINDOW: -0.02, Mixer.KDA: -0.04, Mixer.GDN: -0.05}


def random_surrogate(num_layers: int, seed: int) -> ClusterExpansion:
    rng = np.random.default_rng(seed)
    mean = np.array([MIXER_QUALITY[m] for m in MIXERS])
    return ClusterExpansion(
        num_layers,
        3,
        -1.0,
        mean + rng.normal(0, 0.01, (num_layers, 4)),
        rng.normal(0, 0.005, (num_layers - 1, 4, 4)),
        rng.normal(0, 0.002, (num_layers - 2, 4, 4, 4)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    surrogate = random_surrogate(args.num_layers, args.seed)
    cost = linear_count_cost(REGRESSION_COST, args.num_layers)
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        frontier = pareto_frontier(surrogate, cost)
        timings.append(time.perf_counter() - start)
    result = {
        "bench": "frontier",
        "num_layers": args.num_layers,
        "max_range": surrogate.max_range,
        "seed": args.seed,
        "frontier_points": len(frontier),
        "seconds": round(min(timings), 4),
        "python": platform.python_version(),
        "cpu": cpu_name(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
