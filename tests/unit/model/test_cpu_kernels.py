"""The numba decode kernels (workers/model/cpu_kernels.py) against the plain-torch path they replace.

Two copies of one pool, one stepped by each path: the logits and every byte of the pool they write agree
to fp32 rounding, for every mixer, mixed batches with prefill rows beside decode rows, small pages and
windows that wrap their ring."""

import pytest
import torch

from workers.generate import request_pool
from workers.model.batch import CacheRows, ForwardBatch
from workers.model.cpu_kernels import CpuKernels
from workers.model.loader import load_checkpoint

CODES = ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS", "KGSAGK"]


@pytest.fixture(scope="module")
def kernel_model(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint, kernels="torch")
    model.use_kernels(CpuKernels())
    return model


def test_the_cpu_model_loads_with_the_kernels(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)  # kernels="auto"
    assert all(isinstance(block.by_kind[m].kernels, CpuKernels) for block in model.blocks for m in block.by_kind)


@pytest.mark.parametrize("page_tokens", [None, 4, 7])
def test_kernels_step_like_the_torch_path(tiny_model, kernel_model, page_tokens):
    generator = torch.Generator().manual_seed(page_tokens or 0)
    placements = [tiny_model.config.placement(code) for code in CODES]
    pool, blocks = request_pool(tiny_model, [(p, 80) for p in placements], page_tokens)
    pool.fill_random(generator)
    twin, twin_blocks = request_pool(tiny_model, [(p, 80) for p in placements], page_tokens)
    twin.arena.data.copy_(pool.arena.data)
    assert [b.row for b in blocks] == [b.row for b in twin_blocks]
    rows = [b.row for b in blocks]
    starts = [0, 3, 15, 16, 29, 61]  # inside, at and past the window of 16 (the ring wraps)
    lengths = [[1], [1], [9], [1], [4], [1]]
    for step in range(3):  # decode rows beside prefill rows, then all decode
        tokens = [torch.randint(4, 2048, (n,), generator=generator).tolist() for n in (lengths[i][0] if step == 0
                                                                                      else 1 for i in range(6))]
        expected = tiny_model(ForwardBatch.build(tokens, placements, starts, CacheRows(pool.arena, pool.tables, rows)),
                              all_logits=True)
        got = kernel_model(ForwardBatch.build(tokens, placements, starts, CacheRows(twin.arena, twin.tables, rows)),
                           all_logits=True)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        as_float = (pool.arena.data.view(torch.float32), twin.arena.data.view(torch.float32))
        torch.testing.assert_close(as_float[1], as_float[0], rtol=1e-4, atol=1e-5)
        starts = [s + len(t) for s, t in zip(starts, tokens)]


def test_a_bfloat16_model_takes_the_torch_path(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint, dtype=torch.bfloat16)
    placement = model.config.placement("ASGKAS")
    pool, (blocks,) = request_pool(model, [(placement, 8)])
    group = ForwardBatch.build([[5]], [placement], [0], CacheRows(pool.arena, pool.tables, [blocks.row])).groups(0)
    assert not CpuKernels().supports(next(iter(group.values())))
    logits = model(ForwardBatch.build([[5]], [placement], [0], CacheRows(pool.arena, pool.tables, [blocks.row])))
    assert torch.isfinite(logits).all()
