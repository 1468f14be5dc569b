"""Measure a speed table (policies/tables.py ``SpeedFile``) on this device.

Every layer of the supernet has the same shapes, so one decoder layer is timed
and stands for all of them:

- decode: each mixer steps a group of ``batch`` rows whose caches already hold
  ``context`` tokens, for every (batch, context) of the grid;
- prefill: each mixer runs one chunk of ``prefill_chunk`` tokens of one
  sequence whose cache holds ``context`` tokens (ms per token);
- shared: the layer's MLP, both norms and residual adds on ``n`` tokens, and
  the head (embedding lookup, final norm, lm_head) on ``n`` rows;
- engine: whole decode steps of an ``Engine`` (scheduler, step metadata,
  sampling, detokenizing with the checkpoint's tokenizer) of ``batch``
  all-attention rows at the first context, minus what the parts above predict
  for that step: the work a step costs beside the model (never below 0).

Caches are filled cheaply: only their sizes matter for the time, so random
keys, values, states and conv history are written straight into the rows'
pool blocks (no prefill is run); every timed run continues from ``context``
(nothing advances the rows' counters between runs).
Each point is run ``warmup`` times untimed, then ``repeats`` times; the median
is kept (CUDA events on a GPU, ``perf_counter`` on a CPU). Grids are stored as
the running maximum along each axis: a longer context or a bigger batch never
costs less, and on a busy CPU noise would otherwise break that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from policies.errors import ConfigError
from policies.placement import MIXERS, Placement
from policies.tables import BUSY_CPUS, Fingerprint, Measurement, MemoryEntry, SpeedFile, utc_now
from workers.model.batch import CacheRows, ForwardBatch
from workers.model.config import SupernetConfig, parse_config, supernet_config_dict
from workers.model.layers import DepthwiseConv
from workers.model.loader import FP32_PARAMETERS, load_checkpoint, safetensors_files
from workers.model.supernet import SupernetLM

log = logging.getLogger(__name__)

# Super Apriel 15B (shared/design/SUPERNET.md). max_position_embeddings is not
# public; it only bounds nothing here (rotary angles are computed per position).
SHAPES = {
    "superapriel-15b": dict(
        hidden_size=5120, vocab_size=131072, num_layers=48, intermediate_size=14336, heads=32, head_groups=8,
        head_size=128, window_size=4096, gdn_value_heads=32, gdn_key_heads=8, gdn_key_head_dim=128,
        gdn_value_head_dim=128, kda_heads=32, kda_head_dim=128, conv_kernel=4, rotary_theta=1e9,
        max_position_embeddings=32768,
    ),
}
DEFAULT_GRIDS = {  # small on a CPU: the tiny checkpoint profiles in seconds
    "cpu": dict(batches=(1, 2, 4, 8, 16), contexts=(64, 256, 1024, 4096), prefill_chunk=64),
    "cuda": dict(batches=(1, 2, 4, 8, 16, 32, 64), contexts=(1024, 4096, 16384, 32768), prefill_chunk=2048),
}
CACHE_FILL = "random keys/values/states written into the pool blocks of rows at the context"
# How decode and the shared layers are timed (a kept table timed otherwise is taken again).
DECODE_TIMING = ("per layer over a stack of every layer: each mixer followed by its layer's shared part, "
                 "minus the shared parts alone")


class ProfileTarget:
    """The model to time plus what the table's fingerprint says about it; ``tokenizer``: the checkpoint's, so
    that the engine's steps detokenize as when serving (None for a random-weight shape)."""

    def __init__(self, model: SupernetLM, name: str, model_sha256: str, config: SupernetConfig, tokenizer=None):
        self.model, self.name, self.model_sha256, self.config = model, name, model_sha256, config
        self.tokenizer = tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available on this machine")
    if not name.startswith(("cpu", "cuda")):
        raise ConfigError(f"--device {name!r}: expected cpu, cuda or auto")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {name!r}: expected float32, bfloat16 or float16")
    return getattr(torch, name)


def checkpoint_sha256(directory: Path) -> str:
    """sha256 of config.json plus weight file names and sizes (hashing tens of GB of weights would take minutes)."""
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for file in safetensors_files(directory):
        digest.update(f"{file.name}:{file.stat().st_size if file.exists() else -1}".encode())
    return digest.hexdigest()


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)"


def software() -> str:
    try:
        ours = metadata.version("supernet-router")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    return f"supernet-router {ours}, torch {torch.__version__}"


def load_target(checkpoint: Path | None, shape: str | None, device: torch.device, dtype: torch.dtype) -> ProfileTarget:
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, device=device, dtype=dtype)
        first = model.config.layers[0].mixers
        for i, layer in enumerate(model.config.layers):
            if layer.mixers != first:
                raise ConfigError(f"{checkpoint}: layer {i} has other mixer shapes than layer 0; the profiler "
                                  "times one layer for all and needs every layer alike")
        from workers.model.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(checkpoint) if (Path(checkpoint) / "tokenizer.json").exists() else None
        return ProfileTarget(model, Path(checkpoint).name, checkpoint_sha256(Path(checkpoint)), model.config,
                             tokenizer)
    if shape not in SHAPES:
        raise ConfigError(f"--shape {shape!r} is unknown: known are {', '.join(SHAPES)}")
    if device.type != "cuda":
        raise ConfigError(f"--shape {shape} builds a random-weight model on a GPU, and this run has no CUDA "
                          "device: profile a --checkpoint on the CPU instead")
    raw = supernet_config_dict(**SHAPES[shape])
    # One layer stands for all (see the module docstring): 48 random layers would hold ~49 GB never timed.
    with torch.device(device):
        model = SupernetLM(parse_config(supernet_config_dict(**{**SHAPES[shape], "num_layers": 1})))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DepthwiseConv):  # the only weight left uninitialised by its constructor
                module.weight.uniform_(-0.5, 0.5)
        model.to(dtype)
        for name, parameter in model.named_parameters():
            if name.endswith(FP32_PARAMETERS):
                parameter.data = parameter.data.float()
    model.reset_buffers()
    from workers.model.kernels import select_kernels

    model.use_kernels(select_kernels(model.device))
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    return ProfileTarget(model.eval(), f"shape:{shape}", digest, parse_config(raw))


def cpu_busy_seconds(stat: str) -> float:
    """Seconds all CPUs have been busy since boot, from the text of /proc/stat (its first, aggregate line).
    Steal counts as busy: on a VM it is time other guests took from us."""
    fields = stat.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        raise ValueError(f"not a /proc/stat aggregate line: {stat[:60]!r}")
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Mean CPUs that other processes kept busy between ``__init__`` and ``cpus()``: the whole machine's busy
    time (/proc/stat) minus this process's own. A profile taken beside other work records a slower machine
    than this one; the table keeps the figure so that what loads it can tell. None where /proc/stat is absent."""

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            busy = cpu_busy_seconds(Path("/proc/stat").read_text())
        except (OSError, ValueError):
            return None
        return time.monotonic(), busy, time.process_time()

    def cpus(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        wall, busy, own = (b - a for a, b in zip(self._start, end))
        return round(max(0.0, (busy - own) / wall), 3)


class Timer:
    """Median ms of ``repeats`` timed runs after ``warmup`` untimed ones; ``reset`` runs untimed before each."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, run: Callable[[], object], reset: Callable[[], None] = lambda: None) -> float:
        for _ in range(self.warmup):
            reset()
            run()
        times = []
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(self.repeats):
            reset()
            if cuda:
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                run()
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)

    def measured(self, run: Callable[[], float]) -> float:
        """Median of what ``repeats`` runs of ``run`` return (it times itself), after ``warmup`` untimed ones."""
        for _ in range(self.warmup):
            run()
        return statistics.median(run() for _ in range(self.repeats))


def _filled_batch(model: SupernetLM, mixer, rows: int, tokens: int, context: int, seed: int) -> ForwardBatch:
    """``rows`` rows of ``tokens`` new tokens after ``context`` cached ones under the uniform ``mixer``
    placement, each row's cache in a pool as the engine keeps it (random contents)."""
    from workers.generate import request_pool

    placement = Placement.uniform(mixer, model.config.num_layers)
    pool, blocks = request_pool(model, [(placement, context + tokens)] * rows)
    pool.fill_random(torch.Generator(device=model.device).manual_seed(seed))
    cache = CacheRows(pool.arena, pool.tables, [b.row for b in blocks])
    return ForwardBatch.build([[0] * tokens] * rows, [placement] * rows, [context] * rows, cache, model.device)


def _mixer_run(model: SupernetLM, mixer, rows: int, tokens: int, context: int, seed: int = 0):
    """A closure running layer 0's ``mixer`` on ``rows`` rows of ``tokens`` new tokens after ``context`` cached
    ones (``_filled_batch``)."""
    group = _filled_batch(model, mixer, rows, tokens, context, seed).groups(0)[mixer]
    module = model.blocks[0].by_kind[mixer]
    x = torch.randn(rows * tokens, model.config.hidden_size, dtype=model.dtype, device=model.device)
    return lambda: module(x, group)


def _stack_run(model: SupernetLM, mixer, rows: int, context: int, seed: int = 0):
    """A closure decoding one token of ``rows`` rows through every layer, each layer's ``mixer`` (on its rows'
    caches in one pool at ``context``) followed by that layer's shared part, as a step does.

    Timed through the whole stack, not one layer again and again: one layer's cache and weights stay in the
    CPU's caches between repeats, a step's do not (every layer's keys and values stream through and push the
    weights out). On this machine one layer timed alone missed a third of a step at 2k context and 4 rows."""
    layers = len(model.blocks)  # the built depth (the 15B shape is built one layer deep)
    batch = _filled_batch(model, mixer, rows, 1, context, seed)
    steps = [(model.blocks[layer].by_kind[mixer], batch.groups(layer)[mixer], model.blocks[layer])
             for layer in range(layers)]
    x = torch.randn(rows, model.config.hidden_size, dtype=model.dtype, device=model.device)
    return lambda: [_shared_part(block, module(x, group)) for module, group, block in steps]


def _shared_part(block, h: torch.Tensor) -> torch.Tensor:
    """What a layer runs beside its mixer: the norms and the MLP (the mixer's own time is in decode/prefill)."""
    mixed = h + block.input_layernorm(h)
    return mixed + block.mlp(block.post_attention_layernorm(mixed))


def _shared_stack(model: SupernetLM, tokens: int):
    """Every layer's shared part on ``tokens`` tokens, one layer after another."""
    h = torch.randn(tokens, model.config.hidden_size, dtype=model.dtype, device=model.device)
    return lambda: [_shared_part(block, h) for block in model.blocks]


def _beyond(run: Callable[[], object], base: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """A run that times ``base`` and then ``run`` back to back and returns the difference in ms, for
    ``Timer.measured`` (synchronised with the GPU where there is one)."""
    def difference() -> float:
        times = []
        for step in (base, run):
            _synchronize(device)
            begin = time.perf_counter()
            step()
            _synchronize(device)
            times.append(time.perf_counter() - begin)
        return (times[1] - times[0]) * 1e3

    return difference


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine_steps(target: ProfileTarget, batches: Sequence[int], context: int, warmup: int, repeats: int,
                  timed: Callable[[Callable[[], float]], float]) -> list[float]:
    """Median ms of a whole ``Engine.step()`` decoding ``batch`` all-attention rows at ``context``, per batch."""
    from workers.engine import Engine, EngineConfig, Request
    from workers.sampling import SamplingParams

    model = target.model
    placement = Placement.uniform(MIXERS[0], model.config.num_layers)
    steps = warmup + repeats
    element = torch.empty((), dtype=model.dtype).element_size()
    per_row = model.config.memory_model(kv_bytes=element).sequence_bytes(placement, context + steps + 1)
    largest = max(batches)
    engine = Engine(model, EngineConfig(cache_budget_bytes=2 * largest * per_row + 2**20, max_running=largest,
                                        max_prefill_tokens=largest * context), target.tokenizer)
    generator = torch.Generator().manual_seed(0)
    out = []
    for batch in batches:
        for _ in range(batch):
            prompt = torch.randint(0, model.config.vocab_size, (context,), generator=generator).tolist()
            engine.add_request(Request(tuple(prompt), placement, SamplingParams(max_tokens=steps + 2,
                                                                                ignore_eos=True)))
        engine.step()  # every prompt in one prefill step (max_prefill_tokens): the rest are decode steps

        def one_step() -> float:
            begin = time.perf_counter()
            engine.step()  # sampling reads the tokens back: the step has ended on any device
            return (time.perf_counter() - begin) * 1e3

        out.append(timed(lambda: statistics.median(one_step() for _ in range(steps))))
        while engine.has_work():
            engine.step()
    return out


@torch.inference_mode()
def profile(target: ProfileTarget, batches: Sequence[int], contexts: Sequence[int], prefill_chunk: int,
            warmup: int = 2, repeats: int = 5, device_label: str | None = None, progress: bool | None = None) -> SpeedFile:
    model, config = target.model, target.config
    block = model.blocks[0]
    mixers = [m for m in MIXERS if m in block.by_kind]
    prefill_contexts = sorted({0, *contexts})
    tokens = sorted({1, *batches, prefill_chunk})
    timer = Timer(model.device, warmup, repeats)
    total = len(mixers) * (len(batches) * len(contexts) + len(prefill_contexts)) + 2 * len(tokens) + len(batches)
    bar = tqdm(total=total, desc=f"profile {target.name}", unit="point", disable=None if progress is None else not progress)
    hidden = config.hidden_size
    others = OtherLoad()

    def timed(run, reset=lambda: None) -> float:
        value = timer(run, reset)
        bar.update()
        return value

    def measured(run: Callable[[], float]) -> float:
        value = timer.measured(run)
        bar.update()
        return value

    layers = len(model.blocks)  # the stacks' depth: per-layer times are their time over it
    shared, head = [], []
    for n in tokens:  # per layer, timed over the stack (``_stack_run``)
        h = torch.randn(n, hidden, dtype=model.dtype, device=model.device)
        ids = torch.randint(0, config.vocab_size, (n,), device=model.device)

        def logits(h=h, ids=ids):
            model.model.embed_tokens(ids)
            return model.model.norm(h) @ model.head_weight.t()

        shared.append(timed(_shared_stack(model, n)) / layers)
        head.append(timed(logits))
    decode, prefill = {}, {}
    for mixer in mixers:  # decode: a layer's mixer and what it does to the rest of the step (the stack's time
        # beyond its shared parts, the two timed in turns so that a drifting CPU moves both alike); prefill:
        # one layer's chunk, whose compute outweighs what caches change
        decode[mixer.value] = [[max(measured(_beyond(_stack_run(model, mixer, b, c), _shared_stack(model, b),
                                                     model.device)) / layers, 0.0)
                                for c in contexts] for b in batches]
        prefill[mixer.value] = [timed(_mixer_run(model, mixer, 1, prefill_chunk, c)) / prefill_chunk
                                for c in prefill_contexts]
    steps = None
    if MIXERS[0] in block.by_kind:  # the engine's steps run all-attention rows: their parts were just timed
        def counted(run: Callable[[], float]) -> float:
            bar.update()
            return run()

        steps = _engine_steps(target, batches, contexts[0], warmup, repeats, counted)
    bar.close()
    other_cpus = others.cpus() if model.device.type == "cpu" else None  # a GPU's kernels do not share the CPUs
    if other_cpus is not None and other_cpus > BUSY_CPUS:
        log.warning("other processes kept %.1f CPUs busy while profiling: these times are slower than this "
                    "machine's own; profile again on a quiet machine", other_cpus)

    def monotone(values, axes: int) -> list:
        grid = np.maximum.accumulate(np.maximum.accumulate(np.asarray(values), axis=0), axis=axes - 1)
        return [float(f"{v:.6g}") for v in grid] if axes == 1 else [[float(f"{v:.6g}") for v in r] for r in grid]

    decode = {m: monotone(g, 2) for m, g in decode.items()}
    shared, head = monotone(shared, 1), monotone(head, 1)
    engine = None
    if steps is not None:  # a whole step minus what the stored parts predict for it
        engine = monotone([max(0.0, measured - (config.num_layers * (shared[tokens.index(batch)] + decode[
            MIXERS[0].value][i][0]) + head[tokens.index(batch)])) for i, (batch, measured) in enumerate(
            zip(batches, steps))], 1)
    element = torch.empty((), dtype=model.dtype).element_size()
    fingerprint = Fingerprint(
        device=device_label or device_name(model.device), model=target.name, model_sha256=target.model_sha256,
        num_layers=config.num_layers, dtype=str(model.dtype).removeprefix("torch."), created=utc_now(),
        software=software(),
    )
    return SpeedFile(
        format="supernet-router/speed", version=1, fingerprint=fingerprint,
        batches=list(batches), contexts=list(contexts),
        decode_ms=decode,
        prefill_chunk=prefill_chunk, prefill_contexts=prefill_contexts,
        prefill_ms_per_token={m: monotone(g, 1) for m, g in prefill.items()},
        tokens=tokens, shared_ms=shared, head_ms=head, engine_ms=engine,
        memory=MemoryEntry.model_validate(config.memory_model(kv_bytes=element).to_dict()),
        measurement=Measurement(warmup=warmup, repeats=repeats, cache_fill=CACHE_FILL, monotone=True,
                                other_cpus=other_cpus, decode_timing=DECODE_TIMING),
    )
