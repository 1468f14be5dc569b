"""Table files: every kind of malformed file is refused with a message naming what is wrong."""

import json

import pytest

from policies.errors import ConfigError, TableMismatch
from policies.memory import AttentionShape, CacheMemoryModel, DeltaRuleShape
from policies.placement import Mixer
from policies.tables import (
    PresetsFile,
    QualityFile,
    SpeedFile,
    SurrogateFile,
    check_layers,
    parse_table,
    read_speed_model,
    read_table,
    write_table,
)
from tests.edits import edited

LAYERS = 3
LAYER = {
    Mixer.ATTENTION: AttentionShape(kv_heads=2, head_size=16),
    Mixer.SLIDING_WINDOW: AttentionShape(kv_heads=2, head_size=16, window=16),
    Mixer.GDN: DeltaRuleShape(heads=4, key_dim=16, value_dim=16, conv_channels=128, conv_kernel=4),
    Mixer.KDA: DeltaRuleShape(heads=4, key_dim=16, value_dim=16, conv_channels=192, conv_kernel=4),
}
FINGERPRINT = {
    "device": "cpu: test", "model": "tiny", "model_sha256": "ab" * 32, "num_layers": LAYERS, "dtype": "float32",
    "created": "2026-01-01T00:00:00+00:00", "software": "test",
}


def speed_dict() -> dict:
    """A valid speed table: 3 batches x 2 contexts, every mixer, grids rising along both axes."""
    scale = {"attention": 1.0, "sliding_window": 0.8, "gdn": 0.5, "kda": 0.6}
    return {
        "format": "supernet-router/speed", "version": 1, "fingerprint": dict(FINGERPRINT),
        "batches": [1, 2, 4], "contexts": [16, 64],
        "decode_ms": {m: [[s * (1 + b / 4) * (1 + c / 64) for c in (16, 64)] for b in (1, 2, 4)] for m, s in scale.items()},
        "prefill_chunk": 8, "prefill_contexts": [0, 16, 64],
        "prefill_ms_per_token": {m: [s * 0.1 * (1 + c / 64) for c in (0, 16, 64)] for m, s in scale.items()},
        "tokens": [1, 2, 4, 8], "shared_ms": [0.2, 0.25, 0.3, 0.5], "head_ms": [0.1, 0.11, 0.12, 0.2],
        "engine_ms": [1.0, 1.3, 1.9],
        "memory": CacheMemoryModel(layers=(LAYER,) * LAYERS, kv_bytes=4).to_dict(),
        "measurement": {"warmup": 1, "repeats": 3, "cache_fill": "random", "monotone": True},
    }


def quality_dict() -> dict:
    return {
        "format": "supernet-router/quality", "version": 1, "fingerprint": dict(FINGERPRINT),
        "data": {"path": "x.txt", "sha256": "cd" * 32, "context": 64, "windows": 2, "tokens": 126},
        "results": [{"placement": code, "mean_loglik": -3.0 - i / 10, "tokens": 126}
                    for i, code in enumerate(["AAA", "SGK", "GGG"])],
    }


def presets_dict() -> dict:
    def entry(name, code, counts, quality, cost):
        return {"name": name, "placement": code, "counts": counts, "predicted_quality": quality,
                "retention": 1.0, "cost": cost, "speedup": 3.0 / cost}

    base = entry("q100-x1.00", "AAA", {"attention": 3, "sliding_window": 0, "gdn": 0, "kda": 0}, -3.0, 3.0)
    return {
        "format": "supernet-router/presets", "version": 1, "fingerprint": dict(FINGERPRINT), "speed_fingerprint": None,
        "operating_point": {"cost_model": "regression", "cost_unit": "fa-layers", "batch": None, "context": None,
                            "extrapolated": False, "reasons": []},
        "baseline": base, "frontier_points": 2,
        "presets": [entry("q90-x7.14", "GGG", {"attention": 0, "sliding_window": 0, "gdn": 3, "kda": 0}, -3.1, 0.42),
                    base],
    }


def surrogate_dict() -> dict:
    return {
        "format": "supernet-router/surrogate-fit", "version": 1, "fingerprint": dict(FINGERPRINT),
        "quality_sha256": "ef" * 32,
        "holdout": {"fraction": 0.2, "seed": 0, "num_train": 8, "num_test": 2, "spearman": 0.5, "r2": None},
        "surrogate": {"format": "supernet-router/surrogate", "version": 1, "num_layers": LAYERS, "max_range": 1,
                      "mixers": ["attention", "sliding_window", "gdn", "kda"], "intercept": -3.0, "ridge_alpha": 0.1,
                      "unary": [[0.0, -0.1, -0.2, -0.15]] * LAYERS},
    }


@pytest.mark.parametrize("make, model", [(speed_dict, SpeedFile), (quality_dict, QualityFile),
                                         (presets_dict, PresetsFile), (surrogate_dict, SurrogateFile)])
def test_valid_files_round_trip(tmp_path, make, model):
    table = parse_table(make(), model, "t.json")
    path = write_table(tmp_path / "t.json", table)
    assert read_table(path, model) == table
    assert json.loads(path.read_text())["format"] == make()["format"]



SPEED_FAULTS = [
    (("version",), 2, "'version' is 2, this code reads version 1"),
    (("format",), "supernet-router/quality", "'format' is 'supernet-router/quality', expected 'supernet-router/speed'"),
    (("decode_ms", "mamba"), [[1.0, 2.0]] * 3, "unknown mixer(s) ['mamba']"),
    (("decode_ms", "kda", 1, 0), None, "decode_ms.kda is missing the grid point batch=2, context=16"),
    (("decode_ms", "gdn", 2), [1.0], "decode_ms.gdn is not a 3 batch x 2 context grid"),
    (("decode_ms", "attention", 2, 1), 0.5, "decode_ms.attention falls from"),
    (("prefill_ms_per_token", "gdn", 2), 0.001, "prefill_ms_per_token.gdn falls from"),
    (("shared_ms",), [0.2, 0.25, 0.3], "shared_ms is not a 4 tokens grid"),
    (("head_ms", 0), -1.0, "head_ms.0: Input should be greater than or equal to 0"),
    (("engine_ms",), [1.0, 1.3], "engine_ms is not a 3 batch grid"),
    (("engine_ms", 2), 0.9, "engine_ms falls from"),
    (("contexts",), [64, 16], "contexts is [64, 16]: expected strictly increasing integers >= 1"),
    (("fingerprint", "num_layers"), 4, "memory has 3 layers, fingerprint.num_layers 4"),
    (("memory", "layers", 1, "rwkv"), {"kind": "attention", "kv_heads": 1, "head_size": 1}, "memory.layers.1: unknown mixer(s) ['rwkv']"),
    (("surprise",), 1, "surprise: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("path, value, message", SPEED_FAULTS, ids=[" ".join(map(str, f[0])) for f in SPEED_FAULTS])
def test_malformed_speed_tables_are_refused_naming_the_fault(path, value, message):
    with pytest.raises(TableMismatch) as caught:
        parse_table(edited(speed_dict(), path, value), SpeedFile, "speed.json")
    assert caught.value.message.startswith("speed.json (speed table): ")
    assert message in caught.value.message
    assert caught.value.exit_code == 3


def test_a_speed_table_from_before_the_engine_term_reads_as_zero_engine_work():
    from policies.cost import SpeedModel
    from policies.placement import Placement

    old = SpeedModel.from_file(parse_table(edited(speed_dict(), ("engine_ms",), delete=True), SpeedFile, "speed.json"))
    new = SpeedModel.from_file(parse_table(speed_dict(), SpeedFile, "speed.json"))
    step = old.homogeneous_step(Placement.parse("AGK"), 2, 16)
    assert old.engine(2).ms == 0.0 and not step.extrapolated
    assert new.homogeneous_step(Placement.parse("AGK"), 2, 16).ms == pytest.approx(step.ms + 1.3, rel=1e-12)


def test_speed_table_missing_a_mixer_everywhere():
    data = edited(speed_dict(), ("prefill_ms_per_token", "kda"), delete=True)
    with pytest.raises(TableMismatch, match=r"prefill_ms_per_token has no entry for timed mixer\(s\) \['kda'\]"):
        parse_table(data, SpeedFile, "speed.json")
    data = edited(speed_dict(), ("memory", "layers", 2, "gdn"), delete=True)
    with pytest.raises(TableMismatch, match=r"memory.layers.2 has no entry for timed mixer\(s\) \['gdn'\]"):
        parse_table(data, SpeedFile, "speed.json")


@pytest.mark.parametrize("path, value, message", [
    (("results", 1, "placement"), "SGKA", "results.1: placement SGKA has 4 layers but the model has 3"),
    (("results", 2, "placement"), "AAA", "results: placement(s) ['AAA'] appear more than once"),
    (("results", 0, "placement"), "AXA", "unknown letter(s) X"),
    (("results", 0, "mean_loglik"), 0.5, "results.0.mean_loglik: Input should be less than or equal to 0"),
    (("data", "sha256"), None, "data.sha256: Input should be a valid string"),
])
def test_malformed_quality_tables_are_refused(path, value, message):
    with pytest.raises(TableMismatch) as caught:
        parse_table(edited(quality_dict(), path, value), QualityFile, "q.json")
    assert message in caught.value.message


def test_malformed_presets_are_refused():
    with pytest.raises(TableMismatch, match="counts .* do not match placement GGG"):
        parse_table(edited(presets_dict(), ("presets", 0, "counts", "gdn"), 2), PresetsFile, "p.json")
    with pytest.raises(TableMismatch, match="preset names repeat"):
        parse_table(edited(presets_dict(), ("presets", 0, "name"), "q100-x1.00"), PresetsFile, "p.json")
    with pytest.raises(TableMismatch, match="placement AAAA has 4 layers but the model has 3"):
        parse_table(edited(presets_dict(), ("baseline", "placement"), "AAAA"), PresetsFile, "p.json")


def test_surrogate_fit_body_is_checked():
    with pytest.raises(TableMismatch, match="surrogate.unary"):
        parse_table(edited(surrogate_dict(), ("surrogate", "unary"), "nope"), SurrogateFile, "s.json")
    with pytest.raises(TableMismatch, match="holdout.fraction"):
        parse_table(edited(surrogate_dict(), ("holdout", "fraction"), 1.5), SurrogateFile, "s.json")


def test_files_that_are_not_tables(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match="missing.json: cannot read this speed table file"):
        read_table(missing, SpeedFile)
    broken = tmp_path / "broken.json"
    broken.write_text("{\"format\": ")
    with pytest.raises(TableMismatch, match=r"broken.json \(speed table\): not valid JSON"):
        read_table(broken, SpeedFile)
    with pytest.raises(TableMismatch, match="expected a JSON object, got list"):
        parse_table([1, 2], QualityFile, "q.json")


def test_layer_counts_must_agree(tmp_path):
    check_layers("speed.json", 6, "the surrogate", 6)
    with pytest.raises(TableMismatch, match="speed.json is for 48 layers but the surrogate has 6"):
        check_layers("speed.json", 48, "the surrogate", 6)
    path = write_table(tmp_path / "speed.json", parse_table(speed_dict(), SpeedFile, "x"))
    model = read_speed_model(path)
    assert model.num_layers == LAYERS and model.batches == (1, 2, 4)


def test_the_shipped_acceptance_table_loads_and_a_wrong_rate_is_named():
    import json

    from policies.speculation import AcceptanceRates
    from policies.tables import AcceptanceFile, parse_table, read_table
    from router.defaults import SHIPPED

    table = read_table(SHIPPED / "acceptance.json", AcceptanceFile)
    rates = AcceptanceRates.from_table(table)
    assert len(rates) == len(table.entries) >= 3 and all(e.target == "AAAAAAAA" for e in table.entries)
    data = json.loads((SHIPPED / "acceptance.json").read_text())
    data["entries"][0]["greedy"]["acceptance_rate"] = 0.01
    with pytest.raises(TableMismatch, match="acceptance_rate"):
        parse_table(data, AcceptanceFile, "edited.json")
    data = json.loads((SHIPPED / "acceptance.json").read_text())
    data["entries"][0]["draft"] = "AAAA"
    with pytest.raises(TableMismatch, match="layers"):
        parse_table(data, AcceptanceFile, "edited.json")
