import copy

import pytest

from policies.errors import CheckpointError, InvalidPlacement
from policies.placement import Mixer
from tests.edits import edited
from workers.model.config import AttentionConfig, GdnConfig, KdaConfig, parse_config, supernet_config_dict

# The released 15B supernet's shape (shared/design/SUPERNET.md).
SUPER_APRIEL_15B = supernet_config_dict(
    hidden_size=5120, vocab_size=131072, num_layers=48, intermediate_size=14336, heads=32, head_groups=8,
    head_size=128, window_size=4096, gdn_value_heads=32, gdn_key_heads=8, gdn_key_head_dim=128,
    gdn_value_head_dim=128, kda_heads=32, kda_head_dim=128, max_position_embeddings=65536,
)


def test_parses_the_released_layout():
    config = parse_config(SUPER_APRIEL_15B)
    assert config.num_layers == 48
    layer = config.layers[0]
    assert set(layer.mixers) == set(Mixer)
    assert layer.mixers[Mixer.ATTENTION] == AttentionConfig(32, 8, 128, None, 1e9)
    assert layer.mixers[Mixer.SLIDING_WINDOW].window_size == 4096
    assert layer.mixers[Mixer.GDN] == GdnConfig(32, 8, 128, 128, 4)
    assert layer.mixers[Mixer.KDA] == KdaConfig(32, 128, 4)
    assert layer.tensor_names[Mixer.GDN] == "mixer.mixers.gdn"
    assert config.main_placement.code == "A" * 48


def test_pattern_decoder_repeats_and_single_mixer_blocks_drop_the_mixers_level():
    raw = copy.deepcopy(SUPER_APRIEL_15B)
    block = raw["decoder"].pop("block")
    gdn_only = {**block, "mixer": block["mixer"]["mixers"]["gdn"]}
    raw["decoder"] = {"type": "pattern", "num_blocks": 5, "pattern": ["super", "gdn_only"],
                      "blocks": {"super": block, "gdn_only": gdn_only}}
    config = parse_config(raw)
    assert [len(layer.mixers) for layer in config.layers] == [4, 1, 4, 1, 4]
    assert config.layers[1].tensor_names == {Mixer.GDN: "mixer"}
    assert config.main_placement.code == "AGAGA"
    assert config.placement("SGKGA").code == "SGKGA"
    with pytest.raises(InvalidPlacement, match="layer 1 has no attention mixer"):
        config.placement("AAAAA")


def _broken(path: list[str], value=None, delete=False) -> dict:
    return edited(SUPER_APRIEL_15B, path, value, delete)


MIXERS = ["decoder", "block", "mixer", "mixers"]


@pytest.mark.parametrize(
    "raw, message",
    [
        (_broken(["decoder", "num_blocks"], delete=True), "missing key decoder.num_blocks"),
        (_broken(["hidden_size"], "big"), "hidden_size must be an integer"),
        (_broken(MIXERS + ["gdn", "type"], "mamba"), "decoder.block.mixer.mixers.gdn.type 'mamba' is not a mixer"),
        (_broken(MIXERS + ["linear"], {"type": "attention"}), "unknown mixer name 'linear'"),
        (_broken(MIXERS + ["attention", "window_size"], 64), "named attention but configured as sliding_window"),
        (_broken(MIXERS + ["kda", "head_dim"], delete=True), "missing key decoder.block.mixer.mixers.kda.head_dim"),
        (_broken(["decoder", "type"], "ring"), "decoder.type 'ring' is unknown"),
        (_broken(["head", "normalization", "epsilon"], delete=True), "missing key head.normalization.epsilon"),
    ],
)
def test_bad_configs_name_the_key(raw, message):
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        parse_config(raw)


def test_memory_model_matches_the_15b_shapes():
    memory = parse_config(SUPER_APRIEL_15B).memory_model(kv_bytes=2)
    # Full attention: 2 (k, v) x 8 kv heads x 128 x 2 bytes per token per layer, on 544-token pages.
    assert memory.layers[0][Mixer.ATTENTION].cache_bytes(1000, 2, 4) == 1000 * 4096
    assert memory.layers[0][Mixer.KDA].cache_bytes(10, 2, 4) == 32 * 128 * 128 * 4 + 3 * 4096 * 3 * 2
    assert memory.page_tokens == 544 and memory.layer_bytes(0, Mixer.ATTENTION, 1000) == 2 * 544 * 4096
