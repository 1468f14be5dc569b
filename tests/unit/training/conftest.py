"""A small text corpus (a folder of stdlib files, cut short) and a tiny teacher trained on it, shared per session."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from workers.training.trainer import TrainSettings, train

TINY_RUN = dict(shape="tiny", vocab_size=384, batch_size=4, seq_len=32, warmup=2, eval_every=2, eval_tokens=256,
                save_every=2, log_every=1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """80 documents of up to 3,000 characters: enough for a held-out part (5% of documents, by name hash)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path_factory.mktemp("corpus")
    for path in sorted(root.glob("*.py"))[:80]:
        (folder / path.name).write_text(path.read_text(encoding="utf-8", errors="replace")[:3000])
    return folder


@pytest.fixture(scope="session")
def teacher(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    return train(TrainSettings(stage="teacher", corpus=str(corpus), steps=4, **TINY_RUN), out, progress=False)
