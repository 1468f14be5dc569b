"""GPU memory sizing for the 15B supernet: weights, cache budget, sequences per preset.

Prints the table in deploy/README.md (a test checks the two agree):

    .venv/bin/python deploy/sizing.py                  # the H100 80GB example
    .venv/bin/python deploy/sizing.py --gpu-gib 139.8  # an H200

Weights are counted on the real model class, built on the meta device (no
memory) with the Super Apriel 15B shapes; cache bytes per sequence come from
the same CacheMemoryModel the engine admits requests by. The presets are
deploy/values-h100.yaml's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
# What CUDA reports as total memory on an H100 80GB SXM (HBM3), in GiB.
H100_GIB = 79.1
# CUDA context, cuBLAS workspaces and allocator slack before any cache (measured
# values vary with the driver; this is a round upper estimate).
CONTEXT_GIB = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=Path, default=ROOT / "deploy" / "values-h100.yaml")
    parser.add_argument("--gpu-gib", type=float, default=H100_GIB, help="GPU memory CUDA reports (GiB)")
    parser.add_argument("--context-gib", type=float, default=CONTEXT_GIB, help="CUDA context and workspaces (GiB)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 16384], help="tokens per sequence")
    args = parser.parse_args(argv)
    print(sizing_table(args.values, args.gpu_gib, args.context_gib, args.contexts))
    return 0


def weight_bytes(dtype_bytes: int = 2) -> tuple[int, dict[str, int]]:
    """Bytes of every parameter of the 15B supernet (all four mixers), and per part."""
    import torch

    from workers.model.config import parse_config, supernet_config_dict
    from workers.model.supernet import SupernetLM
    from workers.profiling import SHAPES

    config = parse_config(supernet_config_dict(**SHAPES["superapriel-15b"]), source="superapriel-15b")
    with torch.device("meta"):
        model = SupernetLM(config)
    parts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        part = "other"
        for mixer in ("attention", "sliding_window", "gdn", "kda"):
            if f".mixers.{mixer}." in name or f".mixer.{mixer}." in name:
                part = mixer
        if ".mlp." in name:
            part = "mlp"
        elif "embed_tokens" in name or name.startswith("lm_head"):
            part = "embeddings and head"
        parts[part] = parts.get(part, 0) + parameter.numel() * dtype_bytes
    return sum(parts.values()), parts


def sizing_table(values: Path, gpu_gib: float, context_gib: float, contexts: list[int]) -> str:
    from policies.placement import Placement
    from workers.model.config import parse_config, supernet_config_dict
    from workers.profiling import SHAPES

    app = yaml.safe_load(values.read_text())["app"]
    fraction = app["worker"]["gpu_memory_fraction"]
    config = parse_config(supernet_config_dict(**SHAPES["superapriel-15b"]), source="superapriel-15b")
    memory = config.memory_model(kv_bytes=2)  # bf16 keys, values and conv history; fp32 recurrent states
    total, parts = weight_bytes()
    free = gpu_gib * GIB - context_gib * GIB - total
    budget = int(free * fraction)

    lines = [
        f"Weights (bf16, all four mixers of all {config.num_layers} layers): **{total / 1e9:.1f} GB** "
        f"({total / GIB:.1f} GiB):",
        "",
        "| part | GB |",
        "|---|---|",
    ]
    for part in ("attention", "sliding_window", "gdn", "kda", "mlp", "embeddings and head", "other"):
        if parts.get(part, 0) >= 5e6:  # norms (a few MB) are left out of the table, not the total
            lines.append(f"| {part} | {parts[part] / 1e9:.2f} |")
    lines += [
        "",
        f"On a GPU reporting {gpu_gib:.1f} GiB, less {context_gib:.1f} GiB for the CUDA context and workspaces, "
        f"{free / GIB:.1f} GiB are free after the weights; `gpu_memory_fraction: {fraction}` gives the caches "
        f"**{budget / GIB:.1f} GiB** (the rest is activation headroom).",
        "",
        "Cache per sequence and layer: attention 2 x 8 KV heads x 128 x 2 bytes = "
        f"{memory.layers[0][_mixer('attention')].token_bytes(2)} bytes per token; sliding window the same, "
        "capped at 4096 tokens; GDN 32 x 128 x 128 x 4 bytes of state + its conv history "
        f"({memory.layers[0][_mixer('gdn')].cache_bytes(1, 2, 4)} bytes); KDA likewise "
        f"({memory.layers[0][_mixer('kda')].cache_bytes(1, 2, 4)} bytes). The engine's pool holds them in "
        f"blocks of {memory.block_bytes} bytes: an attention page of {memory.page_tokens} tokens, or one "
        f"GDN/KDA state (the ring of a sliding window takes {memory.layer_blocks(0, _mixer('sliding_window'), 4096)} "
        f"pages); one block of the budget is the pool's null block.",
        "",
        "| preset | A/S/K/G layers | " + " | ".join(f"cache per sequence @{c // 1024}k | sequences @{c // 1024}k"
                                                   for c in contexts) + " |",
        "|---|---|" + "---|---|" * len(contexts),
    ]
    for preset in app["presets"]:
        placement = Placement.parse(preset["placement"], num_layers=config.num_layers)
        counts = placement.counts()
        mix = "/".join(str(counts[_mixer(m)]) for m in ("attention", "sliding_window", "kda", "gdn"))
        cells = []
        for context in contexts:
            per_sequence = memory.sequence_bytes(placement, context)
            cells += [_size(per_sequence), str(memory.usable_bytes(budget) // per_sequence)]
        lines.append(f"| {preset['name']} | {mix} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mixer(name: str):
    from policies.placement import Mixer

    return Mixer(name)


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


if __name__ == "__main__":
    raise SystemExit(main())
