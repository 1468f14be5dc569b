"""Measured decode steps against the speed table's prediction, per batch composition (uniform and mixed).

The router prices a step as the table's sum over (layer, mixer group) plus the shared layers, head and the
engine's own work (``SpeedModel.step``). This runs the default checkpoint's engine as a worker replica does
(one torch thread per reserved CPU, its prefill chunk), fills a batch of a given composition at a given
context, times its decode-only steps (the engine's StepRecords, median) and prints one JSON line per
composition with measured / predicted. Compositions: ``quality*2+fastest*2`` style, preset names of the
default service.

    .venv/bin/python bench/step_fidelity.py --context 2000 --batches "quality*2,fastest*4,quality*2+fastest*2"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.placement import Placement  # noqa: E402
from policies.tables import read_speed_model  # noqa: E402
from workers.deployment import WorkerSpec, build_engine  # noqa: E402
from workers.engine import Request  # noqa: E402
from workers.sampling import SamplingParams  # noqa: E402


def parse(composition: str, presets: dict[str, Placement]) -> list[Placement]:
    rows = []
    for part in composition.split("+"):
        name, _, count = part.partition("*")
        if name not in presets:
            raise SystemExit(f"step_fidelity: unknown preset {name!r}: use {', '.join(presets)}")
        rows += [presets[name]] * int(count or 1)
    return rows


def main() -> None:
    from bench.live_twin import the_service

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=2000, help="prompt tokens of every row")
    parser.add_argument("--batches", default="quality*1,quality*2,fastest*2,fastest*4,quality*1+fastest*1,"
                                              "quality*2+fastest*2,quality*1+fastest*3,quality*1+balanced*1+fast*1+fastest*1")
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per composition")
    parser.add_argument("--speed-table", help="default: the service's")
    args = parser.parse_args()
    predictor, config, speed_path = the_service(args.speed_table)
    speed = read_speed_model(Path(speed_path))
    presets = {p.name: p.placement for p in predictor.presets}
    worker = config.worker
    engine = build_engine(WorkerSpec(config.model.checkpoint, num_threads=max(1, int(worker.num_cpus)),
                                     cache_budget_bytes=worker.cache_budget_bytes,
                                     max_prefill_tokens=worker.max_prefill_tokens))
    generator = torch.Generator().manual_seed(0)
    vocab = engine.model.config.vocab_size
    for n, composition in enumerate(args.batches.split(",")):
        rows = parse(composition, presets)
        for i, placement in enumerate(rows):
            prompt = torch.randint(3, vocab, (args.context,), generator=generator).tolist()
            engine.add_request(Request(tuple(prompt), placement, SamplingParams(max_tokens=args.steps + 8,
                                                                                  ignore_eos=True),
                                       request_id=f"{n}-{i}"))
        steps = []
        while engine.has_work():
            engine.step()
            record = engine.stats().recent_steps[-1]
            if record.num_prefill_tokens == 0 and record.num_decode_rows == len(rows):
                steps.append(record.seconds * 1000)
        measured = statistics.median(steps[2:]) if len(steps) > 4 else float("nan")
        context = args.context + args.steps // 2
        predicted = speed.step([(p, context) for p in rows]).ms
        print(json.dumps({"batch": composition, "rows": len(rows), "context": context,
                          "measured_ms": round(measured, 3), "predicted_ms": round(predicted, 3),
                          "measured_over_predicted": round(measured / predicted, 3), "steps": len(steps)}),
              flush=True)


if __name__ == "__main__":
    main()
