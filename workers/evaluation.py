"""Score placements by the mean per-token log-likelihood of a text: the quality table (``QualityFile``).

The text (a plain file, or JSONL with a "text" field per line, each line a
document) is tokenized with the checkpoint's tokenizer and cut into windows of
``context`` tokens; each window is scored as its own sequence from position 0,
so its first token is context only and the rest are predicted. A placement's
score is the mean natural-log probability of all predicted tokens.

Placements are sampled evenly over mixer counts: a count vector uniform over
the compositions of L layers into the four mixers (stars and bars), then a
random layer order. The draw is prefix-stable (the first n placements of a
larger draw with the same seed are those of a draw of n), and the output file
is rewritten after every placement, so a rerun with the same ``--out`` skips
what is already scored and a larger N scores only the new placements.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from policies.errors import ConfigError, TableMismatch
from policies.jsonl import jsonl_objects
from policies.placement import MIXERS, Placement
from policies.tables import DataFingerprint, Fingerprint, QualityFile, QualityResult, read_table, write_table
from workers.model.batch import ForwardBatch
from workers.model.supernet import SupernetLM

log = logging.getLogger(__name__)


def sample_placements(num_layers: int, count: int, seed: int) -> list[Placement]:
    """``count`` distinct placements, evenly over mixer counts (see the module docstring)."""
    if count > 4**num_layers:
        raise ConfigError(f"asked for {count} placements but {num_layers} layers have only {4**num_layers}")
    rng = np.random.default_rng(seed)
    chosen: dict[str, Placement] = {}
    for _ in range(1000 * count + 1000):
        if len(chosen) >= count:
            break
        bars = np.sort(rng.choice(num_layers + 3, size=3, replace=False))  # 3 bars among L + 3 slots
        counts = np.diff(np.concatenate([[-1], bars, [num_layers + 3]])) - 1
        layers = np.repeat(np.arange(len(MIXERS)), counts)
        rng.shuffle(layers)
        placement = Placement(tuple(MIXERS[i] for i in layers))
        chosen.setdefault(placement.code, placement)
    else:
        raise ConfigError(f"could not draw {count} distinct placements of {num_layers} layers")
    return list(chosen.values())


def read_texts(path: Path) -> list[str]:
    """A plain text file is one document; ``.jsonl`` holds one {"text": ...} document per line."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such data file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    if path.suffix != ".jsonl":
        return [raw]
    return [entry["text"] for _, entry in jsonl_objects(path, raw, "text")]


def make_windows(documents: Sequence[Sequence[int]], context: int, max_tokens: int | None = None) -> list[list[int]]:
    """Consecutive windows of ``context`` tokens per document; a shorter tail is kept if it predicts anything."""
    if context < 2:
        raise ConfigError(f"--context must be at least 2 tokens, got {context}")
    windows, budget = [], max_tokens if max_tokens is not None else float("inf")
    for tokens in documents:
        for start in range(0, len(tokens), context):
            window = list(tokens[start:start + min(context, budget)])
            if len(window) < 2:
                break
            windows.append(window)
            budget -= len(window)
    return windows


def data_fingerprint(path: Path, windows: list[list[int]], context: int) -> DataFingerprint:
    if not windows:
        raise ConfigError(f"{path}: too little text for even one window of 2 tokens")
    return DataFingerprint(path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), context=context,
                           windows=len(windows), tokens=sum(len(w) - 1 for w in windows))


class Scorer:
    """Mean log-likelihood of fixed windows under any placement, ``batch_windows`` windows per forward."""

    def __init__(self, model: SupernetLM, windows: list[list[int]], batch_windows: int = 8):
        self.model = model
        # Longest first: full-length windows share chunks, which the mixers run as dense blocks.
        windows = sorted(windows, key=len, reverse=True)
        self.chunks = [windows[i:i + batch_windows] for i in range(0, len(windows), batch_windows)]
        self.targets = []  # per chunk: (flat index of each predicting token, the token it predicts)
        for chunk in self.chunks:
            flat = torch.tensor([t for w in chunk for t in w], device=model.device)
            starts = np.cumsum([0] + [len(w) for w in chunk[:-1]])
            index = torch.tensor([s + i for s, w in zip(starts, chunk) for i in range(len(w) - 1)], device=model.device)
            self.targets.append((index, flat[index + 1]))

    @torch.inference_mode()
    def __call__(self, placement: Placement) -> tuple[float, int]:
        self.model.check_placement(placement)
        total, count = 0.0, 0
        for chunk, (index, target) in zip(self.chunks, self.targets):
            batch = ForwardBatch.build(chunk, [placement] * len(chunk), device=self.model.device)
            logits = self.model(batch, all_logits=True)[index].float()
            total += float(torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum())
            count += len(index)
        return total / count, count


_MUST_MATCH = (("fingerprint", "model_sha256"), ("fingerprint", "num_layers"), ("fingerprint", "dtype"),
               ("data", "sha256"), ("data", "context"), ("data", "windows"), ("data", "tokens"))


def resume(out: Path, fingerprint: Fingerprint, data: DataFingerprint) -> QualityFile:
    """The quality file at ``out`` if it exists and was measured the same way, else a new empty one."""
    fresh = QualityFile(format="supernet-router/quality", version=1, fingerprint=fingerprint, data=data, results=[])
    if not out.exists():
        return fresh
    existing = read_table(out, QualityFile)
    for part, field in _MUST_MATCH:
        old, new = getattr(getattr(existing, part), field), getattr(getattr(fresh, part), field)
        if old != new:
            raise TableMismatch(f"{out} was measured with {part}.{field} {old!r} but this run has {new!r}: "
                                "give another --out, or the checkpoint, data and settings it was made with")
    return existing


def evaluate(scorer: Scorer, placements: Sequence[Placement], out: Path, fingerprint: Fingerprint,
             data: DataFingerprint, progress: bool | None = None) -> QualityFile:
    """Score every placement not yet in ``out``, rewriting ``out`` after each one."""
    table = resume(out, fingerprint, data)
    done = {r.placement for r in table.results}
    todo = list({p.code: p for p in placements if p.code not in done}.values())
    if done:
        log.info("%s: %d placement(s) already scored, %d to go", out, len(done), len(todo))
    results = list(table.results)
    for placement in tqdm(todo, desc="evaluate", unit="placement", disable=None if progress is None else not progress):
        mean, tokens = scorer(placement)
        results.append(QualityResult(placement=placement.code, mean_loglik=mean, tokens=tokens))
        table = table.model_copy(update={"results": list(results)})
        write_table(out, table)
    if not todo:
        write_table(out, table)
    return table
