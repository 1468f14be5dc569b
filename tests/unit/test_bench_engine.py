"""``supernet-router bench engine`` on the tiny checkpoint (CPU): results file, floors, auto batch, presets."""

import argparse
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from policies.errors import SupernetError
from policies.placement import MIXERS, Placement
from policies.published import PUBLISHED_PRESETS
from router import bench_cli
from workers import benchmark
from workers.engine.runner import ModelRunner
from workers.model.config import parse_config, supernet_config_dict
from workers.profiling import SHAPES


def main(*argv) -> int:
    """The ``bench`` group as router/cli.py runs it: errors become one line on stderr and their exit code."""
    parser = argparse.ArgumentParser(prog="supernet-router")
    bench_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    try:
        return args.run(args)
    except SupernetError as exc:
        print(f"supernet-router: error: {exc.message}", file=sys.stderr)
        return exc.exit_code


def bench(checkpoint, tmp_path, *extra) -> tuple[dict, list[str]]:
    out = tmp_path / "x.json"
    return out, ("bench", "engine", "--checkpoint", checkpoint, "--device", "cpu", "--steps", "3", "--warmup", "1",
                 "--out", out, *extra)


def test_bench_engine_writes_one_entry_per_placement_and_context(tiny_checkpoint, tiny_model, tmp_path, capsys):
    out, argv = bench(tiny_checkpoint, tmp_path, "--placements", "AAAAAA,GGGGGG", "--context", "64,128", "--batch", "2")
    assert main(*argv) == 0
    results = json.loads(out.read_text())
    assert results["format"] == "supernet-router/bench-engine" and results["version"] == 1
    assert results["device"].startswith("cpu: ") and results["num_layers"] == 6 and results["kernels"] == "numba"
    assert results["bandwidth"]["bytes_per_s"] > 0
    entries = results["results"]
    assert sorted((e["code"], e["context"]) for e in entries) == [("AAAAAA", 64), ("AAAAAA", 128),
                                                                   ("GGGGGG", 64), ("GGGGGG", 128)]
    memory = tiny_model.config.memory_model(kv_bytes=4)
    for e in entries:
        assert e["batch"] == 2 and e["batch_mode"] == "given" and e["skipped"] is None
        assert e["floor_ms"] > 0 and e["step_ms"] > 0 and e["step_ms_p90"] >= e["step_ms"]
        assert e["tokens_per_s"] == pytest.approx(2 / (e["step_ms"] / 1e3))
        assert e["cache_bytes"] == 2 * memory.sequence_bytes(Placement.parse(e["code"]), e["context"] + 1)
        if e["code"] == "AAAAAA":
            assert e["speedup"] == 1.0
        else:
            assert e["speedup"] == pytest.approx(e["tokens_per_s"] / next(
                b["tokens_per_s"] for b in entries if b["code"] == "AAAAAA" and b["context"] == e["context"]))
    # The attention floor grows with the context; GDN's state does not.
    floors = {(e["code"], e["context"]): e["floor_bytes"] for e in entries}
    assert floors["AAAAAA", 128] > floors["AAAAAA", 64] and floors["GGGGGG", 128] == floors["GGGGGG", 64]

    printed = capsys.readouterr().out.strip().splitlines()
    assert re.match(r"placement\s+A/S/K/G\s+context", printed[1]) and len(printed) == 2 + 4 + 2
    summary = json.loads(printed[-1])  # what bench/report.py record reads
    assert summary["speedup"]["AAAAAA"] == [1.0, 1.0] and len(summary["tokens_per_s"]["GGGGGG"]) == 2
    assert summary["params"]["points"] == [[64, 2], [128, 2]]


def test_batch_auto_fills_the_cache_budget(tiny_checkpoint, tiny_model, tmp_path):
    budget = 300_000
    out, argv = bench(tiny_checkpoint, tmp_path, "--placements", "all-attention,all-gdn,ASGKAS", "--context", "64",
                      "--batch", "auto", "--cache-budget-bytes", budget, "--max-batch", "6")
    assert main(*argv) == 0
    memory = tiny_model.config.memory_model(kv_bytes=4)
    for e in json.loads(out.read_text())["results"]:
        per_row = memory.sequence_bytes(Placement.parse(e["code"]), 65)
        usable = memory.usable_bytes(budget)  # a pool on the budget lends all its blocks but the null one
        assert e["batch_mode"] == "auto" and e["sequence_bytes"] == per_row
        assert e["batch"] == min(6, memory.max_sequences(Placement.parse(e["code"]), 65, usable))
        assert e["batch"] == 6 or (e["batch"] * per_row <= usable < (e["batch"] + 1) * per_row)
        assert e["cache_bytes"] == e["batch"] * per_row <= usable
    batches = {e["code"]: e["batch"] for e in json.loads(out.read_text())["results"]}
    # 8,192-byte blocks (32-token pages), 35 lent; a row at 65 tokens takes 18 / 6 / 10 blocks
    assert memory.block_bytes == 8192 and memory.usable_blocks(budget) == 35
    assert batches == {"AAAAAA": 1, "GGGGGG": 5, "ASGKAS": 3}


def test_auto_batch_matches_the_memory_model(tiny_model):
    memory = tiny_model.config.memory_model(kv_bytes=4)
    for code in ("AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS"):
        placement = Placement.parse(code)
        for budget in (10_000, 200_000, 5_000_000):
            fits = memory.max_sequences(placement, 1025, memory.usable_bytes(budget))
            assert benchmark.auto_batch(memory, placement, 1024, budget, 256) == min(256, fits)


def test_a_budget_too_small_for_one_row_is_reported_not_run(tiny_checkpoint, tmp_path):
    out, argv = bench(tiny_checkpoint, tmp_path, "--placements", "AAAAAA", "--context", "64",
                      "--cache-budget-bytes", 1000)
    assert main(*argv) == 0
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["batch"] == 0 and entry["step_ms"] is None and "budget is 1,000" in entry["skipped"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_the_15b_shape_without_cuda_fails_with_one_line(device, capsys):
    assert main("bench", "engine", "--shape", "superapriel-15b", "--device", device) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "--checkpoint" in err


def test_router_cli_registers_bench():
    from router import cli

    if "bench_cli" not in Path(cli.__file__).read_text():
        pytest.skip("router/cli.py does not call bench_cli.register(commands) yet")
    if not torch.cuda.is_available():
        assert cli.main(["bench", "engine", "--shape", "superapriel-15b"]) == 2


@pytest.mark.parametrize("preset", PUBLISHED_PRESETS, ids=lambda p: p.name)
def test_published_counts_are_spread_exactly_and_evenly(preset):
    placement = bench_cli.spread(preset.counts())
    assert len(placement) == 48 and placement.counts() == preset.counts()
    for mixer, n in preset.counts().items():
        layers = placement.layers_with(mixer)
        if n:  # evenly: no run without the mixer much longer than 48 / n layers, at the ends included
            gaps = [b - a for a, b in zip([-1, *layers], [*layers, 48])]
            assert max(gaps) <= math.ceil(48 / n) + 2, (mixer, layers)


def test_names_resolve_to_spread_presets_with_their_published_speedups():
    config = parse_config(supernet_config_dict(**SHAPES["superapriel-15b"]))
    named = bench_cli.resolve_placements(None, config)
    assert [n.name for n in named] == ["all-attention", *(p.name for p in PUBLISHED_PRESETS[1:]), "all-gdn"]
    assert named[0].placement.code == "A" * 48 and named[-1].placement.code == "G" * 48
    assert named[-1].published is None and named[0].published.speedup_32k == 1.0
    for n, preset in zip(named[1:], PUBLISHED_PRESETS[1:]):
        assert n.published is preset and n.placement.counts() == preset.counts()


def test_presets_scale_to_a_smaller_model_without_published_speedups(tiny_model):
    named = bench_cli.resolve_placements(None, tiny_model.config)
    assert all(len(n.placement) == 6 and n.published is None for n in named)
    for preset in PUBLISHED_PRESETS:
        scaled = bench_cli.scale_counts(preset.counts(), 6)
        assert sum(scaled.values()) == 6 and set(scaled) == set(MIXERS)
        assert all(abs(scaled[m] - preset.counts()[m] * 6 / 48) < 1 for m in MIXERS)
    with pytest.raises(SupernetError, match="neither a code"):
        bench_cli.resolve_placements(["Reg/Lklhd-99"], tiny_model.config)


def test_floor_counts_active_weights_and_each_rows_cache(tiny_model):
    memory = tiny_model.config.memory_model(kv_bytes=4)
    floor = benchmark.StepFloor(tiny_model, memory)
    attention, gdn = Placement.parse("AAAAAA"), Placement.parse("GGGGGG")
    inactive = sum(benchmark.parameter_bytes(m) for b in tiny_model.blocks for k, m in b.by_kind.items()
                   if k.value != "attention")
    table = tiny_model.model.embed_tokens.weight
    assert floor.weight_bytes(attention, 0) + inactive + table.numel() * 4 == benchmark.parameter_bytes(tiny_model)
    def read(placement, context):  # the tokens' and states' own bytes, not the pages reserved for them
        return sum(memory.layers[i][m].cache_bytes(context, 4, 4) for i, m in enumerate(placement))

    assert floor.row_cache_bytes(attention, 100) == read(attention, 100) < memory.sequence_bytes(attention, 100)
    assert floor.row_cache_bytes(gdn, 100) == 2 * read(gdn, 100)  # the state is read and written
    assert floor(gdn, 100, 3) == floor.weight_bytes(gdn, 3) + 3 * floor.row_cache_bytes(gdn, 100)


def test_prefilled_rows_run_the_engine_step_at_the_same_context(tiny_model):
    placement = Placement.parse("ASGKAS")
    memory = tiny_model.config.memory_model(kv_bytes=4)
    step, pool = benchmark.prefilled_rows(tiny_model, memory, placement, 20, 3, seed=0)  # past the window of 16
    runner = ModelRunner(tiny_model, pool)
    tokens = runner.run(step)
    assert len(tokens) == 3 and all(len(t) == 1 and 0 <= t[0] < tiny_model.config.vocab_size for t in tokens)
    assert pool.held_bytes == 3 * memory.sequence_bytes(placement, 21) == pool.usable_bytes
    runner.run(step)  # nothing moved the rows on: every step decodes at 20 (states and conv history move on)
    assert all(s.num_computed == 20 for s in step.sequences)
    pool.check_invariants()


def test_the_random_model_is_built_in_its_dtype_without_an_fp32_copy():
    """The --shape path (GPU only) builds this way; here on the CPU in a small shape."""
    from workers.model.tiny import TINY_SHAPE

    config = parse_config(supernet_config_dict(**TINY_SHAPE, num_layers=2, vocab_size=256))
    model = benchmark.random_model(config, torch.device("cpu"), torch.bfloat16, seed=1)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith(("A_log", "dt_bias"))} == {torch.float32}
    assert {d for n, d in dtypes.items() if not n.endswith(("A_log", "dt_bias"))} == {torch.bfloat16}
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert model.blocks[0].mixer.mixers.attention.rotary.inv_freq.dtype == torch.float32
    step, pool = benchmark.prefilled_rows(model, config.memory_model(kv_bytes=2), Placement.parse("AG"), 8, 2, seed=0)
    assert len(ModelRunner(model, pool).run(step)) == 2


def test_speedups_are_over_all_attention_at_the_same_context_beside_the_published_ones():
    config = parse_config(supernet_config_dict(**SHAPES["superapriel-15b"]))
    named = bench_cli.resolve_placements(["all-attention", "Reg/Lklhd-26", "all-gdn"], config)
    entries = [{"placement": n.name, "code": n.placement.code, "context": c, "batch_mode": "auto", "batch": b,
                "tokens_per_s": t} for c in (16384, 32768)
               for n, b, t in zip(named, (8, 21, 256), (400.0, 1000.0, 5000.0 if c == 16384 else None))]
    benchmark.add_speedups(entries, named)
    by = {(e["placement"], e["context"]): e for e in entries}
    assert by["all-attention", 32768]["speedup"] == 1.0 and by["all-attention", 32768]["published_speedup"] == 1.0
    assert by["Reg/Lklhd-26", 16384]["speedup"] == 2.5 and by["Reg/Lklhd-26", 16384]["published_speedup"] == 1.5
    assert by["Reg/Lklhd-26", 32768]["published_speedup"] == 2.85
    assert by["all-gdn", 16384]["speedup"] == 12.5 and by["all-gdn", 16384]["published_speedup"] is None
    assert by["all-gdn", 32768]["speedup"] is None  # not measured (skipped)
