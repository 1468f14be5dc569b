"""Decode speed of the engine per placement, against its memory-bandwidth floor (``supernet-router bench engine``).

A decode step is timed as the engine runs it: ``ModelRunner.run`` over a decode
``StepBatch`` (``ForwardBatch.build``, the forward over every row's pool blocks,
greedy argmax). Rows' blocks are filled with random values at ``context`` tokens
instead of prefilling 32k-token prompts; nothing advances a row's counter, so
every step decodes at that context.
The floor is the bytes a step must read over a measured copy bandwidth. Method,
formulas and how published presets become placements: docs/engine.md, "Speed on
a GPU: how to measure".
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from policies.errors import ConfigError
from policies.memory import AttentionShape, CacheMemoryModel
from policies.placement import Mixer, Placement
from policies.published import PublishedPreset
from workers.engine.pool import CachePool
from workers.engine.request import Request
from workers.engine.runner import ModelRunner
from workers.engine.scheduler import StepBatch
from workers.engine.sequence import Sequence as EngineSequence
from workers.engine.sequence import Status
from workers.model.config import SupernetConfig, parse_config, supernet_config_dict
from workers.model.loader import FP32_PARAMETERS
from workers.model.supernet import SupernetLM
from workers.profiling import SHAPES, ProfileTarget
from workers.sampling import SamplingParams

log = logging.getLogger(__name__)

FORMAT, VERSION = "supernet-router/bench-engine", 1
DEFAULT_CONTEXTS = {"cpu": (256, 1024), "cuda": (16384, 32768)}
PUBLISHED_CONTEXTS = {16384: "speedup_16k", 32768: "speedup_32k"}
COPY_BYTES = {"cpu": 64 << 20, "cuda": 2 << 30}


@dataclass(frozen=True, slots=True)
class NamedPlacement:
    name: str  # as given: "all-attention", a published preset's name, or the code itself
    placement: Placement
    published: PublishedPreset | None  # its published speed-ups apply (48 layers, counts exact)


def check_shape(shape: str, device: torch.device) -> None:
    if shape not in SHAPES:
        raise ConfigError(f"--shape {shape!r} is unknown: known are {', '.join(SHAPES)}")
    if device.type != "cuda":
        raise ConfigError(f"--shape {shape} builds a ~50 GB random-weight model on a GPU and this run has no CUDA "
                          "device: bench a --checkpoint on the CPU instead")


def random_model(config: SupernetConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> SupernetLM:
    """A model of ``config`` with random weights allocated straight on ``device`` in ``dtype``.

    Built on the meta device, cast, then materialised with ``to_empty``: building in fp32
    first would need ~100 GB for the 15B supernet. Gate parameters stay fp32 (as the loader).
    """
    with torch.device("meta"):
        model = SupernetLM(config)
    model.to(dtype)
    for name, parameter in model.named_parameters():
        if name.endswith(FP32_PARAMETERS):
            parameter.data = parameter.data.float()
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("A_log"):
                parameter.uniform_(0.0, 2.7, generator=generator)  # decay rates exp(A_log) in 1..15
            elif name.endswith(("dt_bias", "norm.weight")):
                parameter.fill_(1.0)
            elif parameter.dim() == 3:  # depthwise conv [channels, 1, kernel]
                parameter.uniform_(-0.5, 0.5, generator=generator)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.reset_buffers()
    return model.eval()


def build_random_model(shape: str, device: torch.device, dtype: torch.dtype, kernels: str = "auto",
                       seed: int = 0) -> ProfileTarget:
    """The whole supernet of a named shape (all layers, all four mixers) with random weights on a GPU."""
    check_shape(shape, device)
    raw = supernet_config_dict(**SHAPES[shape])
    model = random_model(parse_config(raw), device, dtype, seed)
    if kernels != "torch":
        from workers.model.kernels import select_kernels

        model.use_kernels(select_kernels(model.device, required=kernels == "fla"))
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    return ProfileTarget(model, f"shape:{shape}", digest, model.config)


def kernels_in_use(model: SupernetLM) -> str:
    """The kernel set the mixers run ("numba", "triton+fla", "triton"), or "torch" for the plain-torch path."""
    for module in model.modules():
        kernels = getattr(module, "kernels", None)
        if kernels is not None:
            return kernels.name
    return "torch"


def time_ms(run: Callable[[], object], device: torch.device, warmup: int, repeats: int,
            reset: Callable[[], None] = lambda: None) -> list[float]:
    """Wall milliseconds of ``repeats`` runs after ``warmup`` untimed ones, the device synchronized around each.

    ``reset`` runs untimed before each. On CUDA the synchronize makes wall time the device's time
    plus any launch overhead the device waits for, which is what a serving step costs.
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for i in range(warmup + repeats):
        reset()
        sync()
        begin = time.perf_counter()
        run()
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - begin) * 1e3)
    return times


def measure_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, reads and writes counted (median of ``repeats``)."""
    nbytes = nbytes or COPY_BYTES[device.type]
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = statistics.median(time_ms(lambda: target.copy_(source), device, warmup=2, repeats=repeats))
    del source, target
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (ms / 1e3)


def cache_budget(device: torch.device, fraction: float) -> int:
    """``fraction`` of the CUDA memory free now (after the weights); the rest is left for activations."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * fraction)


def auto_batch(memory: CacheMemoryModel, placement: Placement, context: int, budget_bytes: int, max_batch: int) -> int:
    """Rows that fit a pool built on the budget: each holds ``context`` tokens and decodes one more, so its
    cache is sized for context + 1."""
    return min(max_batch, memory.max_sequences(placement, context + 1, memory.usable_bytes(budget_bytes)))


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class StepFloor:
    """Bytes a decode step must read: active weights (from the model's parameters) plus each row's cache."""

    def __init__(self, model: SupernetLM, memory: CacheMemoryModel):
        size = parameter_bytes
        self.memory = memory
        self.mixers = [{m: size(module) for m, module in block.by_kind.items()} for block in model.blocks]
        self.shared = sum(size(b.mlp) + size(b.input_layernorm) + size(b.post_attention_layernorm)
                          for b in model.blocks)
        head = model.head_weight
        self.head = head.numel() * head.element_size() + size(model.model.norm)
        self.embedding_row = model.config.hidden_size * model.model.embed_tokens.weight.element_size()

    def weight_bytes(self, placement: Placement, batch: int) -> int:
        mixers = sum(layer[m] for layer, m in zip(self.mixers, placement))
        return mixers + self.shared + self.head + batch * self.embedding_row

    def row_cache_bytes(self, placement: Placement, context: int) -> int:
        total = 0
        for layer, m in zip(self.memory.layers, placement):
            shape = layer[m]
            once = shape.cache_bytes(context, self.memory.kv_bytes, self.memory.state_bytes)
            total += once if isinstance(shape, AttentionShape) else 2 * once  # states: read and written
        return total

    def __call__(self, placement: Placement, context: int, batch: int) -> int:
        return self.weight_bytes(placement, batch) + batch * self.row_cache_bytes(placement, context)


def prefilled_rows(model: SupernetLM, memory: CacheMemoryModel, placement: Placement, context: int, batch: int,
                   seed: int) -> tuple[StepBatch, CachePool]:
    """A decode StepBatch of ``batch`` rows whose pool blocks hold ``context`` random tokens, and its pool."""
    capacity = context + 1
    need = batch * memory.sequence_blocks(placement, capacity)
    pool = CachePool(memory, (need + 1) * memory.block_bytes, batch, capacity, model.dtype, model.device)
    tokens = random.Random(seed)
    step = StepBatch()
    for i in range(batch):
        token = tokens.randrange(model.config.vocab_size)
        request = Request((token,), placement, SamplingParams(max_tokens=2, ignore_eos=True), request_id=f"bench-{i}")
        row = EngineSequence(request, i, memory.sequence_bytes(placement, capacity), None)
        row.status, row.num_computed, row.output_ids = Status.RUNNING, context, [token]  # a sequence at `context`
        row.blocks = pool.allocate(placement, capacity)
        step.add(row, [token], True)
    pool.fill_random(torch.Generator(device=model.device).manual_seed(seed))
    return step, pool


@torch.inference_mode()
def bench_engine(target: ProfileTarget, placements: Sequence[NamedPlacement], contexts: Sequence[int],
                 batches: Sequence[int] | None, *, budget_bytes: int | None, bandwidth: float, max_batch: int = 256,
                 warmup: int = 2, steps: int = 10, seed: int = 0, progress: bool | None = None,
                 decode_graphs: str = "auto") -> list[dict]:
    """One entry per (placement, context, batch); ``batches`` None: as many rows as fit (``auto_batch``).
    ``decode_graphs``: as ``EngineConfig.decode_graphs`` (auto: the step from a CUDA graph on CUDA, captured
    during the warm-up steps)."""
    model = target.model
    memory = model.config.memory_model(kv_bytes=model.dtype.itemsize)
    floor = StepFloor(model, memory)
    points = [(named, c, b) for c in contexts for named in placements for b in (batches or [None])]
    measured: dict[tuple[str, int, int], list[float]] = {}  # presets with equal counts are timed once
    entries = []
    for named, context, given in tqdm(points, desc="bench engine", unit="point",
                                      disable=None if progress is None else not progress):
        placement, key = named.placement, None
        per_row = memory.sequence_bytes(placement, context + 1)
        batch = auto_batch(memory, placement, context, budget_bytes, max_batch) if given is None else given
        entry = {"placement": named.name, "code": placement.code,
                 "counts": {m.value: n for m, n in placement.counts().items()}, "context": context,
                 "batch_mode": "auto" if given is None else "given", "batch": batch, "sequence_bytes": per_row,
                 "cache_bytes": batch * per_row, "active_weight_bytes": floor.weight_bytes(placement, batch),
                 "floor_bytes": floor(placement, context, batch), "skipped": None}
        entry["floor_ms"] = entry["floor_bytes"] / bandwidth * 1e3
        if batch < 1 or budget_bytes is not None and batch * per_row > memory.usable_bytes(budget_bytes):
            rows = max(batch, 1)
            entry["skipped"] = f"{rows} row(s) need {rows * per_row:,} bytes of cache, the budget is {budget_bytes:,}"
        else:
            key = (placement.code, context, batch)
            try:
                if key not in measured:
                    step, pool = prefilled_rows(model, memory, placement, context, batch, seed)
                    runner = ModelRunner(model, pool, decode_graphs)
                    measured[key] = time_ms(lambda: runner.run(step), model.device, warmup, steps)
                    del step, pool, runner
            except torch.OutOfMemoryError:
                entry["skipped"] = f"out of device memory at {batch} rows"
                log.warning("%s at context %d: out of memory at %d rows", named.name, context, batch)
            finally:
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
        entry.update(step_ms=None, step_ms_p90=None, tokens_per_s=None, x_floor=None)
        if times := measured.get(key):
            median = statistics.median(times)
            p90 = statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) > 1 else median
            entry.update(step_ms=median, step_ms_p90=p90, tokens_per_s=batch / (median / 1e3),
                         x_floor=median / entry["floor_ms"])
        entries.append(entry)
    add_speedups(entries, placements)
    return entries


def add_speedups(entries: list[dict], placements: Sequence[NamedPlacement]) -> None:
    """Decode tokens/s over all-attention's at the same context and batch mode (and size, when given)."""
    def point(e: dict) -> tuple:
        return e["context"], e["batch_mode"], e["batch"] if e["batch_mode"] == "given" else None

    published = {p.name: p.published for p in placements}
    baseline = {}
    for e in entries:
        if set(e["code"]) == {Mixer.ATTENTION.letter} and e.get("tokens_per_s"):
            baseline.setdefault(point(e), e)
    for e in entries:
        base = baseline.get(point(e))
        e["speedup"] = e["tokens_per_s"] / base["tokens_per_s"] if base and e.get("tokens_per_s") else None
        preset = published.get(e["placement"])
        e["published_speedup"] = getattr(preset, PUBLISHED_CONTEXTS[e["context"]]) \
            if preset is not None and e["context"] in PUBLISHED_CONTEXTS else None
