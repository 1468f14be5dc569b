"""policies.memory: what the engine's pool reserves per sequence, in whole blocks (15B shapes, bf16)."""

import math

import pytest

from policies.memory import BLOCK_ALIGN_BYTES, AttentionShape, CacheMemoryModel, DeltaRuleShape
from policies.placement import Mixer, Placement

LAYER = {
    Mixer.ATTENTION: AttentionShape(kv_heads=8, head_size=128),
    Mixer.SLIDING_WINDOW: AttentionShape(kv_heads=8, head_size=128, window=4096),
    Mixer.GDN: DeltaRuleShape(heads=32, key_dim=128, value_dim=128, conv_channels=2 * 1024 + 4096, conv_kernel=4),
    Mixer.KDA: DeltaRuleShape(heads=32, key_dim=128, value_dim=128, conv_channels=3 * 4096, conv_kernel=4),
}
MODEL = CacheMemoryModel(layers=(LAYER,) * 48, kv_bytes=2, state_bytes=4)
TOKEN = 2 * 8 * 128 * 2  # keys and values of one token, one layer
KDA_SLOT = 32 * 128 * 128 * 4 + 3 * 4096 * 3 * 2


def test_pages_are_long_enough_to_hold_a_recurrent_slot():
    # The largest slot (KDA) is 2,170,880 bytes = 530 tokens of keys and values: pages of 544 (34 x 16).
    assert MODEL.page_tokens == 544 and MODEL.block_bytes == 544 * TOKEN
    assert MODEL.block_bytes >= KDA_SLOT and MODEL.block_bytes - KDA_SLOT < 16 * TOKEN


def test_attention_grows_by_pages_window_caps_recurrent_is_one_block():
    block = MODEL.block_bytes
    for context in (1, 544, 545, 1024, 8192, 32768):
        assert MODEL.layer_bytes(0, Mixer.ATTENTION, context) == math.ceil(context / 544) * block
    swa = [MODEL.layer_bytes(0, Mixer.SLIDING_WINDOW, c) for c in (1024, 4096, 32768)]
    assert swa[0] == 2 * block and swa[1] == swa[2] == 8 * block  # the ring: 4096 tokens on 8 pages
    for mixer in (Mixer.GDN, Mixer.KDA):
        assert MODEL.layer_bytes(0, mixer, 16) == MODEL.layer_bytes(0, mixer, 32768) == block
    # What the tokens themselves occupy (what a decode step reads) is unchanged by paging.
    assert LAYER[Mixer.GDN].cache_bytes(1, 2, 4) == 32 * 128 * 128 * 4 + (2 * 1024 + 4096) * 3 * 2
    assert LAYER[Mixer.ATTENTION].cache_bytes(1000, 2, 4) == 1000 * TOKEN


def test_explicit_pages_and_alignment():
    small = CacheMemoryModel(layers=(LAYER,) * 2, kv_bytes=2, state_bytes=4, page_tokens=16)
    assert small.page_tokens == 16 and small.block_bytes == math.ceil(KDA_SLOT / BLOCK_ALIGN_BYTES) * BLOCK_ALIGN_BYTES
    attention_only = CacheMemoryModel(layers=({Mixer.ATTENTION: LAYER[Mixer.ATTENTION]},), kv_bytes=2)
    assert attention_only.page_tokens == 16 and attention_only.block_bytes == 16 * TOKEN
    with pytest.raises(ValueError, match="page_tokens"):
        CacheMemoryModel(layers=(LAYER,), page_tokens=0)


def test_sequence_bytes_sums_layers_and_max_sequences_fits_budget():
    all_fa = Placement.uniform(Mixer.ATTENTION, 48)
    all_gdn = Placement.uniform(Mixer.GDN, 48)
    per_fa = MODEL.sequence_bytes(all_fa, 32768)
    assert per_fa == 48 * MODEL.layer_bytes(0, Mixer.ATTENTION, 32768) == 48 * 61 * MODEL.block_bytes
    assert MODEL.sequence_blocks(all_gdn, 32768) == 48
    budget = 25 * 2**30
    assert MODEL.max_sequences(all_fa, 32768, budget) == budget // per_fa
    assert MODEL.max_sequences(all_gdn, 32768, budget) > 20 * MODEL.max_sequences(all_fa, 32768, budget)
    assert MODEL.usable_blocks(budget) == budget // MODEL.block_bytes - 1  # the pool keeps a null block
    assert MODEL.usable_blocks(MODEL.block_bytes) == 0


def test_round_trips_through_a_dict_and_old_tables_derive_the_pages():
    assert CacheMemoryModel.from_dict(MODEL.to_dict()) == MODEL
    old = {k: v for k, v in MODEL.to_dict().items() if k != "page_tokens"}
    assert CacheMemoryModel.from_dict(old) == MODEL
    explicit = CacheMemoryModel(layers=(LAYER,), page_tokens=32)
    assert CacheMemoryModel.from_dict(explicit.to_dict()).page_tokens == 32


def test_speculation_adds_ring_slack_snapshots_and_the_drafts_caches():
    block, k = MODEL.block_bytes, 4
    # A window of 4096 on pages of 544 has 256 tokens of slack already; 4100 tokens need a ninth page.
    assert MODEL.layer_blocks(0, Mixer.SLIDING_WINDOW, 32768, 4) == 8
    assert MODEL.layer_blocks(0, Mixer.SLIDING_WINDOW, 32768, 8 * 544 - 4096 + 1) == 9
    assert MODEL.layer_blocks(0, Mixer.SLIDING_WINDOW, 100, 4) == 1  # shorter than the window: unchanged
    assert MODEL.layer_blocks(0, Mixer.ATTENTION, 32768, k) == MODEL.layer_blocks(0, Mixer.ATTENTION, 32768)
    for mixer in (Mixer.GDN, Mixer.KDA):  # the live state and its snapshot
        assert MODEL.layer_blocks(0, mixer, 32768, k) == 2
    target, draft = Placement.uniform(Mixer.ATTENTION, 48), Placement.uniform(Mixer.GDN, 48)
    assert MODEL.speculative_bytes(target, None, 32768, 0) == MODEL.sequence_bytes(target, 32768)
    assert MODEL.speculative_bytes(target, draft, 32768, k) == (48 * 61 + 48 * 2) * block
