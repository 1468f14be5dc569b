"""The small supernet's shape and the two configs built from it: the all-attention teacher and the supernet.

Both are Apriel2 ``config.json`` dicts (``model.config.raw``): the teacher a
fixed decoder of plain attention blocks, the supernet the same blocks with a
stochastic mixer holding attention, sliding_window, gdn and kda. GDN and KDA
heads mirror attention's (key heads = KV groups, value heads = query heads,
head sizes equal) so they can start from the teacher's projections.
"""

from __future__ import annotations

import copy

from workers.model.config import stochastic_mixer_dict, supernet_config_dict

SMALL_SHAPE = dict(  # ~8.4M parameters: 17 MB of bf16 safetensors
    num_layers=8, hidden_size=192, intermediate_size=512, heads=4, head_groups=2, head_size=48, window_size=32,
    max_position_embeddings=4096,
)
TINY_TRAINING_SHAPE = dict(  # for smoke tests and quick CPU runs
    num_layers=4, hidden_size=64, intermediate_size=128, heads=4, head_groups=2, head_size=16, window_size=16,
    max_position_embeddings=4096,
)
SHAPES = {"small": SMALL_SHAPE, "tiny": TINY_TRAINING_SHAPE}


def supernet_config(shape: dict, vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict:
    return supernet_config_dict(
        vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=3,
        gdn_value_heads=shape["heads"], gdn_key_heads=shape["head_groups"],
        gdn_key_head_dim=shape["head_size"], gdn_value_head_dim=shape["head_size"],
        kda_heads=shape["heads"], kda_head_dim=shape["head_size"], **shape,
    )


def teacher_config(supernet: dict) -> dict:
    """The same model with only the attention mixer in every block."""
    raw = copy.deepcopy(supernet)
    block = raw["decoder"]["block"]
    block["mixer"] = block["mixer"]["mixers"]["attention"]
    return raw


def supernet_config_from_teacher(teacher: dict, window_size: int) -> dict:
    """The supernet around a teacher's config: its attention as every block's main mixer, plus the three others."""
    block = teacher["decoder"]["block"]
    attention = block["mixer"]
    if attention.get("type", "attention") != "attention" or attention.get("window_size") is not None:
        raise ValueError("the teacher's blocks must hold one full-attention mixer")
    raw = copy.deepcopy(teacher)
    heads, groups, size = attention["heads"], attention.get("head_groups", attention["heads"]), attention["head_size"]
    raw["decoder"]["block"]["mixer"] = stochastic_mixer_dict(
        attention, window_size, gdn_key_heads=groups, gdn_value_heads=heads, gdn_key_head_dim=size,
        gdn_value_head_dim=size, kda_heads=heads, kda_head_dim=size, norm_eps=raw["head"]["normalization"]["epsilon"])
    return raw
