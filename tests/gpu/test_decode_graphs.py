"""CUDA graphs of decode steps (workers/engine/graphs.py) on the GPU: a replayed step equals the eager one.

Run on the GPU machine: `python -m pytest -q tests/gpu -s` (skipped without CUDA)."""

import pytest
import torch

from policies.placement import Placement
from workers import benchmark
from workers.engine import Engine, EngineConfig, Request
from workers.engine.runner import ModelRunner
from workers.model.loader import load_checkpoint
from workers.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)  # the Triton/fla kernels


@pytest.mark.parametrize("code", ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS"])
def test_replayed_steps_equal_eager_ones(model, code):
    placement, memory = Placement.parse(code), model.config.memory_model(kv_bytes=2, page_tokens=16)
    step, pool = benchmark.prefilled_rows(model, memory, placement, 40, 5, seed=1)  # bucket 8: 3 padded rows
    twin_step, twin = benchmark.prefilled_rows(model, memory, placement, 40, 5, seed=1)
    eager, captured = ModelRunner(model, pool, "eager"), ModelRunner(model, twin, "capture")
    for _ in range(4):  # the first captures; the later ones replay with moved positions
        args = ([t[0] for t in step.token_ids], [s.num_computed for s in step.sequences])
        expected = eager.graphs.run(placement, *args, [s.blocks.row for s in step.sequences]).clone()
        got = captured.graphs.run(placement, *args, [s.blocks.row for s in twin_step.sequences])
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(twin.arena.data[1:], pool.arena.data[1:])
        for s in step.sequences + twin_step.sequences:
            s.num_computed += 1
    assert captured.graphs.captures == 1 and captured.graphs.steps == 4


def test_an_engine_replays_uniform_steps_and_generates_what_eager_does(model):
    def run(mode):
        engine = Engine(model, EngineConfig(cache_budget_bytes=50_000_000, max_prefill_tokens=16, page_tokens=16,
                                            check_invariants=True, decode_graphs=mode))
        for i in range(6):
            prompt = [1] + list(range(5 + i, 25 + 2 * i))
            engine.add_request(Request(prompt, model.config.placement("GGGGGG" if i % 2 else "ASGKAS"),
                                       SamplingParams(max_tokens=8 + i), request_id=f"r{i}"))
        tokens = {}
        for event in engine.run_until_idle():
            if event.token_id is not None:
                tokens.setdefault(event.request_id, []).append(event.token_id)
        return tokens, engine.runner.graphs

    eager, _ = run("off")
    replayed, graphs = run("capture")
    assert replayed == eager and graphs.captures > 0
