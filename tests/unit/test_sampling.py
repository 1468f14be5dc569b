"""The batched sampler: the right distribution per row, top-k / top-p supports, and rows independent of their batch."""

import math

import pytest
import torch

from workers.sampling import SamplingParams, sample_rows

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])


def draws(params: SamplingParams, n: int, seed: int = 0, logits=None) -> list[int]:
    logits = PROBS.log() if logits is None else logits
    generator = torch.Generator().manual_seed(seed)
    return [sample_rows(logits[None], [params], [generator])[0] for _ in range(n)]


def frequencies(tokens: list[int], vocab: int = len(PROBS)) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


def chi_square_ok(tokens: list[int], expected: torch.Tensor) -> bool:
    """Pearson's test at about the 0.1% level (df = support - 1)."""
    support = expected > 0
    observed = torch.bincount(torch.tensor(tokens), minlength=len(expected)).double()
    want = expected.double() * len(tokens)
    stat = float(((observed[support] - want[support]) ** 2 / want[support]).sum())
    df = int(support.sum()) - 1
    return stat < df + 3.3 * math.sqrt(2 * df) + 6  # well above the 99.9% quantile for df <= 4


def test_temperature_one_draws_the_softmax():
    tokens = draws(SamplingParams(temperature=1.0), 4000)
    assert chi_square_ok(tokens, PROBS)


def test_temperature_sharpens_and_flattens():
    sharp = frequencies(draws(SamplingParams(temperature=0.5), 3000))
    flat = frequencies(draws(SamplingParams(temperature=2.0), 3000))
    assert sharp[0] > 0.6 and flat[0] < 0.45
    expected = torch.softmax(PROBS.log() / 0.5, dim=-1)
    assert chi_square_ok(draws(SamplingParams(temperature=0.5), 3000, seed=1), expected)


def test_top_k_keeps_the_k_most_likely():
    tokens = draws(SamplingParams(temperature=1.0, top_k=2), 3000)
    assert set(tokens) == {0, 1}
    assert chi_square_ok(tokens, torch.tensor([2 / 3, 1 / 3, 0, 0, 0]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    tokens = draws(SamplingParams(temperature=1.0, top_p=0.8), 3000)  # 0.5 + 0.25 < 0.8 <= 0.9
    assert set(tokens) == {0, 1, 2}
    assert chi_square_ok(tokens, torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9)


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams()] * 6
    assert sample_rows(logits, params, [None] * 6) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("seed", range(3))
def test_a_row_draws_the_same_tokens_whatever_shares_its_batch(seed):
    vocab, steps = 40, 30
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(steps, 4, vocab, generator=gen)
    params = [SamplingParams(temperature=0.9, top_k=10, seed=7), SamplingParams(),
              SamplingParams(temperature=1.3, top_p=0.7, seed=8), SamplingParams(temperature=0.7, seed=9)]
    batched_generators = [p.generator("cpu") for p in params]
    batched = [sample_rows(logits[t], params, batched_generators) for t in range(steps)]
    for row, p in enumerate(params):
        alone_generator = p.generator("cpu")
        alone = [sample_rows(logits[t, row][None], [p], [alone_generator])[0] for t in range(steps)]
        assert alone == [step[row] for step in batched]
