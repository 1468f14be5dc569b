"""The CUDA kernel set (workers/model/kernels.py: Triton decode + fla's chunked prefill) against plain torch.

Run on the GPU machine: `python -m pytest -q tests/gpu -s` (skipped without CUDA). The decode kernels alone
are also checked by tests/unit/model/test_triton_kernels.py, on a CPU under Triton's interpreter.
"""

import pytest
import torch

from workers.generate import request_pool
from workers.model.batch import CacheRows, ForwardBatch
from workers.model.loader import load_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CODES = ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS", "KGSAGK"]


def run(model, schedule, page_tokens=16):
    placements = [model.config.placement(code) for code in CODES]
    pool, blocks = request_pool(model, [(p, 128) for p in placements], page_tokens)
    rows, starts, logits = [b.row for b in blocks], [0] * len(CODES), []
    for tokens in schedule:
        batch = ForwardBatch.build(tokens, placements, starts, CacheRows(pool.arena, pool.tables, rows), "cuda")
        logits.append(model(batch, all_logits=True).float())
        starts = [s + len(t) for s, t in zip(starts, tokens)]
    return logits


def schedule(seed):
    generator = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(4, 2048, (n,), generator=generator).tolist()

    steps = [[tokens(n) for n in (1, 37, 100, 5, 64, 29)], [tokens(n) for n in (1, 9, 1, 17, 1, 4)]]
    return steps + [[tokens(1) for _ in CODES] for _ in range(3)]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_cuda_kernels_step_like_the_torch_path(checkpoint, dtype):
    """Prefill (fla, variable length, from pooled states) and decode (Triton, in place): fp32 to the tf32
    rounding of fla's matmuls; bf16 no further from the fp32 truth than torch's own bf16 path."""
    from workers.model.kernels import TritonKernels

    steps = schedule(int(dtype == torch.bfloat16))
    truth = run(load_checkpoint(checkpoint, device="cuda", kernels="torch"), steps)
    fast = load_checkpoint(checkpoint, device="cuda", dtype=dtype, kernels="torch")
    fast.use_kernels(TritonKernels())
    got = run(fast, steps)
    if dtype == torch.float32:
        for a, b in zip(got, truth):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
        return
    plain = run(load_checkpoint(checkpoint, device="cuda", dtype=dtype, kernels="torch"), steps)
    for step, (a, b, t) in enumerate(zip(got, plain, truth)):
        kernel_error = float((a - t).norm() / t.norm())
        torch_error = float((b - t).norm() / t.norm())
        assert kernel_error <= 1.5 * torch_error + 5e-3, (step, kernel_error, torch_error)


def test_an_uncached_forward_runs_the_chunked_kernels(checkpoint):
    """Scoring and training batches (no cache) run every GDN/KDA row through fla's chunked call."""
    from workers.model.kernels import TritonKernels

    plain = load_checkpoint(checkpoint, device="cuda", kernels="torch")
    fast = load_checkpoint(checkpoint, device="cuda", kernels="torch")
    fast.use_kernels(TritonKernels())
    tokens = torch.randint(4, 2048, (3, 50), generator=torch.Generator().manual_seed(0)).cuda()
    placements = [plain.config.placement(code) for code in ("GGGGGG", "KKKKKK", "KGSAGK")]
    torch.testing.assert_close(fast(ForwardBatch.dense(tokens, placements), all_logits=True),
                               plain(ForwardBatch.dense(tokens, placements), all_logits=True), rtol=1e-2, atol=1e-2)


def test_cuda_loads_pick_the_cuda_kernels(checkpoint):
    from workers.model.kernels import TritonKernels

    model = load_checkpoint(checkpoint, device="cuda", dtype=torch.bfloat16)
    assert all(isinstance(block.by_kind[m].kernels, TritonKernels) for block in model.blocks for m in block.by_kind)
