"""The placement toolkit's commands: ``profile``, ``evaluate``, ``fit``, ``frontier``, ``acceptance`` (docs/tables.md).

``register(commands)`` adds them to ``router.cli``'s sub-parsers. Bad input
raises ``policies.errors`` exceptions, which the CLI turns into one line on
stderr and exit code 2 (usage, config) or 3 (a table or checkpoint that does
not match).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

from policies.errors import ConfigError, InvalidRequest

log = logging.getLogger(__name__)


def register(commands) -> None:
    """Add the toolkit's sub-commands to ``commands`` (``parser.add_subparsers(...)`` of router/cli.py)."""
    profile = commands.add_parser("profile", help="measure a speed table on this device")
    source = profile.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint folder to profile")
    source.add_argument("--shape", help="random-weight model of a named shape, built on the GPU (superapriel-15b)")
    profile.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    profile.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)")
    profile.add_argument("--batches", type=_int_list, help="decode batch sizes, e.g. 1,2,4,8 (default per device)")
    profile.add_argument("--contexts", type=_int_list, help="cached tokens per row, e.g. 64,256,1024 (default per device)")
    profile.add_argument("--prefill-chunk", type=int, help="tokens per prefill chunk (default per device)")
    profile.add_argument("--warmup", type=int, default=2, help="untimed runs per point (default 2)")
    profile.add_argument("--repeats", type=int, default=5, help="timed runs per point, median kept (default 5)")
    profile.add_argument("--out", type=Path, required=True, help="speed table to write (JSON)")
    profile.set_defaults(run=run_profile)

    evaluate = commands.add_parser("evaluate", help="score sampled placements by log-likelihood of a text")
    evaluate.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder")
    evaluate.add_argument("--data", type=Path, required=True, help='plain text, or .jsonl with a "text" per line')
    evaluate.add_argument("--placements", type=int, default=0, help="placements to sample evenly over mixer counts")
    evaluate.add_argument("--placement", action="append", default=[], help="also score this code (repeatable)")
    evaluate.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    evaluate.add_argument("--context", type=int, default=128, help="tokens per window (default 128)")
    evaluate.add_argument("--max-tokens", type=int, help="use at most this many tokens of the data")
    evaluate.add_argument("--batch-windows", type=int, default=8, help="windows per forward (default 8)")
    evaluate.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    evaluate.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)")
    evaluate.add_argument("--out", type=Path, required=True, help="quality table; an existing one is resumed")
    evaluate.set_defaults(run=run_evaluate)

    fit = commands.add_parser("fit", help="fit the quality surrogate and report held-out rank correlation")
    fit.add_argument("--quality", type=Path, required=True, help="quality table from `evaluate`")
    fit.add_argument("--max-range", type=int, default=3, choices=(1, 2, 3), help="interaction range (default 3)")
    fit.add_argument("--holdout", type=float, default=0.2, help="share held out for the report (default 0.2)")
    fit.add_argument("--seed", type=int, default=0, help="split and cross-validation seed (default 0)")
    fit.add_argument("--out", type=Path, required=True, help="surrogate fit to write (JSON)")
    fit.set_defaults(run=run_fit)

    frontier = commands.add_parser("frontier", help="exact Pareto frontier and presets at an operating point")
    frontier.add_argument("--quality", type=Path, help="quality table: plotted, and fitted on if no --surrogate")
    frontier.add_argument("--surrogate", type=Path, help="surrogate fit from `fit`")
    costs = frontier.add_mutually_exclusive_group(required=True)
    costs.add_argument("--speed", type=Path, help="speed table from `profile`")
    costs.add_argument("--cost-model", choices=("regression", "idealized"), help="the paper's linear count model")
    frontier.add_argument("--batch", type=int, help="rows per decode step (with --speed)")
    frontier.add_argument("--context", type=int, help="cached tokens per row (with --speed)")
    frontier.add_argument("--presets", type=int, default=5, help="presets to spread along the frontier (default 5)")
    frontier.add_argument("--out", type=Path, required=True, help="presets file to write (JSON)")
    frontier.add_argument("--plot", type=Path, help="also draw the frontier to this PNG")
    frontier.set_defaults(run=run_frontier)


    acceptance = commands.add_parser("acceptance", help="measure how often draft placements' tokens survive "
                                                        "verification by target placements (speculative decoding)")
    acceptance.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder")
    acceptance.add_argument("--data", type=Path, required=True, help='plain text, or .jsonl with a "text" per line')
    acceptance.add_argument("--targets", type=_codes, required=True, help="comma-separated placement codes")
    acceptance.add_argument("--drafts", type=_codes, required=True, help="comma-separated placement codes")
    acceptance.add_argument("--tokens", type=int, default=4, help="tokens drafted per verify step (default 4)")
    acceptance.add_argument("--prompts", type=int, default=8, help="prompts per pair and mode (default 8)")
    acceptance.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    acceptance.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    acceptance.add_argument("--seed", type=int, default=0, help="seed of the temperature-1 runs (default 0)")
    acceptance.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    acceptance.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)")
    acceptance.add_argument("--out", type=Path, required=True, help="acceptance table to write (JSON)")
    acceptance.set_defaults(run=run_acceptance)


def _codes(text: str) -> list[str]:
    codes = [part.strip() for part in text.split(",") if part.strip()]
    if not codes:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more placement codes, comma-separated")
    return codes


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give non-negative integers")
    return values


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InvalidRequest(f"{name} must be at least 1, got {value}")


def run_profile(args) -> int:
    from policies.tables import write_table
    from workers import profiling

    device = profiling.resolve_device(args.device)
    grid = profiling.DEFAULT_GRIDS[device.type]
    batches = args.batches or list(grid["batches"])
    contexts = args.contexts or list(grid["contexts"])
    chunk = args.prefill_chunk or grid["prefill_chunk"]
    for name, values in (("--batches", batches), ("--contexts", contexts)):
        if sorted(set(values)) != values or min(values) < 1:
            raise InvalidRequest(f"{name} must be increasing positive integers, got {values}")
    for name, value in (("--prefill-chunk", chunk), ("--repeats", args.repeats)):
        _positive(name, value)
    if args.warmup < 0:
        raise InvalidRequest(f"--warmup must be >= 0, got {args.warmup}")
    target = profiling.load_target(args.checkpoint, args.shape, device, profiling.resolve_dtype(args.dtype, device))
    table = profiling.profile(target, batches, contexts, chunk, warmup=args.warmup, repeats=args.repeats)
    print(write_table(args.out, table))
    return 0


def run_evaluate(args) -> int:
    from workers import evaluation, profiling
    from workers.model.loader import load_checkpoint
    from workers.model.tokenizer import Tokenizer

    for name in ("context", "batch_windows", "max_tokens"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.placements < 0:
        raise InvalidRequest(f"--placements must be >= 0, got {args.placements}")
    device = profiling.resolve_device(args.device)
    dtype = profiling.resolve_dtype(args.dtype, device)
    model = load_checkpoint(args.checkpoint, device=device, dtype=dtype)
    named = [model.config.placement(code) for code in args.placement]
    placements = evaluation.sample_placements(model.config.num_layers, args.placements, args.seed) + named
    if not placements:
        raise InvalidRequest("nothing to score: give --placements N and/or --placement CODE")
    tokenizer = Tokenizer.load(args.checkpoint)
    documents = [tokenizer.encode(text) for text in evaluation.read_texts(args.data)]
    windows = evaluation.make_windows(documents, args.context, args.max_tokens)
    data = evaluation.data_fingerprint(args.data, windows, args.context)
    fingerprint = _fingerprint(profiling, model, args.checkpoint.name, profiling.checkpoint_sha256(args.checkpoint))
    table = evaluation.evaluate(evaluation.Scorer(model, windows, args.batch_windows), placements, args.out,
                                fingerprint, data)
    print(f"{args.out}: {len(table.results)} placements scored over {data.tokens} tokens")
    return 0


def _fingerprint(profiling, model, name: str, sha: str):
    from policies.tables import Fingerprint, utc_now

    return Fingerprint(device=profiling.device_name(model.device), model=name, model_sha256=sha,
                       num_layers=model.config.num_layers, dtype=str(model.dtype).removeprefix("torch."),
                       created=utc_now(), software=profiling.software())


def run_fit(args) -> int:
    import numpy as np

    from policies.surrogate import ClusterExpansion, evaluate
    from policies.tables import HoldoutReport, QualityFile, SurrogateBody, SurrogateFile, read_table, write_table

    if not 0 <= args.holdout < 1:
        raise InvalidRequest(f"--holdout must be in [0, 1), got {args.holdout}")
    quality = read_table(args.quality, QualityFile)
    codes = [r.placement for r in quality.results]
    scores = np.array([r.mean_loglik for r in quality.results])
    order = np.random.default_rng(args.seed).permutation(len(codes))
    num_test = int(round(args.holdout * len(codes))) if args.holdout > 0 else 0
    test, train = order[:num_test], order[num_test:]
    if len(train) < 5:
        raise ConfigError(f"{args.quality}: {len(codes)} placements leave {len(train)} to fit on; need at least 5 "
                          "(score more with `evaluate`, or lower --holdout)")
    surrogate = ClusterExpansion.fit([codes[i] for i in train], scores[train], max_range=args.max_range, seed=args.seed)
    spearman = r2 = rmse = None
    if len(test):
        held = evaluate(surrogate, [codes[i] for i in test], scores[test])
        spearman, r2, rmse = (None if np.isnan(v) else float(v) for v in (held.spearman, held.r2, held.rmse))
    report = HoldoutReport(fraction=args.holdout, seed=args.seed, num_train=len(train), num_test=len(test),
                           spearman=spearman, r2=r2, rmse=rmse)
    write_table(args.out, SurrogateFile(
        format="supernet-router/surrogate-fit", version=1, fingerprint=quality.fingerprint,
        quality_sha256=hashlib.sha256(args.quality.read_bytes()).hexdigest(), holdout=report,
        surrogate=SurrogateBody.model_validate(surrogate.to_dict())))
    shown = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"held-out ({len(test)} of {len(codes)} placements): spearman {shown(spearman)}, r2 {shown(r2)}, "
          f"rmse {shown(rmse)} nats/token; "
          f"ridge alpha {surrogate.ridge_alpha:.3g} -> {args.out}")
    return 0


def load_surrogate(path: Path):
    """A surrogate fit file as (its table, the ClusterExpansion), checked against its own fingerprint."""
    from policies.errors import TableMismatch
    from policies.surrogate import ClusterExpansion
    from policies.tables import SurrogateFile, check_layers, read_table

    table = read_table(path, SurrogateFile)
    try:
        surrogate = ClusterExpansion.from_dict(table.surrogate.model_dump(exclude_none=True))
    except TableMismatch as exc:
        raise TableMismatch(f"{path}: {exc.message}") from None
    check_layers(f"{path} (surrogate)", surrogate.num_layers, "its fingerprint", table.fingerprint.num_layers)
    return table, surrogate


def run_frontier(args) -> int:
    from policies.cost import OperatingCost, spread_presets
    from policies.frontier import linear_count_cost
    from policies.published import COST_MODELS
    from policies.surrogate import ClusterExpansion
    from policies.tables import (OperatingPoint, PresetEntry, PresetsFile, QualityFile, SpeedFile, check_layers,
                                 read_speed_model, read_table, write_table)

    if args.quality is None and args.surrogate is None:
        raise InvalidRequest("give --surrogate (from `fit`) and/or --quality (fitted here when no --surrogate)")
    _positive("--presets", args.presets)
    quality = read_table(args.quality, QualityFile) if args.quality else None
    if args.surrogate:
        fit, surrogate = load_surrogate(args.surrogate)
        fingerprint = fit.fingerprint
        if quality is not None:
            check_layers(f"{args.quality} (quality)", quality.fingerprint.num_layers, str(args.surrogate),
                         surrogate.num_layers)
    else:
        fingerprint = quality.fingerprint
        surrogate = ClusterExpansion.fit([r.placement for r in quality.results],
                                         [r.mean_loglik for r in quality.results])
    num_layers = surrogate.num_layers
    if args.speed:
        if args.batch is None or args.context is None:
            raise InvalidRequest("--speed needs the operating point: --batch B --context C")
        _positive("--batch", args.batch)
        _positive("--context", args.context)
        speed_fingerprint = read_table(args.speed, SpeedFile).fingerprint
        speed = read_speed_model(args.speed)
        check_layers(f"{args.speed} (speed table)", speed.num_layers, "the surrogate", num_layers)
        cost = OperatingCost.from_speed(speed, args.batch, args.context)
        point = OperatingPoint(cost_model="speed-table", cost_unit="ms", batch=args.batch, context=args.context,
                               extrapolated=cost.estimate.extrapolated, reasons=list(cost.estimate.reasons))
        for reason in cost.estimate.reasons:
            log.warning("operating point outside the measured grid: %s", reason)
    else:
        if args.batch is not None or args.context is not None:
            raise InvalidRequest(f"--cost-model {args.cost_model} is blind to batch and context: drop --batch/--context")
        speed_fingerprint = None
        cost = OperatingCost(linear_count_cost(COST_MODELS[args.cost_model], num_layers), 0.0, "fa-layers")
        point = OperatingPoint(cost_model=args.cost_model, cost_unit="fa-layers", batch=None, context=None,
                               extrapolated=False, reasons=[])
    frontier, baseline, presets = spread_presets(surrogate, cost, args.presets)

    def entry(p) -> PresetEntry:
        return PresetEntry(name=p.name, placement=p.placement.code, counts={m.value: n for m, n in p.placement.counts().items()},
                           predicted_quality=p.predicted_quality, retention=p.retention, cost=p.cost, speedup=p.speedup)

    write_table(args.out, PresetsFile(
        format="supernet-router/presets", version=1, fingerprint=fingerprint, speed_fingerprint=speed_fingerprint,
        operating_point=point, baseline=entry(baseline), frontier_points=len(frontier),
        presets=[entry(p) for p in presets]))
    if args.plot:
        plot_frontier(args.plot, frontier, cost, baseline, presets, quality, point)
    print(f"{len(frontier)} frontier points; presets ({cost.unit}) -> {args.out}")
    for p in presets:
        print(f"  {p.name:>14}  {p.placement.code}  quality {p.predicted_quality:.4f}  cost {p.cost:.4g}")
    return 0


def plot_frontier(path: Path, frontier, cost, baseline, presets, quality, point) -> None:
    """Speed-up against quality: sampled placements (measured), the predicted frontier, the presets."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'supernet-router[toolkit]'") from None
    figure = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if quality is not None:
        from policies.placement import Placement

        speedups = [baseline.cost / cost(Placement.parse(r.placement)) for r in quality.results]
        axes.scatter(speedups, [r.mean_loglik for r in quality.results], s=12, alpha=0.5, color="grey",
                     label="sampled placements (measured)")
    axes.step([baseline.cost / p.cost for p in frontier], [p.quality for p in frontier], where="post",
              color="tab:blue", label=f"exact frontier (predicted, {len(frontier)} points)")
    axes.scatter([p.speedup for p in presets], [p.predicted_quality for p in presets], color="tab:red", zorder=3,
                 label="presets")
    for p in presets:
        axes.annotate(p.name, (p.speedup, p.predicted_quality), textcoords="offset points", xytext=(4, -10), fontsize=8)
    where = (f"batch {point.batch}, context {point.context}" if point.cost_model == "speed-table"
             else f"{point.cost_model} linear cost model")
    axes.set_xlabel(f"predicted decode speed-up over all-attention ({where})")
    axes.set_ylabel("mean log-likelihood per token")
    axes.set_title("Placement frontier" + (" (extrapolated beyond the speed table)" if point.extrapolated else ""))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def run_acceptance(args) -> int:
    from policies.speculation import check_draft_tokens
    from policies.tables import write_table
    from workers import acceptance, evaluation, profiling
    from workers.model.loader import load_checkpoint
    from workers.model.tokenizer import Tokenizer

    check_draft_tokens(args.tokens)
    for name in ("prompts", "prompt_tokens", "max_tokens"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    device = profiling.resolve_device(args.device)
    model = load_checkpoint(args.checkpoint, device=device, dtype=profiling.resolve_dtype(args.dtype, device))
    pairs = [(model.config.placement(t), model.config.placement(d)) for t in args.targets for d in args.drafts]
    for target, draft in pairs:
        model.check_placement(target)
        model.check_placement(draft)
    tokenizer = Tokenizer.load(args.checkpoint)
    tokens = [t for text in evaluation.read_texts(args.data) for t in tokenizer.encode(text)]
    prompts = acceptance.cut_prompts(tokens, args.prompts, args.prompt_tokens)
    fingerprint = _fingerprint(profiling, model, args.checkpoint.name, profiling.checkpoint_sha256(args.checkpoint))
    table = acceptance.measure(model, prompts, pairs, args.tokens, args.max_tokens, args.seed, fingerprint,
                               str(args.data))
    write_table(args.out, table)
    for entry in table.entries:
        print(f"{entry.target} <- {entry.draft}: greedy {entry.greedy.acceptance_rate:.1%} per token, "
              f"{entry.greedy.accepted_per_verify:.2f} kept per verify; temperature 1 "
              f"{entry.sampled.acceptance_rate:.1%}, {entry.sampled.accepted_per_verify:.2f}")
    print(args.out)
    return 0
