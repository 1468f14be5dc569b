"""``supernet-router bench engine``: decode speed per placement against its memory-bandwidth floor.

``register(commands)`` adds the ``bench`` group to ``router.cli``'s sub-parsers.
The measuring is ``workers/benchmark.py``; this module checks the options,
writes the versioned results file, prints a table and, as the last line of
stdout, one JSON summary line for ``bench/report.py record``
(docs/engine.md, "Speed on a GPU: how to measure").
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from policies.errors import ConfigError, InvalidPlacement, InvalidRequest
from policies.placement import MIXERS, Mixer, Placement
from policies.published import PUBLISHED_PRESETS


def register(commands) -> None:
    """Add ``bench`` (with ``bench engine``) to ``commands`` (``parser.add_subparsers(...)`` of router/cli.py)."""
    bench = commands.add_parser("bench", help="measure the engine on this device")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="KIND")
    engine = kinds.add_parser("engine", help="decode tokens/s, step time and cache memory per placement")
    source = engine.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint folder (e.g. the tiny one, on the CPU)")
    source.add_argument("--shape", help="random-weight model of a named shape, built on the GPU (superapriel-15b)")
    engine.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    engine.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)")
    engine.add_argument("--kernels", default="auto", choices=("auto", "fla", "torch"),
                        help="decode/prefill kernels: fla (the CUDA set, Triton + fla, required), torch (the plain-torch "
                             "path), or auto (the CUDA set on CUDA when importable, numba on a CPU)")
    engine.add_argument("--graphs", default="auto", choices=("auto", "capture", "eager", "off"),
                        help="uniform decode steps from CUDA graphs (workers/engine/graphs.py): auto (default: "
                             "captured on CUDA, off on a CPU), capture, eager (the static step uncaptured) or off")
    engine.add_argument("--placements", type=_names,
                        help="comma-separated: all-attention, all-gdn (any all-<mixer>), published preset names "
                             "(Reg/Lklhd-26 ...) or codes (AASGKG); default: all-attention, the published presets, "
                             "all-gdn")
    engine.add_argument("--context", type=_int_list, help="cached tokens per row, e.g. 16384,32768 "
                                                          "(default: 16384,32768 on CUDA, 256,1024 on a CPU)")
    engine.add_argument("--batch", type=_batch, default=None,
                        help="rows per step: 'auto' (default: as many as fit the cache budget) or e.g. 1,16,64")
    engine.add_argument("--max-batch", type=int, default=256, help="upper bound of --batch auto (default 256)")
    engine.add_argument("--cache-budget-bytes", type=int,
                        help="cache bytes for --batch auto (needed on a CPU; default on CUDA: --memory-fraction "
                             "of the memory free after the weights)")
    engine.add_argument("--memory-fraction", type=float, default=0.8,
                        help="share of free GPU memory the caches may take (default 0.8, as EngineConfig)")
    engine.add_argument("--steps", type=int, default=10, help="timed decode steps per point, median kept (default 10)")
    engine.add_argument("--warmup", type=int, default=2, help="untimed steps per point (default 2)")
    engine.add_argument("--seed", type=int, default=0, help="seed of the random weights, caches and tokens")
    engine.add_argument("--out", type=Path, help="results file to write (JSON)")
    engine.set_defaults(run=run_bench_engine)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def _batch(text: str) -> list[int] | None:
    return None if text.strip() == "auto" else _int_list(text)


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one placement")
    return names


def spread(counts: Mapping[Mixer, int]) -> Placement:
    """Each mixer's layers spread evenly: every mixer has slots at (k + 1/2) * L / n; layer i takes the i-th."""
    total = sum(counts.values())
    slots = sorted(((k + 0.5) * total / n, MIXERS.index(m), m) for m, n in counts.items() for k in range(n))
    return Placement(tuple(m for _, _, m in slots))


def scale_counts(counts: Mapping[Mixer, int], num_layers: int) -> dict[Mixer, int]:
    """Counts scaled to ``num_layers`` layers in all, by largest remainder (ties in MIXERS order)."""
    total = sum(counts.values())
    exact = {m: counts.get(m, 0) * num_layers / total for m in MIXERS}
    scaled = {m: int(v) for m, v in exact.items()}
    by_remainder = sorted(MIXERS, key=lambda m: (scaled[m] - exact[m], MIXERS.index(m)))
    for m in by_remainder[: num_layers - sum(scaled.values())]:
        scaled[m] += 1
    return scaled


def default_placements() -> list[str]:
    return ["all-attention", *(p.name for p in PUBLISHED_PRESETS if p.name != "all-attention"), "all-gdn"]


def resolve_placements(specs: Sequence[str] | None, config) -> list:
    """``all-<mixer>``, a published preset's name, or a code (``AASGKG``), checked against the model's layers.

    Published presets give only counts: ``spread`` places them, scaled first (``scale_counts``) on a
    model without their 48 layers, where their published speed-ups do not apply.
    """
    from workers.benchmark import NamedPlacement  # torch: only when the command runs

    published = {p.name: p for p in PUBLISHED_PRESETS}
    resolved = []
    for spec in specs or default_placements():
        preset = None
        if spec.startswith("all-") and spec[4:] in {m.value for m in MIXERS}:
            placement = Placement.uniform(spec[4:], config.num_layers)
            preset = published["all-attention"] if spec == "all-attention" and config.num_layers == 48 else None
        elif spec in published:
            exact = config.num_layers == published[spec].num_layers
            counts = published[spec].counts()
            placement = spread(counts if exact else scale_counts(counts, config.num_layers))
            preset = published[spec] if exact else None
        else:
            try:
                placement = Placement.parse(spec, config.num_layers)
            except InvalidPlacement as exc:
                if spec.isalpha():
                    raise InvalidPlacement(f"--placements {spec!r}: {exc.message}") from None
                names = ", ".join(["all-attention", "all-gdn", "all-kda", "all-sliding_window", *published])
                raise InvalidPlacement(f"--placements {spec!r} is neither a code (AASGKG) nor a name: {names}") \
                    from None
        resolved.append(NamedPlacement(spec, config.placement(placement), preset))
    return resolved


def run_bench_engine(args) -> int:
    from workers import benchmark, profiling
    from workers.model.config import load_config, parse_config, supernet_config_dict
    from workers.model.loader import load_checkpoint

    for name in ("max_batch", "steps", "cache_budget_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidRequest(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.warmup < 0:
        raise InvalidRequest(f"--warmup must be >= 0, got {args.warmup}")
    if not 0 < args.memory_fraction <= 1:
        raise InvalidRequest(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    device = profiling.resolve_device(args.device)
    dtype = profiling.resolve_dtype(args.dtype, device)
    if args.shape is not None:
        benchmark.check_shape(args.shape, device)  # before anything is built or measured
    if args.batch is None and args.cache_budget_bytes is None and device.type != "cuda":
        raise ConfigError("--batch auto on a CPU needs --cache-budget-bytes (or give --batch 1,2,...)")
    # Placements are checked against the config before a (50 GB) model is built.
    if args.shape is not None:
        config = parse_config(supernet_config_dict(**profiling.SHAPES[args.shape]))
    elif not args.checkpoint.is_dir():
        raise ConfigError(f"{args.checkpoint}: no such checkpoint folder")
    else:
        config = load_config(args.checkpoint)
    placements = resolve_placements(args.placements, config)
    if args.kernels == "fla" and device.type != "cuda":
        raise ConfigError("--kernels fla needs a CUDA device (on a CPU, auto runs the numba kernels, torch the "
                          "plain-torch path)")
    try:
        if args.shape is not None:
            target = benchmark.build_random_model(args.shape, device, dtype, args.kernels, args.seed)
        else:
            model = load_checkpoint(args.checkpoint, device=device, dtype=dtype, kernels=args.kernels)
            target = profiling.ProfileTarget(model, args.checkpoint.name,
                                             profiling.checkpoint_sha256(args.checkpoint), model.config)
    except ImportError as exc:  # --kernels fla without flash-linear-attention installed
        raise ConfigError(f"--kernels fla: flash-linear-attention is not importable ({exc})") from None
    contexts = args.context or list(benchmark.DEFAULT_CONTEXTS[device.type])
    bandwidth = benchmark.measure_bandwidth(device)
    budget, source = args.cache_budget_bytes, "--cache-budget-bytes"
    if budget is None and device.type == "cuda":
        budget = benchmark.cache_budget(device, args.memory_fraction)
        source = f"{args.memory_fraction} x the device memory free after the weights"
    entries = benchmark.bench_engine(target, placements, contexts, args.batch, budget_bytes=budget,
                                     bandwidth=bandwidth, max_batch=args.max_batch, warmup=args.warmup,
                                     steps=args.steps, seed=args.seed, decode_graphs=args.graphs)
    graphs = args.graphs if args.graphs != "auto" else ("capture" if device.type == "cuda" else "off")
    results = results_file(target, device, dtype, bandwidth, budget, source if budget else None, entries, {
        "contexts": contexts, "batch": args.batch or "auto", "max_batch": args.max_batch, "steps": args.steps,
        "warmup": args.warmup, "seed": args.seed, "decode_graphs": graphs})
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    if args.out is not None:
        print(f"results -> {args.out}")
    print(json.dumps(summary_line(results)))  # last line: what `bench/report.py record` reads
    return 0


def results_file(target, device, dtype, bandwidth: float, budget: int | None, budget_source: str | None,
                 entries: list[dict], params: dict) -> dict:
    """The versioned results file (``--out``): where, what, how, then one entry per point."""
    from policies.tables import utc_now
    from workers import benchmark, profiling

    copied = benchmark.COPY_BYTES[device.type]
    return {
        "format": benchmark.FORMAT, "version": benchmark.VERSION, "created": utc_now(),
        "software": profiling.software(), "device": profiling.device_name(device), "model": target.name,
        "model_sha256": target.model_sha256, "num_layers": target.config.num_layers,
        "dtype": str(dtype).removeprefix("torch."), "kernels": benchmark.kernels_in_use(target.model),
        "weights_bytes": benchmark.parameter_bytes(target.model),
        "bandwidth": {"bytes_per_s": bandwidth,
                      "method": f"device-to-device copy of {copied:,} bytes, read + write counted, median of 10"},
        "cache_budget_bytes": budget, "cache_budget_source": budget_source, "params": params,
        "timing": "ModelRunner.run over a decode StepBatch (ForwardBatch.build, forward, greedy argmax), device "
                  "synchronized around each step; caches filled with random values at the context and their "
                  "lengths reset before every step",
        "results": entries,
    }


def format_table(results: dict) -> str:
    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    budget = results["cache_budget_bytes"]
    lines = [f"{results['device']} | {results['model']} {results['dtype']}, kernels {results['kernels']} | "
             f"weights {results['weights_bytes'] / 1e9:.3g} GB | copy bandwidth "
             f"{results['bandwidth']['bytes_per_s'] / 1e9:.4g} GB/s | cache budget "
             f"{'-' if budget is None else f'{budget / 1e9:.3g} GB'}",
             f"{'placement':<18} {'A/S/K/G':<11} {'context':>7} {'batch':>5} {'step ms':>9} {'p90 ms':>9} "
             f"{'floor ms':>9} {'x floor':>7} {'tokens/s':>10} {'cache GB':>8} {'speed-up':>8} {'published':>9}"]
    for e in results["results"]:
        counts = "/".join(str(e["counts"][m]) for m in ("attention", "sliding_window", "kda", "gdn"))
        line = (f"{e['placement'][:18]:<18} {counts:<11} {e['context']:>7} {e['batch']:>5} "
                f"{number(e['step_ms'], '.3f'):>9} {number(e['step_ms_p90'], '.3f'):>9} {e['floor_ms']:>9.3f} "
                f"{number(e['x_floor'], '.2f'):>7} {number(e['tokens_per_s'], '.1f'):>10} "
                f"{e['cache_bytes'] / 1e9:>8.3g} {number(e['speedup'], '.2f'):>8} "
                f"{number(e['published_speedup'], '.2f'):>9}")
        lines.append(line + (f"  skipped: {e['skipped']}" if e["skipped"] else ""))
    return "\n".join(lines)


def summary_line(results: dict) -> dict:
    """One JSON line for ``bench/report.py record``: each metric maps a placement to one value per point."""
    points = list(dict.fromkeys((e["context"], e["batch_mode"] if e["batch_mode"] == "auto" else e["batch"])
                                for e in results["results"]))
    line = {"bench": "engine", "device": results["device"],
            "params": {"model": results["model"], "dtype": results["dtype"], "kernels": results["kernels"],
                       "points": [list(p) for p in points], **results["params"],
                       "bandwidth_gb_per_s": round(results["bandwidth"]["bytes_per_s"] / 1e9, 1),
                       "cache_budget_bytes": results["cache_budget_bytes"]}}
    digits = {"batch": None, "tokens_per_s": 1, "step_ms": 3, "floor_ms": 3, "x_floor": 2, "speedup": 2,
              "published_speedup": 2}
    for key, places in digits.items():
        table = line.setdefault(key, {})
        for e in results["results"]:
            value = e[key] if e[key] is None or places is None else round(e[key], places)
            table.setdefault(e["placement"], []).append(value)
    return line
