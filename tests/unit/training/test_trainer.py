"""Both training stages on a tiny model for a few steps (CI never trains for real): reproducible, resumable, loadable."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from policies.errors import ConfigError
from workers.model.loader import load_checkpoint
from workers.model.tokenizer import Tokenizer
from workers.training.trainer import STATE_FILE, TrainSettings, train

from .conftest import TINY_RUN


def weights(folder):
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_teacher_run_writes_a_loadable_checkpoint_log_and_corpus_summary(teacher):
    model = load_checkpoint(teacher, kernels="torch")
    assert model.config.num_layers == 4 and Tokenizer.load(teacher).vocab_size == 384
    assert {t.dtype for t in load_file(teacher / "model.safetensors").values()} == {torch.bfloat16}
    records = [json.loads(line) for line in (teacher / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "heldout" in r] == [0, 2, 4]
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
    summary = json.loads((teacher / "corpus.json").read_text())
    assert summary["train"]["tokens"] > summary["heldout"]["tokens"] > 0


def test_same_seed_same_run(corpus, teacher, tmp_path):
    again = train(TrainSettings(stage="teacher", corpus=str(corpus), steps=4, **TINY_RUN), tmp_path, progress=False)
    assert_same_weights(weights(again), weights(teacher))


def test_interrupted_run_resumes_to_the_same_weights(corpus, teacher, tmp_path):
    settings = TrainSettings(stage="teacher", corpus=str(corpus), steps=4, **TINY_RUN)
    train(settings, tmp_path, progress=False, stop_after=3)  # saves at step 2 and at the stop (3)
    assert torch.load(tmp_path / STATE_FILE, weights_only=False)["step"] == 3
    train(settings, tmp_path, progress=False)
    assert_same_weights(weights(tmp_path), weights(teacher))
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 1  # the resumed log does not repeat steps


def test_resuming_with_other_settings_is_refused(corpus, teacher, tmp_path):
    settings = TrainSettings(stage="teacher", corpus=str(corpus), steps=2, **TINY_RUN)
    train(settings, tmp_path, progress=False)
    changed = TrainSettings(stage="teacher", corpus=str(corpus), steps=2, **{**TINY_RUN, "batch_size": 2})
    with pytest.raises(ConfigError, match="batch_size=4, not 2: repeat its options to resume it"):
        train(changed, tmp_path, progress=False)


def test_supernet_trains_only_the_mixers(corpus, teacher, tmp_path):
    settings = TrainSettings(stage="supernet", corpus=str(corpus), steps=2, teacher=str(teacher),
                             **{**TINY_RUN, "window_size": 8})
    train(settings, tmp_path, progress=False)
    student, source = weights(tmp_path), load_checkpoint(teacher, dtype=torch.float32, kernels="torch").state_dict()
    changed = {name for name, tensor in student.items() if ".mixer." in name and name.endswith("proj.weight")
               and name.replace(".mixers.attention", "") in source
               and not torch.equal(tensor, source[name.replace(".mixers.attention", "")])}
    assert changed, "the attention mixers should move under distillation"
    for name, tensor in student.items():
        if ".mixer." not in name:
            assert torch.equal(tensor, source[name]), f"{name} should stay frozen"
    model = load_checkpoint(tmp_path, kernels="torch")
    assert model.config.placement("AGKS") and len(model.blocks[0].by_kind) == 4
    heldout = [json.loads(line)["heldout"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()
               if "heldout" in line]
    assert set(heldout[0]) == {"AAAA", "SSSS", "GGGG", "KKKK"}


@pytest.mark.parametrize("change,message", [
    (dict(stage="student"), "unknown stage 'student'"),
    (dict(steps=0), "--steps must be at least 1"),
    (dict(seq_len=1), "--seq-len must be at least 2"),
    (dict(shape="huge"), "unknown --shape 'huge'"),
    (dict(stage="supernet"), "needs --teacher DIR"),
])
def test_bad_settings_are_clear_errors(change, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(TrainSettings(**{"stage": "teacher", **change}), tmp_path, progress=False)
