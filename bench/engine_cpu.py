"""Decode throughput of the engine on the CPU: the tiny checkpoint, a few placements, a few batch sizes.

For each (placement, batch size) it submits ``batch`` requests with seeded random
prompts, runs the engine to the end and times the decode-only steps (every row
decoding, no prefill chunk): decode tokens/s = rows / step time. "mixed" puts
rows of the four uniform placements and two mixed ones in one batch. Step times
are the engine's own StepRecords (scheduling, forward and sampling); each point
is the fastest of ``--repeats`` runs. Prints one JSON line; each result maps a
placement to one value per batch size (``params.batch_sizes``).

    taskset -c 0 .venv/bin/python bench/engine_cpu.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine import Engine, EngineConfig, Request  # noqa: E402
from workers.model.loader import load_checkpoint  # noqa: E402
from workers.model.tiny import make_tiny_checkpoint  # noqa: E402
from workers.profiling import cpu_name  # noqa: E402
from workers.sampling import SamplingParams  # noqa: E402

PLACEMENTS = ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "mixed"]
MIXED = ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS", "KGSAGK"]


def measure(model, code: str, batch: int, prompt_tokens: int, max_tokens: int, seed: int, repeats: int) -> dict:
    """The fastest of ``repeats`` identical runs (by median decode step), as frontier.py takes the best time."""
    runs = []
    for _ in range(repeats):
        generator = torch.Generator().manual_seed(seed)
        config = EngineConfig(cache_budget_bytes=1 << 34, max_prefill_tokens=prompt_tokens * batch,
                              max_running=batch, step_history=max_tokens + 8)
        engine = Engine(model, config)
        for i in range(batch):
            row_code = MIXED[i % len(MIXED)] if code == "mixed" else code
            prompt = [1] + torch.randint(4, model.config.vocab_size, (prompt_tokens - 1,), generator=generator).tolist()
            engine.add_request(Request(prompt, model.config.placement(row_code),
                                       SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
        engine.run_until_idle()
        steps = engine.stats().recent_steps
        decode = [s.seconds for s in steps if s.num_prefill_tokens == 0 and s.num_rows == batch]
        prefill = [s for s in steps if s.num_prefill_tokens]
        runs.append((statistics.median(decode), decode, prefill))
    median, decode, prefill = min(runs, key=lambda run: run[0])
    return {
        "decode_tokens_per_s": round(batch / median, 1),
        "step_ms": round(median * 1e3, 3),
        "step_ms_p90": round(statistics.quantiles(decode, n=10)[-1] * 1e3, 3),
        "prefill_tokens_per_s": round(sum(s.num_prefill_tokens for s in prefill) / sum(s.seconds for s in prefill), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: build the tiny one, seed 0)")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--placements", default=",".join(PLACEMENTS))
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="runs per point; the fastest is reported")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or make_tiny_checkpoint(Path(scratch) / "tiny", num_layers=6, seed=0)
        model = load_checkpoint(checkpoint, kernels="torch")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results: dict[str, dict[str, list]] = {}
    for code in args.placements.split(","):
        for batch in batches:
            skip = code == "mixed" and batch == 1  # one row cannot mix placements
            measured = {} if skip else measure(model, code, batch, args.prompt_tokens, args.max_tokens,
                                               args.seed, args.repeats)
            for key in ("decode_tokens_per_s", "step_ms", "step_ms_p90", "prefill_tokens_per_s"):
                results.setdefault(key, {}).setdefault(code, []).append(measured.get(key))
    print(json.dumps({
        "bench": "engine_cpu",
        "device": f"cpu: {cpu_name()}",
        "params": {
            "checkpoint": str(args.checkpoint or "tiny (6 layers, hidden 64, window 16, seed 0)"),
            "dtype": str(model.dtype).removeprefix("torch."),
            "batch_sizes": batches,
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "seed": args.seed,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        **results,
    }))


if __name__ == "__main__":
    main()
