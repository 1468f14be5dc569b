"""The embedded default: the small checkpoint with a speed table and preset qualities measured on this machine.

Made on first use under SUPERNET_ROUTER_HOME (seconds on a CPU) and reused after:
the checkpoint (``checkpoint tiny``), a CPU speed table (``profile``), and each
preset's quality retention against all-attention, from the mean log-likelihood
of held-out Python standard library text (``evaluate``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from router.config import DEFAULT_HOME, AppConfig, PresetSettings

log = logging.getLogger(__name__)

DEFAULT_PRESETS = [  # name, placement, what it is for
    ("quality", "AAAAAA", "all attention: the reference quality"),
    ("balanced", "ASASGK", "attention and sliding window first"),
    ("fast", "SGKGKG", "mostly linear-time mixers"),
    ("fastest", "GGGGGG", "all Gated DeltaNet: constant memory per sequence"),
]
TOKENIZER_TEXT_BYTES = 3_000_000  # the tiny tokenizer trains on this prefix of the stdlib text
HELD_OUT_BYTES = 200_000


def default_config(home: Path = DEFAULT_HOME) -> AppConfig:
    folder = home / "checkpoints" / "tiny-6"
    if not (folder / "config.json").exists():
        from workers.model.tiny import make_tiny_checkpoint

        log.warning("making the default checkpoint in %s (first run)", folder)
        make_tiny_checkpoint(folder, num_layers=6, seed=0)
    speed = folder / "speed-cpu.json"
    if not speed.exists():
        _profile(folder, speed)
    qualities = _qualities(folder, folder / "preset-quality.json")
    presets = [PresetSettings(name=n, placement=code, quality=qualities[code], description=d)
               for n, code, d in DEFAULT_PRESETS]
    return AppConfig(model={"checkpoint": str(folder)}, presets=presets, tables={"speed": str(speed)})


def _profile(folder: Path, out: Path) -> None:
    from policies.tables import write_table
    from workers import profiling

    log.warning("profiling the default checkpoint on this CPU (first run)")
    device = profiling.resolve_device("cpu")
    grid = profiling.DEFAULT_GRIDS["cpu"]
    target = profiling.load_target(folder, None, device, profiling.resolve_dtype(None, device))
    table = profiling.profile(target, grid["batches"], grid["contexts"], grid["prefill_chunk"], progress=False)
    write_table(out, table)


def _qualities(folder: Path, cache: Path) -> dict[str, float]:
    """Retention exp(loglik - loglik_all_attention) per default placement, cached beside the checkpoint."""
    if cache.exists():
        return json.loads(cache.read_text())
    from workers.evaluation import Scorer, make_windows
    from workers.model.loader import load_checkpoint
    from workers.model.tokenizer import Tokenizer, stdlib_texts

    log.warning("scoring the default presets on held-out text (first run)")
    model = load_checkpoint(folder)
    tokenizer = Tokenizer.load(folder)
    documents = [tokenizer.encode(t) for t in stdlib_texts(HELD_OUT_BYTES, skip_bytes=TOKENIZER_TEXT_BYTES)]
    scorer = Scorer(model, make_windows(documents, 128, 8192))
    loglik = {code: scorer(model.config.placement(code))[0] for _, code, _ in DEFAULT_PRESETS}
    reference = loglik["A" * model.config.num_layers]
    qualities = {code: round(math.exp(min(0.0, value - reference)), 4) for code, value in loglik.items()}
    cache.write_text(json.dumps(qualities, indent=2) + "\n")
    return qualities
