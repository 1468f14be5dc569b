"""The placement toolkit end to end on the tiny checkpoint: profile, evaluate (and resume), fit, frontier, plot."""

import argparse
import json
import sys
import sysconfig
from pathlib import Path

import pytest

from policies.errors import ConfigError, InvalidPlacement, InvalidRequest, SupernetError, TableMismatch
from policies.placement import Mixer, Placement
from policies.cost import SpeedModel
from policies.tables import PresetsFile, QualityFile, SpeedFile, SurrogateFile, read_speed_model, read_table
from router import toolkit_cli
from workers import evaluation
from workers.profiling import DECODE_TIMING


def run(*argv: str) -> int:
    """The toolkit's commands as router/cli.py runs them (it calls ``register`` on its sub-parsers)."""
    parser = argparse.ArgumentParser(prog="supernet-router")
    toolkit_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.run(args)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "textwrap.txt"
    path.write_text(Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text())
    return path


@pytest.fixture(scope="module")
def speed(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    assert run("profile", "--checkpoint", tiny_checkpoint, "--device", "cpu", "--batches", "1,2,4",
               "--contexts", "16,64", "--prefill-chunk", "16", "--warmup", "1", "--repeats", "3", "--out", out) == 0
    return out


EVALUATE = ("--context", "64", "--max-tokens", "384", "--seed", "3")


def test_profile_writes_a_valid_table(speed, tiny_checkpoint):
    table = read_table(speed, SpeedFile)
    assert table.fingerprint.model == tiny_checkpoint.name and table.fingerprint.num_layers == 6
    assert table.fingerprint.device.startswith("cpu: ") and table.fingerprint.dtype == "float32"
    assert table.batches == [1, 2, 4] and table.contexts == [16, 64] and table.prefill_contexts == [0, 16, 64]
    assert set(table.decode_ms) == {"attention", "sliding_window", "gdn", "kda"}
    assert table.tokens == [1, 2, 4, 16]
    assert sys.platform != "linux" or table.measurement.other_cpus >= 0  # measured from /proc/stat
    model = read_speed_model(speed)
    placement = Placement.parse("ASGKAS")
    assert model.homogeneous_step(placement, 2, 64).ms > 0
    assert model.ttft(placement, 40).ms > 0
    assert model.homogeneous_step(placement, 8, 64).extrapolated
    assert len(table.engine_ms) == 3 and min(table.engine_ms) >= 0  # the engine's own work per step
    assert table.measurement.decode_timing == DECODE_TIMING  # else the default service profiles at every start


def test_the_engine_term_is_a_whole_engine_step_minus_its_model_parts(tiny_checkpoint, monkeypatch):
    """Whole-step times stand in for the engine's (the subtraction is what is tested, not this machine's speed)."""
    import torch

    from workers import profiling

    monkeypatch.setattr(profiling, "_engine_steps", lambda target, batches, context, warmup, repeats, timed:
                        [timed(lambda b=b: 1000.0 * b) for b in batches])
    target = profiling.load_target(tiny_checkpoint, None, torch.device("cpu"), torch.float32)
    assert target.tokenizer is not None  # the engine's steps detokenize as when serving
    table = profiling.profile(target, [1, 2], [16], 16, warmup=1, repeats=1, progress=False)
    model = SpeedModel.from_file(table)
    placement = Placement.parse("AAAAAA")
    for batch in (1, 2):  # the parts' prediction plus the engine term is the whole step that was "measured"
        assert model.homogeneous_step(placement, batch, 16).ms == pytest.approx(1000.0 * batch, rel=1e-5)  # 6 digits kept
    monkeypatch.setattr(profiling, "_engine_steps", lambda *args: [0.0, 0.0])  # faster than its parts: no term
    assert profiling.profile(target, [1, 2], [16], 16, warmup=1, repeats=1, progress=False).engine_ms == [0.0, 0.0]


def test_evaluate_fit_frontier_end_to_end(tiny_checkpoint, data_file, speed, tmp_path, monkeypatch, capsys):
    quality = tmp_path / "quality.json"
    assert run("evaluate", "--checkpoint", tiny_checkpoint, "--data", data_file, "--placements", "20",
               "--placement", "AAAAAA", "--out", quality, *EVALUATE) == 0
    first = read_table(quality, QualityFile)
    assert len(first.results) == 21 and first.results[-1].placement == "AAAAAA"
    assert first.data.context == 64 and first.data.tokens == 384 - first.data.windows
    assert all(-20 < r.mean_loglik < 0 and r.tokens == first.data.tokens for r in first.results)

    # Resume: a larger N scores only the new placements and keeps the old results as they were.
    scored = []
    original = evaluation.Scorer.__call__
    monkeypatch.setattr(evaluation.Scorer, "__call__", lambda self, p: scored.append(p.code) or original(self, p))
    assert run("evaluate", "--checkpoint", tiny_checkpoint, "--data", data_file, "--placements", "24",
               "--placement", "AAAAAA", "--out", quality, *EVALUATE) == 0
    second = read_table(quality, QualityFile)
    assert len(scored) == 4 and len(second.results) == 25
    assert second.results[:21] == first.results
    assert [r.placement for r in second.results[21:]] == scored
    assert scored == [p.code for p in evaluation.sample_placements(6, 24, 3)[20:]]

    surrogate = tmp_path / "surrogate.json"
    assert run("fit", "--quality", quality, "--holdout", "0.2", "--out", surrogate) == 0
    assert "spearman" in capsys.readouterr().out
    fit = read_table(surrogate, SurrogateFile)
    assert fit.holdout.num_test == 5 and fit.holdout.num_train == 20
    assert fit.fingerprint == second.fingerprint and fit.surrogate.num_layers == 6

    presets, plot = tmp_path / "presets.json", tmp_path / "frontier.png"
    assert run("frontier", "--quality", quality, "--surrogate", surrogate, "--speed", speed, "--batch", "4",
               "--context", "64", "--presets", "3", "--out", presets, "--plot", plot) == 0
    table = read_table(presets, PresetsFile)
    assert table.operating_point.cost_model == "speed-table" and not table.operating_point.extrapolated
    assert table.baseline.placement == "AAAAAA" and table.baseline.name == "q100-x1.00"
    assert 1 <= len(table.presets) <= 3 and table.speed_fingerprint == read_table(speed, SpeedFile).fingerprint
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    linear = tmp_path / "linear.json"
    assert run("frontier", "--quality", quality, "--cost-model", "idealized", "--out", linear) == 0
    assert read_table(linear, PresetsFile).operating_point.cost_unit == "fa-layers"
    far = tmp_path / "far.json"
    assert run("frontier", "--surrogate", surrogate, "--speed", speed, "--batch", "32", "--context", "4096",
               "--out", far) == 0
    assert read_table(far, PresetsFile).operating_point.extrapolated


def test_mismatched_tables_are_refused_with_exit_3(tiny_checkpoint, data_file, speed, tmp_path):
    quality = tmp_path / "quality.json"
    run("evaluate", "--checkpoint", tiny_checkpoint, "--data", data_file, "--placements", "6", "--out", quality,
        *EVALUATE)
    with pytest.raises(TableMismatch, match=r"data.context 64 but this run has 32") as caught:
        run("evaluate", "--checkpoint", tiny_checkpoint, "--data", data_file, "--placements", "8", "--out", quality,
            "--context", "32", "--max-tokens", "384")
    assert caught.value.exit_code == 3

    data = json.loads(speed.read_text())
    data["fingerprint"]["num_layers"] = 48
    data["memory"]["layers"] = data["memory"]["layers"][:1] * 48
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps(data))
    with pytest.raises(TableMismatch, match=r"deep.json \(speed table\) is for 48 layers but the surrogate has 6"):
        run("frontier", "--quality", quality, "--speed", deep, "--batch", "1", "--context", "16", "--out",
            tmp_path / "p.json")
    data["version"] = 7
    deep.write_text(json.dumps(data))
    with pytest.raises(TableMismatch, match="'version' is 7, this code reads version 1"):
        run("frontier", "--quality", quality, "--speed", deep, "--batch", "1", "--context", "16", "--out",
            tmp_path / "p.json")


@pytest.mark.parametrize("argv, error, message", [
    (("profile", "--shape", "superapriel-15b", "--device", "cpu", "--out", "x.json"), ConfigError,
     "this run has no CUDA device"),
    (("profile", "--shape", "llama", "--device", "cpu", "--out", "x.json"), ConfigError, "--shape 'llama' is unknown"),
    (("profile", "--checkpoint", "{ckpt}", "--device", "cpu", "--batches", "4,2", "--out", "x.json"), InvalidRequest,
     "--batches must be increasing"),
    (("evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--placement", "AAA", "--out", "q.json"),
     InvalidPlacement, "has 3 layers but the model has 6"),
    (("evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--out", "q.json"), InvalidRequest, "nothing to score"),
    (("fit", "--quality", "missing.json", "--out", "s.json"), ConfigError, "cannot read this quality table file"),
    (("frontier", "--cost-model", "regression", "--out", "p.json"), InvalidRequest, "give --surrogate"),
])
def test_bad_input_is_refused_with_exit_2(argv, error, message, tiny_checkpoint, data_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(ckpt=tiny_checkpoint, data=data_file) for a in argv]
    with pytest.raises(error) as caught:
        run(*argv)
    assert message in caught.value.message and caught.value.exit_code == 2
    assert isinstance(caught.value, SupernetError)


def test_sampling_is_even_over_counts_and_prefix_stable():
    many = evaluation.sample_placements(6, 200, seed=1)
    assert len({p.code for p in many}) == 200
    assert [p.code for p in evaluation.sample_placements(6, 50, seed=1)] == [p.code for p in many[:50]]
    attention_counts = [p.counts()[Mixer.ATTENTION] for p in many]
    assert min(attention_counts) == 0 and max(attention_counts) == 6  # extremes are drawn, not only ~1.5 per mixer
    with pytest.raises(ConfigError):
        evaluation.sample_placements(1, 5, seed=0)


def test_windows_and_jsonl_data(tmp_path):
    assert evaluation.make_windows([list(range(10))], 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert evaluation.make_windows([list(range(9)), [5, 6]], 4, max_tokens=7) == [[0, 1, 2, 3], [4, 5, 6]]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a b"}\n\n{"text": "c"}\n')
    assert evaluation.read_texts(jsonl) == ["a b", "c"]
    jsonl.write_text('{"text": "a"}\n{"body": "c"}\n')
    with pytest.raises(InvalidRequest, match=r"d.jsonl:2: each line must be an object with a \"text\" string"):
        evaluation.read_texts(jsonl)
