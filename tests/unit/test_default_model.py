"""The shipped default: a trained supernet whose placements really differ, with tables that belong to it."""

from __future__ import annotations

import pytest
import torch

from policies.tables import PresetsFile, QualityFile, SurrogateFile, read_table
from router.defaults import default_checkpoint, default_presets
from workers.evaluation import Scorer, make_windows
from workers.profiling import checkpoint_sha256
from workers.model.loader import load_checkpoint
from workers.model.tokenizer import Tokenizer
from workers.training.corpus import read_documents, split

FOLDER = default_checkpoint()


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(FOLDER, dtype=torch.float32, kernels="torch")


def test_size_and_shape_fit_the_repository(model):
    assert (FOLDER / "model.safetensors").stat().st_size <= 25 * 2**20
    assert 8 <= model.config.num_layers <= 12 and all(len(block.by_kind) == 4 for block in model.blocks)


def test_tables_were_measured_on_this_checkpoint():
    sha = checkpoint_sha256(FOLDER)
    quality = read_table(FOLDER / "quality.json", QualityFile)
    assert quality.fingerprint.model_sha256 == sha and len(quality.results) >= 500
    fit = read_table(FOLDER / "surrogate.json", SurrogateFile)
    assert fit.fingerprint.model_sha256 == sha and fit.holdout.spearman > 0.8
    for name in ("presets.json", "presets-h100.json"):
        assert read_table(FOLDER / name, PresetsFile).fingerprint.model_sha256 == sha


def test_default_presets_run_from_quality_to_fastest():
    presets = default_presets(FOLDER / "presets.json")
    assert presets[0].name == "quality" and presets[0].placement == "A" * 8
    assert [p.name for p in presets][-1] == "fastest"
    qualities = [p.quality for p in presets]
    assert qualities == sorted(qualities, reverse=True) and qualities[-1] < 1


def test_trained_placements_differ_on_held_out_python(model):
    """On held-out stdlib text all-attention beats all-GDN by a margin far above rounding, and both beat chance."""
    tokenizer = Tokenizer.load(FOLDER)
    _, held_out = split(read_documents("stdlib"))
    scorer = Scorer(model, make_windows([tokenizer.encode(d.text) for d in held_out[:3]], 128, 1024))
    attention = -scorer(model.config.placement("A" * 8))[0]
    gdn = -scorer(model.config.placement("G" * 8))[0]
    assert attention < gdn - 0.05
    assert gdn < 0.7 * torch.log(torch.tensor(float(tokenizer.vocab_size))).item()

