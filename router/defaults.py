"""The embedded default: the small supernet trained here (docs/model.md), its presets, and a speed table of this CPU.

The checkpoint ships in the package (``router/assets/stdlib-supernet-8l``)
with the tables made from it: held-out quality of sampled placements
(``quality.json``), the fitted surrogate (``surrogate.json``), and presets
spread along the exact frontier (``presets.json``, costed with a CPU speed
table). What cannot ship is this machine's own speed: the router's
predictions need it, so the first run profiles the checkpoint here (about a
minute) and keeps the table under SUPERNET_ROUTER_HOME. A kept table is
taken again when it no longer describes this machine and this code (another
CPU, checkpoint or profiler; unreadable), or when other processes kept the
CPUs busy while it was taken: a busy machine's times are slower than its own,
and every budget would look unmeetable. Of two busy profiles the quieter one
is kept. It is timed with a default worker's torch threads (one per CPU the
replica reserves), since those are the steps it predicts.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from policies.errors import ConfigError
from router.config import DEFAULT_HOME, AppConfig, PresetSettings, WorkerSettings

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent / "assets" / "stdlib-supernet-8l"
# Frontier presets, cheapest first, as users see them; the baseline (all attention) is "quality".
PRESET_NAMES = ("fastest", "fast", "balanced")


def default_checkpoint() -> Path:
    """The shipped checkpoint's folder (what ``supernet-router checkpoint path`` prints)."""
    if not (SHIPPED / "model.safetensors").exists():
        raise ConfigError(f"{SHIPPED}: the embedded checkpoint is missing from this installation "
                          "(reinstall the package, or serve another one with --config)")
    return SHIPPED


def default_config(home: Path = DEFAULT_HOME) -> AppConfig:
    folder = default_checkpoint()
    speed = home / "speed" / f"{folder.name}-cpu.json"
    kept, stale = _kept_profile(folder, speed)
    if stale:
        _profile(folder, speed, stale, kept)
    presets = default_presets(folder / "presets.json")
    return AppConfig(model={"checkpoint": str(folder)}, presets=presets,
                     tables={"speed": str(speed), "acceptance": str(folder / "acceptance.json")})


def default_presets(path: Path) -> list[PresetSettings]:
    """The baseline as "quality" and the frontier presets as balanced / fast / fastest."""
    from policies.tables import PresetsFile, read_table

    table = read_table(path, PresetsFile)
    point = table.operating_point
    where = f"batch {point.batch}, context {point.context}" if point.batch else point.cost_model

    def describe(entry, what: str) -> str:
        return (f"{what}: {entry.placement}, predicted {entry.retention:.1%} of all-attention's per-token likelihood, "
                f"{entry.speedup:.2f}x its decode speed on the CPU table at {where}")

    presets = [PresetSettings(name="quality", placement=table.baseline.placement, quality=1.0,
                              description=describe(table.baseline, "all attention, the reference"))]
    # Only presets faster than the baseline are worth offering beside it.
    cheapest_first = [p for p in table.presets if p.placement != table.baseline.placement and p.speedup > 1]
    if len(cheapest_first) > len(PRESET_NAMES):  # the two ends and the middle
        cheapest_first = [cheapest_first[0], cheapest_first[len(cheapest_first) // 2], cheapest_first[-1]]
    for name, entry in reversed(list(zip(PRESET_NAMES, cheapest_first))):
        presets.append(PresetSettings(name=name, placement=entry.placement, quality=round(entry.retention, 4),
                                      description=describe(entry, entry.name)))
    return presets


def _kept_profile(folder: Path, path: Path):
    """The speed table kept from an earlier run (or None), and why it must be taken again (or None)."""
    from policies.errors import TableMismatch
    from policies.tables import BUSY_CPUS, SpeedFile, read_table
    from workers import profiling

    if not path.exists():
        return None, "first run"
    try:
        table = read_table(path, SpeedFile)
    except (ConfigError, TableMismatch) as error:
        return None, f"the kept table is unreadable ({error})"
    with _worker_threads():
        here = profiling.device_name(profiling.resolve_device("cpu"))
    made, measured = table.fingerprint, table.measurement
    if made.model_sha256 != profiling.checkpoint_sha256(folder):
        return None, "the kept table was made for another build of the checkpoint"
    if made.device != here:
        return None, f"the kept table was measured on {made.device}, this is {here}"
    if made.software != profiling.software() or measured.cache_fill != profiling.CACHE_FILL:
        return None, f"the kept table was made by other software ({made.software})"
    if table.engine_ms is None:
        return None, "the kept table predates the engine's own step time (engine_ms)"
    if measured.decode_timing != profiling.DECODE_TIMING:
        return None, "the kept table timed one layer alone (a step streams every layer's cache through the CPU's)"
    if table.prefill_chunk != WorkerSettings().max_prefill_tokens:
        return None, (f"the kept table timed prefill in chunks of {table.prefill_chunk} tokens, the workers run "
                      f"{WorkerSettings().max_prefill_tokens}")
    if measured.other_cpus is not None and measured.other_cpus > BUSY_CPUS:
        return table, f"other processes kept {measured.other_cpus:.1f} CPUs busy while the kept table was taken"
    return table, None


def _profile(folder: Path, out: Path, why: str, kept=None) -> None:
    """Profile the checkpoint here and write ``out``; keep ``kept`` instead if it was taken under less load."""
    from policies.tables import write_table
    from workers import profiling

    log.warning("profiling the default checkpoint on this CPU (%s; about a minute) -> %s", why, out)
    device = profiling.resolve_device("cpu")
    grid = profiling.DEFAULT_GRIDS["cpu"]
    with _worker_threads():
        target = profiling.load_target(folder, None, device, profiling.resolve_dtype(None, device))
        # Prefill timed in the chunks the workers run: a chunk's cost per token grows with its length.
        table = profiling.profile(target, grid["batches"], grid["contexts"], WorkerSettings().max_prefill_tokens,
                                  progress=False)
    if kept is not None and not _quieter(table, kept):
        log.warning("the CPUs were as busy this time: keeping %s; it is taken again at the next start, "
                    "which should find the machine quieter", out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    write_table(out, table)


def _quieter(new, old) -> bool:
    """Whether ``new`` was profiled beside less of other processes' work than ``old`` (unknown counts as quiet)."""
    return (new.measurement.other_cpus or 0.0) < (old.measurement.other_cpus or 0.0)


@contextmanager
def _worker_threads():
    """Torch threads as a default worker replica runs them (one per CPU it reserves): the table must time the
    steps the workers take, not this process's."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(WorkerSettings().num_cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
