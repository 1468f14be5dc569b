import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from policies.errors import CheckpointError, ConfigError
from workers.model.batch import ForwardBatch
from workers.model.loader import build_model, load_checkpoint, read_tensors, save_checkpoint
from workers.model.config import load_config

PROMPTS = [[1, 17, 99, 402, 5, 6, 7], [1, 300, 301]]


def logits(model, codes):
    placements = [model.config.placement(c) for c in codes]
    return model(ForwardBatch.build(PROMPTS, placements), all_logits=True)


def test_written_and_read_back_gives_identical_outputs(tiny_model, tiny_checkpoint, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "copy", tokenizer_dir=tiny_checkpoint)
    again = load_checkpoint(tmp_path / "copy", kernels="torch")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for codes in (["AAAAAA", "GGGGGG"], ["SSKKGA", "KASGSK"]):
        assert torch.equal(logits(tiny_model, codes), logits(again, codes))


def test_real_tensor_names_are_written(tiny_checkpoint):
    names = set(load_file(tiny_checkpoint / "model.safetensors"))
    prefix = "model.decoder.blocks.0.mixer.mixers."
    for name in ["attention.q_proj.weight", "sliding_window.o_proj.weight", "gdn.in_proj_qkvz.weight",
                 "gdn.in_proj_ba.weight", "gdn.convolution.weight", "gdn.A_log", "gdn.dt_bias", "gdn.norm.weight",
                 "kda.q_conv.weight", "kda.f_a_proj.weight", "kda.g_b_proj.weight", "kda.beta_proj.weight",
                 "kda.A_log", "kda.dt_bias", "kda.norm.weight"]:
        assert prefix + name in names
    for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.decoder.blocks.5.mlp.down_proj.weight", "model.decoder.blocks.5.post_attention_layernorm.weight"]:
        assert name in names


def test_loading_assigns_the_read_tensors_without_copying(tiny_checkpoint):
    config = load_config(tiny_checkpoint)
    tensors = read_tensors(tiny_checkpoint)
    model = build_model(config, tensors)
    for name, param in model.state_dict().items():
        assert param.data_ptr() == tensors[name].data_ptr(), name


def _copy_with(tiny_checkpoint, tmp_path, edit):
    target = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.decoder.blocks.2.mixer.mixers.kda.f_b_proj.weight"),
         "missing tensor model.decoder.blocks.2.mixer.mixers.kda.f_b_proj.weight of shape"),
        (lambda t: t.__setitem__("model.decoder.blocks.1.mixer.mixers.gdn.A_log", torch.zeros(7)),
         r"tensor model.decoder.blocks.1.mixer.mixers.gdn.A_log has shape \[7\], the config implies \[4\]"),
        (lambda t: t.__setitem__("model.decoder.blocks.0.mixer.mixers.mamba.A", torch.zeros(2)),
         "unexpected tensor model.decoder.blocks.0.mixer.mixers.mamba.A"),
    ],
)
def test_mismatched_tensors_are_named(tiny_checkpoint, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_copy_with(tiny_checkpoint, tmp_path, edit))


def test_unknown_mixer_type_in_config_is_named(tiny_checkpoint, tmp_path):
    target = tmp_path / "badtype"
    shutil.copytree(tiny_checkpoint, target)
    raw = json.loads((target / "config.json").read_text())
    raw["decoder"]["block"]["mixer"]["mixers"]["kda"]["type"] = "kimi_linear"
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="decoder.block.mixer.mixers.kda.type 'kimi_linear'"):
        load_checkpoint(target)


def test_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nope")


def test_vision_encoder_tensors_are_skipped(tiny_checkpoint, tmp_path):
    target = _copy_with(tiny_checkpoint, tmp_path,
                        lambda t: t.__setitem__("model.vision_encoder.patch.weight", torch.zeros(3)))
    assert "model.vision_encoder.patch.weight" not in read_tensors(target)
    load_checkpoint(target)
