"""Aten ops and decode tokens/s of one Engine.step() on the default checkpoint, optionally beside another commit.

For each mix (all-attention, all-GDN, four uniform placements round-robin) and
batch size B, B requests of ``--prompt-tokens`` seeded random tokens are
submitted and stepped until every row decodes; then one ``Engine.step()`` is
run under a ``TorchDispatchMode`` that counts every aten op it dispatches, and
``--steps`` more are timed (the engine's own StepRecords: scheduling, forward,
sampling). Only the engine's public API is used, so ``--against REV`` runs the
same measurement in a git worktree of REV, alternating the two trees
``--repeats`` times in fresh processes (the best median step of each is kept:
this machine's speed drifts), and reports the ratio.

    taskset -c 0 .venv/bin/python bench/decode_ops.py --against 7299b5a
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIXES = {"all-attention": ["AAAAAAAA"], "all-gdn": ["GGGGGGGG"],
         "four-placements": ["AAAAAAAA", "SSSSSSSS", "GGGGGGGG", "KKKKKKKK"]}


def measure(batches: list[int], prompt_tokens: int, steps: int, seed: int, kernels: str, device: str = "cpu") -> dict:
    """Run in the tree on sys.path: {mix: {"ops": [...], "tokens_per_s": [...]}} per batch size."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from router.defaults import default_checkpoint
    from workers.engine import Engine, EngineConfig, Request
    from workers.model.loader import load_checkpoint
    from workers.sampling import SamplingParams

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    torch.set_num_threads(1)
    # The service's dtypes (WorkerSpec dtype "auto"): fp32 on a CPU, bf16 on CUDA.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_checkpoint(default_checkpoint(), device=device, dtype=dtype, kernels=kernels)
    memory = model.config.memory_model(kv_bytes=model.dtype.itemsize)
    max_tokens = prompt_tokens + steps + 8  # never finishes inside the measurement
    out = {}
    for mix, codes in MIXES.items():
        ops, speed = [], []
        for batch in batches:
            generator = torch.Generator().manual_seed(seed)
            placements = [model.config.placement(codes[i % len(codes)]) for i in range(batch)]
            need = sum(memory.sequence_bytes(p, prompt_tokens + max_tokens) for p in placements)
            config = EngineConfig(cache_budget_bytes=need + (4 << 20), max_prefill_tokens=prompt_tokens * batch,
                                  max_running=batch, step_history=steps + 4)
            engine = Engine(model, config)
            for placement in placements:
                prompt = torch.randint(4, model.config.vocab_size, (prompt_tokens,), generator=generator).tolist()
                engine.add_request(Request(prompt, placement, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
            while not engine.stats().running or any(s.prefill_tokens_left for s in engine.stats().running):
                engine.step()
            engine.step()  # the first all-decode step (lazy allocations, caches warm)
            with CountOps() as counter:
                engine.step()
            for _ in range(steps):
                engine.step()
            timed = [s.seconds for s in engine.stats().recent_steps[-steps:]]
            assert all(s.num_rows == s.num_decode_rows == batch for s in engine.stats().recent_steps[-steps:])
            ops.append(counter.count)
            speed.append(batch / statistics.median(timed))
        out[mix] = {"ops": ops, "tokens_per_s": speed}
    return out


def run_tree(tree: Path, args, kernels: str) -> dict:
    """One measurement in a fresh process importing ``tree``'s code (checked: not this checkout's)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "bench" / "decode_ops.py"), "--measure", "--device", args.device,
               "--batches", args.batches,
               "--prompt-tokens", str(args.prompt_tokens), "--steps", str(args.steps), "--seed", str(args.seed),
               "--kernels", kernels]
    result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"decode_ops: the measurement in {tree} failed:\n{result.stderr[-3000:]}")
    line = json.loads(result.stdout.strip().splitlines()[-1])
    if Path(line["imported_from"]).resolve() != tree.resolve():
        sys.exit(f"decode_ops: {tree}'s run imported workers from {line['imported_from']}")
    return line["results"]


def best(runs: list[dict]) -> dict:
    return {mix: {"ops": runs[0][mix]["ops"],
                  "tokens_per_s": [round(max(r[mix]["tokens_per_s"][i] for r in runs), 1)
                                   for i in range(len(runs[0][mix]["ops"]))]} for mix in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per point")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per tree; the fastest is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--against", metavar="REV", help="also measure this commit (a git worktree), alternating")
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch"],
                        help="this tree's decode path: auto (the numba kernels on a CPU, what serving runs) or torch "
                             "(the plain-torch reference path); a baseline runs its own default")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the Triton/fla step in bf16 (ops are then kernel launches plus views)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.measure:
        import workers

        results = measure(batches, args.prompt_tokens, args.steps, args.seed, args.kernels, args.device)
        print(json.dumps({"imported_from": str(Path(workers.__file__).parents[1]), "results": results}))
        return
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"this": ROOT}
        if args.against:
            trees["baseline"] = Path(scratch) / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(trees["baseline"]), args.against], cwd=ROOT,
                           check=True, capture_output=True)
        try:
            runs = {name: [] for name in trees}
            for _ in range(args.repeats):
                for name, tree in trees.items():
                    runs[name].append(run_tree(tree, args, args.kernels if name == "this" else "auto"))
        finally:
            if args.against:
                subprocess.run(["git", "worktree", "remove", "--force", str(trees["baseline"])], cwd=ROOT)
    from workers.profiling import cpu_name

    if args.device == "cuda":
        import torch

        device = f"cuda: {torch.cuda.get_device_name()}"
    else:
        device = f"cpu: {cpu_name()}"
    dtype = "bf16" if args.device == "cuda" else "fp32"
    line = {"bench": "decode_ops", "device": device,
            "params": {"checkpoint": f"default (stdlib-supernet-8l, {dtype})", "batches": batches,
                       "prompt_tokens": args.prompt_tokens, "steps": args.steps, "repeats": args.repeats,
                       "threads": 1, "against": args.against, "kernels": args.kernels, "mixes": MIXES}}
    results = {name: best(r) for name, r in runs.items()}
    for mix, this in results["this"].items():
        line[f"{mix}_ops"] = this["ops"]
        line[f"{mix}_tokens_per_s"] = this["tokens_per_s"]
        if "baseline" in results:
            base = results["baseline"][mix]
            line[f"{mix}_baseline_ops"] = base["ops"]
            line[f"{mix}_baseline_tokens_per_s"] = base["tokens_per_s"]
            line[f"{mix}_speedup"] = [round(a / b, 2) for a, b in zip(this["tokens_per_s"], base["tokens_per_s"])]
    print(json.dumps(line))


if __name__ == "__main__":
    main()
