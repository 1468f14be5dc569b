from policies.memory import AttentionShape, CacheMemoryModel, DeltaRuleShape
from policies.placement import Mixer, Placement

LAYER = {
    Mixer.ATTENTION: AttentionShape(kv_heads=8, head_size=128),
    Mixer.SLIDING_WINDOW: AttentionShape(kv_heads=8, head_size=128, window=4096),
    Mixer.GDN: DeltaRuleShape(heads=32, key_dim=128, value_dim=128, conv_channels=2 * 1024 + 4096, conv_kernel=4),
    Mixer.KDA: DeltaRuleShape(heads=32, key_dim=128, value_dim=128, conv_channels=3 * 4096, conv_kernel=4),
}
MODEL = CacheMemoryModel(layers=(LAYER,) * 48, kv_bytes=2, state_bytes=4)


def test_attention_grows_window_caps_recurrent_constant():
    fa = [MODEL.layer_bytes(0, Mixer.ATTENTION, c) for c in (1024, 8192, 32768)]
    assert fa == [c * 2 * 8 * 128 * 2 for c in (1024, 8192, 32768)]
    swa = [MODEL.layer_bytes(0, Mixer.SLIDING_WINDOW, c) for c in (1024, 4096, 32768)]
    assert swa[0] < swa[1] == swa[2] == 4096 * 2 * 8 * 128 * 2
    for mixer in (Mixer.GDN, Mixer.KDA):
        assert MODEL.layer_bytes(0, mixer, 16) == MODEL.layer_bytes(0, mixer, 32768)
    assert MODEL.layer_bytes(0, Mixer.GDN, 1) == 32 * 128 * 128 * 4 + (2 * 1024 + 4096) * 3 * 2


def test_sequence_bytes_sums_layers_and_max_sequences_fits_budget():
    all_fa = Placement.uniform(Mixer.ATTENTION, 48)
    all_gdn = Placement.uniform(Mixer.GDN, 48)
    per_fa = MODEL.sequence_bytes(all_fa, 32768)
    assert per_fa == 48 * MODEL.layer_bytes(0, Mixer.ATTENTION, 32768)
    budget = 25 * 2**30
    assert MODEL.max_sequences(all_fa, 32768, budget) == budget // per_fa
    assert MODEL.max_sequences(all_gdn, 32768, budget) > 20 * MODEL.max_sequences(all_fa, 32768, budget)


def test_round_trips_through_a_dict():
    assert CacheMemoryModel.from_dict(MODEL.to_dict()) == MODEL
