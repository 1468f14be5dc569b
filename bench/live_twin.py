"""The live SLA benchmark's setting in the discrete-event simulator: its prediction beside the live result.

Same service as `bench/live_sla.py` runs (the default configuration: the embedded checkpoint's presets and
qualities, the speed table the service uses, each worker's cache budget and prefill chunk, the router's
margin and stats period, the same replica count), same mix, budgets, rates and seconds per rate, read from
the live run's record (the last line of `bench/results/live_sla.jsonl` and its per-rate table
`bench/results/live-sla-sweep.json`), or given (`--budgets`, `--rates`: a prediction before a live run,
e.g. to choose the rates). The simulator's replicas batch as the engine does and take their step times
from that speed table (bench/simcore.py), times ``--slowdown``: on this machine the load tool and the
ingress share the workers' CPUs, and the service's own calibration factor (measured over predicted step
time, `supernet_calibration_factor`) says by how much. It does not model the HTTP path nor speculative
decoding (which the live SLA policy may choose). Each policy and rate
runs ``--seeds`` Poisson draws of the live run's length: a live step of 60 s is one such draw, so its
attainment is compared with the range of the simulated ones (5th to 95th percentile). One JSON line:
live and simulated attainment per policy and rate, and the largest gap outside the simulated range; the
per-rate table (quality too) goes to `bench/results/live-twin-sweep.json`.

    .venv/bin/python bench/live_twin.py                               # beside the recorded live run
    .venv/bin/python bench/live_twin.py --slowdown 1.7                # replicas 1.7x slower than the table
    .venv/bin/python bench/live_twin.py --rates 0.5,1,2,4 --budgets '{"chat": {"ttft_ms": 400, "tpot_ms": 30}, "long-context": {"ttft_ms": 3000, "tpot_ms": 40}}'

Another workload (nothing live to compare with): ``--mix`` as JSON request classes, ``--budgets idle`` for
the live run's rule (each class's multiples of the quality preset's idle latencies, here simulated), and
``--margin`` for the SLA policy's safety margin:

    .venv/bin/python bench/live_twin.py --replicas 1 --rates 0.75,1,1.25 --budgets idle --out /tmp/twin.json \
        --mix '[{"name": "long-context", "share": 1, "prompt_tokens": 3000, "output_tokens": 128, "ttft_x": 3, "tpot_x": 2}]'
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench.live_trace import MIX, RequestClass, class_rates, parse_mix  # noqa: E402
from simcore import SimRequest  # noqa: E402
from simulate import run as simulate  # noqa: E402

RECORD = ROOT / "bench" / "results" / "live_sla.jsonl"
SWEEP = ROOT / "bench" / "results" / "live-sla-sweep.json"
OUT = ROOT / "bench" / "results" / "live-twin-sweep.json"


def fail(message: str) -> None:
    sys.exit(f"live_twin.py: {message}")


def the_service(speed_table: str | None):
    """The default configuration's predictor and worker/routing settings (what `supernet-router serve` runs)."""
    from policies.placement import Placement
    from policies.routing import PresetInfo
    from policies.routing.predict import Predictor
    from policies.tables import read_speed_model
    from router.config import AppConfig
    from bench.live_sla import service_config

    config = AppConfig.from_dict(service_config("sla", 1, speed_table), source="live_twin")
    speed = config.tables.speed
    presets = [PresetInfo(p.name, Placement.parse(p.placement), p.quality) for p in config.presets]
    return Predictor(read_speed_model(Path(speed)), presets, config.worker.max_prefill_tokens), config, speed


def slowed(predictor, speed: str, factor: float):
    """The same presets on the speed table with every time multiplied by ``factor``: replicas that get a
    share of the CPU the table was not measured with (the load tool and the ingress beside them)."""
    from policies.cost import SpeedModel
    from policies.routing.predict import Predictor
    from policies.tables import SpeedFile

    data = json.loads(Path(speed).read_text())
    for key in ("decode_ms", "prefill_ms_per_token"):
        data[key] = {m: (np.asarray(g) * factor).tolist() for m, g in data[key].items()}
    for key in ("shared_ms", "head_ms", "engine_ms"):
        if data.get(key) is not None:
            data[key] = [v * factor for v in data[key]]
    return Predictor(SpeedModel.from_file(SpeedFile.model_validate(data)), predictor.presets, predictor.chunk)


def arrivals(rate: float, seconds: float, budgets: dict, seed: int, mix=MIX) -> list[SimRequest]:
    """Each class's own Poisson stream at its share of ``rate`` for ``seconds`` (as live_sla's GuideLLM
    processes send them), merged by time."""
    rng, out = random.Random(seed), []
    for klass in mix:
        now, rate_here = 0.0, class_rates(rate, mix)[klass.name]
        while (now := now + rng.expovariate(rate_here)) < seconds:
            budget = budgets[klass.name]
            out.append(SimRequest(now, klass.prompt_tokens, klass.output_tokens, budget.get("ttft_ms"),
                                  budget.get("tpot_ms"), None, 0, klass.name))
    return sorted(out, key=lambda r: r.arrival)


def idle_budgets(mix, predictor, config) -> dict:
    """Budgets as live_sla sets them (multiples of the quality preset's idle TTFT and TPOT per class), from
    the simulator: one request alone on one replica, timed by the table."""
    out = {}
    for klass in mix:
        alone = [SimRequest(0.0, klass.prompt_tokens, klass.output_tokens, None, None, None, 0, klass.name)]
        simulate(f"fixed:{predictor.presets[0].name}", predictor, alone, 1, config.worker.cache_budget_bytes,
                 config.worker.max_prefill_tokens, config.routing.stats_period_s, config.routing.margin)
        r = alone[0]
        ttft, tpot = 1000 * (r.first_token - r.arrival), 1000 * (r.finished - r.first_token) / max(r.generated - 1, 1)
        out[klass.name] = {"ttft_ms": round(klass.ttft_x * ttft, 1), "tpot_ms": round(klass.tpot_x * tpot, 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", help="total requests/s, comma-separated (default: the live run's)")
    parser.add_argument("--budgets", help='JSON {class: {"ttft_ms":..,"tpot_ms":..}}, or "idle": each class\'s '
                                          "multiples of the quality preset's simulated idle latencies (default: the "
                                          "live run's)")
    parser.add_argument("--mix", help="JSON list of request classes (bench/live_trace.py RequestClass fields; "
                                      "default: its MIX, the live run's)")
    parser.add_argument("--margin", type=float, help="the SLA policy's safety margin (default: the service's)")
    parser.add_argument("--future-load-quantile", type=float,
                        help="the SLA policy's future_load_quantile (default: the service's)")
    parser.add_argument("--protect-running", choices=("on", "off"),
                        help="the SLA policy's protect_running (default: the service's)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"the per-rate table (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--seconds", type=float, help="seconds of arrivals per rate (default: the live run's)")
    parser.add_argument("--replicas", type=int, help="worker replicas (default: the live run's)")
    parser.add_argument("--policies", help="comma-separated (default: the live run's)")
    parser.add_argument("--speed-table", help="the service's speed table (default: the one the service uses)")
    parser.add_argument("--seeds", type=int, default=20, help="Poisson draws per policy and rate (default 20)")
    parser.add_argument("--slowdown", type=float, default=1.0,
                        help="the replicas' step times over the table's (the live service's calibration factor, "
                             "supernet_calibration_factor; default 1: as profiled); the router still predicts "
                             "with the table and calibrates online")
    args = parser.parse_args()
    live = json.loads(RECORD.read_text().strip().splitlines()[-1]) if RECORD.exists() else {}
    if args.mix:  # another workload than the live run's: nothing live to compare with
        live = {}
    rows = json.loads(SWEEP.read_text()) if SWEEP.exists() and live else []
    if not live and not (args.rates and args.budgets):
        fail(f"no live run is recorded for this mix ({RECORD.relative_to(ROOT)}): give --rates and --budgets, or "
             "run `bench/report.py run live_sla` first")
    try:
        mix = parse_mix(args.mix)
    except ValueError as error:
        fail(str(error))
    recorded = live.get("mix") or {}
    if not args.mix and recorded and all(len(v) == 5 for v in recorded.values()):  # the live run's own mix
        mix = tuple(RequestClass(name, *v) for name, v in recorded.items())
    predictor, config, speed = the_service(args.speed_table)
    margin = args.margin if args.margin is not None else config.routing.margin
    quantile = (args.future_load_quantile if args.future_load_quantile is not None
                else config.routing.future_load_quantile)
    protect = config.routing.protect_running if args.protect_running is None else args.protect_running == "on"
    try:
        budgets = (idle_budgets(mix, predictor, config) if args.budgets == "idle"
                   else json.loads(args.budgets) if args.budgets else live["budgets"])
    except json.JSONDecodeError as error:
        fail(f"--budgets is not JSON ({error})")
    if missing := [c.name for c in mix if c.name not in budgets]:
        fail(f"--budgets has no budget for {', '.join(missing)}")
    rates = [float(r) for r in args.rates.split(",")] if args.rates else live["rates"]
    seconds = args.seconds or live.get("seconds_per_rate", 60.0)
    replicas = args.replicas or live.get("replicas", 2)
    if args.slowdown <= 0:
        fail(f"--slowdown must be positive, got {args.slowdown}")
    truth = slowed(predictor, speed, args.slowdown) if args.slowdown != 1 else None
    names = [p.name for p in predictor.presets]
    policies = (args.policies.split(",") if args.policies
                else live.get("policies") or ["sla", *[f"fixed:{n}" for n in names], "least-loaded"])
    measured = {(r["policy"], r["rate"]): r for r in rows}
    out, worst = [], None
    for policy in policies:
        for rate in rates:
            draws = []
            for seed in range(args.seeds):
                requests = arrivals(rate, seconds, budgets, seed, mix)
                result = simulate(policy, predictor, requests, replicas, config.worker.cache_budget_bytes,
                                  config.worker.max_prefill_tokens, config.routing.stats_period_s, margin, truth,
                                  quantile, protect)
                draws.append((result["attainment"], result["mean_quality"]))
            attainment = sorted(a for a, _ in draws)
            row = {"policy": policy, "rate": rate,
                   "sim_attainment": round(sum(attainment) / len(attainment), 3),
                   "sim_range": [attainment[len(attainment) // 20], attainment[-1 - len(attainment) // 20]],
                   "sim_quality": round(sum(q for _, q in draws) / len(draws), 4)}
            if (policy, rate) in measured:
                seen = measured[(policy, rate)]
                low, high = row["sim_range"]
                gap = max(low - seen["attainment"], seen["attainment"] - high, 0.0)
                row |= {"live_attainment": seen["attainment"], "live_quality": seen["mean_quality"],
                        "gap_outside_range": round(gap, 3)}
                if worst is None or gap > worst["gap_outside_range"]:
                    worst = row
            out.append(row)
            print(json.dumps(row), file=sys.stderr)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"bench": "live_twin", "slowdown": args.slowdown, "replicas": replicas, "margin": margin,
                      "future_load_quantile": quantile, "protect_running": protect,
                      "mix": {c.name: [c.share, c.prompt_tokens, c.output_tokens, c.ttft_x, c.tpot_x] for c in mix},
                      "seconds_per_rate": seconds, "seeds": args.seeds,
                      "budgets": budgets, "speed_table": str(speed), "compared_with_live": bool(measured),
                      "largest_gap": worst and {k: worst[k] for k in ("policy", "rate", "live_attainment",
                                                                      "sim_range", "gap_outside_range")},
                      # policy@rate: [live attainment (null: no live run), simulated mean]
                      "attainment_live_sim": {f"{r['policy']}@{r['rate']:g}": [r.get("live_attainment"),
                                                                              r["sim_attainment"]] for r in out},
                      "sweep": str(args.out)}))


if __name__ == "__main__":
    main()
