"""The Triton decode kernels (workers/model/triton_kernels.py) against the plain-torch path, on the CPU under
TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU), so CI runs them; on a GPU they run compiled.

Two copies of one pool, one stepped by each path, as test_cpu_kernels.py: logits and pool bytes agree for
every mixer, decode rows beside prefill rows, pages of several sizes, windows that wrap their ring, rows
whose slots span several split-K runs, and padded rows (the null block) that must read and write nothing."""

import pytest
import torch

from workers.generate import request_pool
from workers.model.batch import CacheRows, ForwardBatch
from workers.model.cache import NULL_BLOCK
from workers.model.loader import load_checkpoint

pytest.importorskip("triton")

CODES = ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS", "KGSAGK"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def models(request, tiny_checkpoint):
    """(torch path, kernel path) in the dtype, and the fp32 torch path the bf16 ones are both judged against."""
    from workers.model.kernels import TritonKernels

    reference = load_checkpoint(tiny_checkpoint, device=DEVICE, dtype=request.param, kernels="torch")
    model = load_checkpoint(tiny_checkpoint, device=DEVICE, dtype=request.param, kernels="torch")
    model.use_kernels(TritonKernels(chunk=False))  # decode kernels only: fla's chunked ones need a GPU
    oracle = reference if request.param == torch.float32 else load_checkpoint(tiny_checkpoint, device=DEVICE,
                                                                              kernels="torch")
    return reference, model, oracle


def assert_close(got, expected):
    """To fp32 rounding; bf16 at torch's default bf16 tolerance (same path, same inputs: only batch shapes differ)."""
    tolerance = dict(rtol=1e-4, atol=1e-4) if expected.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, expected, **tolerance)


def twin_pools(model, placements, capacity, page_tokens, seed):
    """Two pools holding the same random caches for the same sequences (one per path)."""
    pool, blocks = request_pool(model, [(p, capacity) for p in placements], page_tokens)
    pool.fill_random(torch.Generator().manual_seed(seed))
    twin, twin_blocks = request_pool(model, [(p, capacity) for p in placements], page_tokens)
    twin.arena.data.copy_(pool.arena.data)
    assert [b.row for b in blocks] == [b.row for b in twin_blocks]
    return pool, twin, [b.row for b in blocks]


def relative_error(got, oracle):
    return float((got.float() - oracle).norm() / oracle.norm())


def run(model, placements, schedule, page_tokens):
    """Logits of every step of ``schedule`` (new tokens per row per step) from an empty pool, and the pool."""
    pool, blocks = request_pool(model, [(p, 80) for p in placements], page_tokens)
    rows, starts, logits = [b.row for b in blocks], [0] * len(placements), []
    for tokens in schedule:
        batch = ForwardBatch.build(tokens, placements, starts, CacheRows(pool.arena, pool.tables, rows), DEVICE)
        logits.append(model(batch, all_logits=True))
        starts = [s + len(t) for s, t in zip(starts, tokens)]
    return logits, pool


# The kernels address the arena in elements of its dtype, the same arithmetic for every page size: fp32 checks
# both page sizes, bf16 (its loads, stores, casts and 2-byte elements) the odd one, 7, alone. Interpreted, each run
# is ~20 s of CI, and bf16 with 4-token pages would check nothing these three do not.
@pytest.mark.parametrize("models, page_tokens", [(torch.float32, 4), (torch.float32, 7), (torch.bfloat16, 7)],
                         indirect=["models"], ids=["fp32-4", "fp32-7", "bf16-7"])
def test_kernels_step_like_the_torch_path(models, page_tokens):
    """Prefill, then decode rows beside rows that prefill more, then decode past the window of 16 (rings wrap).
    fp32: the same logits and pool bytes to rounding. bf16: both paths round every layer to 8 bits, differently
    (the kernels sum in fp32), so each is judged against fp32: the kernels may not be less accurate than torch."""
    reference, model, oracle = models
    placements = [model.config.placement(code) for code in CODES]
    generator = torch.Generator().manual_seed(page_tokens)

    def tokens(n):
        return torch.randint(4, 2048, (n,), generator=generator).tolist()

    schedule = [[tokens(n) for n in (1, 3, 15, 16, 9, 29)], [tokens(n) for n in (1, 4, 1, 4, 1, 4)]]
    # Two steps of decode rows only: the first reads caches the torch prefill wrote (and those the kernels wrote
    # beside it), the second only ones the kernels wrote; KGSAGK's window ring has wrapped (33 tokens of 16/21).
    schedule += [[tokens(1) for _ in CODES] for _ in range(2)]
    expected, pool = run(reference, placements, schedule, page_tokens)
    got, twin = run(model, placements, schedule, page_tokens)
    if model.dtype == torch.float32:
        for a, b in zip(got, expected):
            assert_close(a, b)
        assert_close(twin.arena.elements(torch.float32), pool.arena.elements(torch.float32))  # every byte
        return
    truth, _ = run(oracle, [oracle.config.placement(code) for code in CODES], schedule, page_tokens)
    for step, (a, b, t) in enumerate(zip(got, expected, truth)):
        kernel_error, torch_error = relative_error(a, t.float()), relative_error(b, t.float())
        assert kernel_error <= 1.5 * torch_error + 5e-3, (step, kernel_error, torch_error)


def test_paged_attention_over_many_split_runs(models, monkeypatch):
    """Long rows split into several runs (split-K), combined by log-sum-exp, equal the one-pass torch path."""
    from workers.model import kernels

    monkeypatch.setattr(kernels, "SPLIT_MIN_SLOTS", 32)
    reference, model, _ = models
    if model.dtype != torch.float32:
        pytest.skip("the split arithmetic is dtype-blind: fp32 compares it exactly")
    placements = [model.config.placement(code) for code in ("AAAAAA", "SSSSSS", "AAAAAA")]
    pool, twin, rows = twin_pools(model, placements, 300, 16, seed=3)
    starts, tokens = [200, 250, 37], [[5], [6], [7]]
    expected = reference(ForwardBatch.build(tokens, placements, starts, CacheRows(pool.arena, pool.tables, rows),
                                            DEVICE))
    got = model(ForwardBatch.build(tokens, placements, starts, CacheRows(twin.arena, twin.tables, rows), DEVICE))
    assert_close(got, expected)


def test_padded_rows_read_and_write_nothing(models):
    """A row whose table row is all null blocks (a captured batch's padding) touches no block but the null one,
    and the live row beside it gets the logits it gets alone."""
    _, model, _ = models
    placement = model.config.placement("ASGKAS")
    pool, (live, padding) = request_pool(model, [(placement, 24), (placement, 24)], 4)
    pool.release(padding)  # its table row now points at the null block only
    assert (pool.tables.pages_host[padding.row] == NULL_BLOCK).all()
    pool.fill_random(torch.Generator().manual_seed(5))
    alone = pool.arena.data.clone()
    before = pool.arena.data.clone()
    padded = model(ForwardBatch.build([[5], [6]], [placement] * 2, [10, 10],
                                      CacheRows(pool.arena, pool.tables, [live.row, padding.row]), DEVICE))
    changed = set((pool.arena.data != before).any(dim=1).nonzero().flatten().tolist())
    assert changed - {NULL_BLOCK} <= set(live.block_ids) and changed - {NULL_BLOCK}
    pool.arena.data.copy_(alone)
    single = model(ForwardBatch.build([[5]], [placement], [10], CacheRows(pool.arena, pool.tables, [live.row]),
                                      DEVICE))
    assert_close(padded[:1], single)
