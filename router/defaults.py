"""The embedded default: the small supernet trained here (docs/model.md), its presets, and a speed table of this CPU.

The checkpoint ships in the package (``router/assets/stdlib-supernet-8l``)
with the tables made from it: held-out quality of sampled placements
(``quality.json``), the fitted surrogate (``surrogate.json``), and presets
spread along the exact frontier (``presets.json``, costed with a CPU speed
table). What cannot ship is this machine's own speed: the router's
predictions need it, so the first run profiles the checkpoint here (about a
minute) and keeps the table under SUPERNET_ROUTER_HOME.
"""

from __future__ import annotations

import logging
from pathlib import Path

from policies.errors import ConfigError
from router.config import DEFAULT_HOME, AppConfig, PresetSettings

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
    if not speed.exists():
        _profile(folder, speed)
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


def _profile(folder: Path, out: Path) -> None:
    from policies.tables import write_table
    from workers import profiling

    log.warning("profiling the default checkpoint on this CPU (first run, about a minute) -> %s", out)
    device = profiling.resolve_device("cpu")
    grid = profiling.DEFAULT_GRIDS["cpu"]
    target = profiling.load_target(folder, None, device, profiling.resolve_dtype(None, device))
    table = profiling.profile(target, grid["batches"], grid["contexts"], grid["prefill_chunk"], progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_table(out, table)
