"""Decode steps from static buffers (workers/engine/graphs.py), as CUDA graphs replay them.

On a CPU the step runs uncaptured ("eager"): the same static-buffer batch, padded to its bucket with the
padding row, built with device ops only. It must give the logits the ordinary step gives, write the same
blocks, and leave every block but the null one alone for padded rows. The capture itself is tested on the
GPU (tests/gpu/test_decode_graphs.py)."""

import pytest
import torch

from policies.errors import ConfigError
from policies.placement import Placement
from workers import benchmark
from workers.engine import Engine, EngineConfig, Request
from workers.engine.graphs import DecodeGraphs
from workers.engine.runner import ModelRunner
from workers.engine.scheduler import StepBatch
from workers.generate import GenerationRequest, generate
from workers.model.cache import NULL_BLOCK
from workers.sampling import SamplingParams


@pytest.fixture(scope="module", params=["torch", "triton"])
def model(request, tiny_checkpoint):
    """The plain-torch path, and the Triton kernels (under the interpreter on a CPU): both take static steps
    (the numba kernels follow host-side rows, which a static step does not have, and stand aside)."""
    from workers.model.kernels import TritonKernels
    from workers.model.loader import load_checkpoint

    model = load_checkpoint(tiny_checkpoint, kernels="torch")
    if request.param == "triton":
        model.use_kernels(TritonKernels(chunk=False))
    return model


# Every uniform placement on the torch path; on the Triton path (interpreted on a CPU, seconds per launch) ASGKAS
# alone: its layers run each of the four mixers' kernels (A at 0 and 4, S at 1 and 5, G at 2, K at 3) in the same
# static step, so the uniform placements would launch the same kernels again and check nothing new there.
@pytest.mark.parametrize("model, code", [*(("torch", c) for c in ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS"]),
                                         ("triton", "ASGKAS")], indirect=["model"])
def test_the_static_step_gives_the_ordinary_steps_logits_and_writes(model, code):
    placement, memory = Placement.parse(code), model.config.memory_model(kv_bytes=4, page_tokens=4)
    # Pools of 4 rows (buckets 1, 2, 4), 3 of them stepping: the static step pads one row, as a GPU's graphs do.
    step, pool = first_rows(*benchmark.prefilled_rows(model, memory, placement, 21, 4, seed=1), 3)
    twin_step, twin = first_rows(*benchmark.prefilled_rows(model, memory, placement, 21, 4, seed=1), 3)
    assert torch.equal(pool.arena.data, twin.arena.data)
    for s, context in zip(step.sequences + twin_step.sequences, [5, 21, 17] * 2):  # rows of different lengths
        s.num_computed = context
    ordinary = ModelRunner(model, pool)
    static = ModelRunner(model, twin, "eager")
    for _ in range(3):
        expected = ordinary.model(ordinary.prepare(step))
        got = static.graphs.run(placement, [t[0] for t in twin_step.token_ids],
                                [s.num_computed for s in twin_step.sequences], [s.blocks.row for s in twin_step.sequences])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # Every block but the null one (padding writes its keys there) holds the same bytes.
        torch.testing.assert_close(twin.arena.elements(torch.float32)[1:], pool.arena.elements(torch.float32)[1:],
                                   rtol=1e-5, atol=1e-5)
        for s in step.sequences + twin_step.sequences:
            s.num_computed += 1
    assert static.graphs.steps == 3 and static.graphs.buckets == [1, 2, 4]
    pool.check_invariants()
    twin.check_invariants()


def first_rows(step: StepBatch, pool, rows: int) -> tuple[StepBatch, object]:
    """The first ``rows`` rows of ``step`` (the others stay allocated in ``pool``, untouched)."""
    first = StepBatch()
    for sequence, tokens in list(zip(step.sequences, step.token_ids))[:rows]:
        first.add(sequence, tokens, True)
    return first, pool


def test_padding_rows_touch_only_the_null_block(model):
    placement, memory = Placement.parse("ASGKAS"), model.config.memory_model(kv_bytes=4, page_tokens=4)
    step, pool = benchmark.prefilled_rows(model, memory, placement, 9, 5, seed=2)  # 5 rows: bucket 8
    runner = ModelRunner(model, pool, "eager")
    live = step.sequences[0]
    before = pool.arena.data.clone()
    runner.graphs.run(placement, [step.token_ids[0][0]], [live.num_computed], [live.blocks.row])  # 1 row, no pad
    runner.graphs.run(placement, [step.token_ids[0][0]] * 2, [live.num_computed] * 2, [live.blocks.row] * 2)
    changed = set((pool.arena.data != before).any(dim=1).nonzero().flatten().tolist())
    assert changed - {NULL_BLOCK} <= set(live.blocks.block_ids)


def test_the_engine_takes_uniform_decode_steps_from_the_graphs_and_gets_the_same_tokens(model):
    generator = torch.Generator().manual_seed(4)
    requests = []
    # Prompts of 9, 8, 8 and 11 tokens; 2, 4, 6 and 8 new ones (each decode step is seconds of interpreted Triton):
    # the last row ends past the window of 16, and the ASGKAS rows decode alone once the GGGGGG ones finish.
    for i, code in enumerate(["GGGGGG", "GGGGGG", "ASGKAS", "ASGKAS"]):
        prompt = [1] + torch.randint(4, model.config.vocab_size, (int(torch.randint(6, 14, (1,), generator=generator)),),
                                     generator=generator).tolist()
        requests.append(Request(prompt, model.config.placement(code), SamplingParams(max_tokens=2 + 2 * i),
                                request_id=f"r{i}"))
    engine = Engine(model, EngineConfig(cache_budget_bytes=20_000_000, max_prefill_tokens=8, check_invariants=True,
                                        page_tokens=4, decode_graphs="eager"))
    for request in requests:
        engine.add_request(request)
    got = {}
    for event in engine.run_until_idle():
        if event.token_id is not None:
            got.setdefault(event.request_id, []).append(event.token_id)
    assert [len(r.prompt_ids) for r in requests] == [9, 8, 8, 11]
    for request in requests:
        alone = generate(model, [GenerationRequest(list(request.prompt_ids), request.placement, request.params)])[0]
        assert got[request.request_id] == alone.tokens, request.request_id
    assert engine.runner.graphs.steps > 0  # uniform steps: the ASGKAS rows decode alone once the GGGGGG ones finish


def test_capturing_needs_a_cuda_device(tiny_model):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/gpu/test_decode_graphs.py captures")
    memory = tiny_model.config.memory_model(kv_bytes=4)
    _, pool = benchmark.prefilled_rows(tiny_model, memory, Placement.parse("AAAAAA"), 4, 1, seed=0)
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        DecodeGraphs(tiny_model, pool, 1, "capture")
    with pytest.raises(ConfigError, match="decode_graphs must be"):
        EngineConfig(decode_graphs="sometimes")
