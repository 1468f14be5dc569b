"""Speculative sampling keeps the target's distribution whatever the draft's (vLLM's rejection-sampler
test idea: a small vocabulary, many draws, the emitted tokens' frequencies against the target's)."""

import pytest
import torch

from workers.sampling import SamplingParams, distributions, draw, greedy_accept, speculative_sample

VOCAB, DRAWS = 6, 30_000


def frequencies(sampler, target, draft, seed=0):
    """How often each token is the first one emitted, the draft's proposal drawn from q each time."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB)
    for _ in range(DRAWS):
        proposal = draw(draft[0], generator)
        counts[sampler(target, draft, [proposal], generator)[0]] += 1
    return counts / DRAWS


def skip_resampling(target, draft, proposals, generator):
    """A broken sampler: on a rejection it draws from p instead of max(0, p - q)."""
    token = proposals[0]
    if float(torch.rand((), generator=generator)) * float(draft[0, token]) < float(target[0, token]):
        return [token]
    return [draw(target[0], generator)]


@pytest.fixture
def far_apart():
    p = torch.tensor([[0.50, 0.25, 0.10, 0.10, 0.04, 0.01], [1 / 6] * 6])
    q = torch.tensor([[0.02, 0.08, 0.10, 0.20, 0.30, 0.30]])
    return p, q


def test_the_first_token_follows_the_target_and_a_sampler_without_resampling_does_not(far_apart):
    p, q = far_apart
    tv = 0.5 * (frequencies(speculative_sample, p, q) - p[0]).abs().sum()
    broken = 0.5 * (frequencies(skip_resampling, p, q) - p[0]).abs().sum()
    # the standard error of each frequency at 30k draws is under 0.003: the real sampler is within noise
    assert tv < 0.015, tv
    assert broken > 0.1, broken


def test_the_bonus_token_follows_the_last_target_distribution():
    generator = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.0, 1.0, 0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4, 0.0, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0, 0, 0, 0]])
    counts = torch.zeros(VOCAB)
    for _ in range(DRAWS):
        kept = speculative_sample(p, q, [1], generator)
        assert kept[0] == 1 and len(kept) == 2  # p == q there: always kept
        counts[kept[1]] += 1
    assert 0.5 * (counts / DRAWS - p[1]).abs().sum() < 0.015


def test_a_token_the_target_never_emits_is_always_rejected():
    generator = torch.Generator().manual_seed(2)
    p = torch.tensor([[0.0, 0.5, 0.5, 0, 0, 0]] * 3)
    q = torch.tensor([[1.0, 0, 0, 0, 0, 0]] * 2)
    for _ in range(200):
        kept = speculative_sample(p, q, [0, 0], generator)
        assert len(kept) == 1 and kept[0] in (1, 2)


def test_distributions_apply_temperature_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    plain = distributions(logits, SamplingParams(temperature=1.0))
    torch.testing.assert_close(plain, torch.softmax(logits, -1))
    top2 = distributions(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (top2[0, 2:] == 0).all() and torch.isclose(top2.sum(), torch.tensor(1.0))
    nucleus = distributions(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert (nucleus[0, 2:] == 0).all() and nucleus[0, 1] > 0  # 0.64 < 0.7: the second token is needed


def test_greedy_acceptance_keeps_the_agreeing_prefix_and_the_targets_next_token():
    assert greedy_accept([5, 6, 7, 8], [5, 6, 9]) == [5, 6, 7]
    assert greedy_accept([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]
    assert greedy_accept([4, 6, 7, 8], [5, 6, 7]) == [4]
