"""The chunked delta rule (CPU prefill and training) is the token-by-token recurrence regrouped: same outputs, states, gradients."""

from __future__ import annotations

import pytest
import torch

from workers.model.layers import l2_normalize
from workers.model.recurrent import chunked_delta_rule, recurrent_delta_rule


def inputs(per_channel: bool, tokens: int, seed: int = 0, rows: int = 2, heads: int = 3, dk: int = 8, dv: int = 5):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k = l2_normalize(randn(rows, tokens, heads, dk)), l2_normalize(randn(rows, tokens, heads, dk))
    v = randn(rows, tokens, heads, dv)
    g = -4 * torch.rand(rows, tokens, heads, *((dk,) if per_channel else ()), generator=generator, dtype=torch.float64)
    beta = torch.rand(rows, tokens, heads, generator=generator, dtype=torch.float64)
    state = randn(rows, heads, dk, dv)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
@pytest.mark.parametrize("tokens,chunk", [(1, 4), (7, 4), (16, 4), (37, 8), (37, 64)])
def test_chunked_equals_recurrent(per_channel, tokens, chunk):
    args = inputs(per_channel, tokens)
    expected_out, expected_state = recurrent_delta_rule(*args, scale=0.35)
    out, state = chunked_delta_rule(*args, scale=0.35, chunk=chunk)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=1e-12)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_chunked_gradients_equal_recurrent(per_channel):
    """Training differentiates the chunked form; its gradients are the recurrence's."""
    def grads(rule, **kw):
        args = [x.clone().requires_grad_() for x in inputs(per_channel, 19, seed=1)]
        out, state = rule(*args, scale=0.5, **kw)
        (out.square().sum() + state.sum()).backward()
        return [x.grad for x in args]

    for got, want in zip(grads(chunked_delta_rule, chunk=8), grads(recurrent_delta_rule)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_strong_decay_does_not_overflow():
    """Decays of e^-50 per token over a chunk would overflow a factored exp(+cumsum); the pairwise form does not."""
    q, k, v, g, beta, state = inputs(True, 32)
    out, final = chunked_delta_rule(q, k, v, g * 12.5, beta, state, scale=1.0, chunk=32)
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    expected_out, _ = recurrent_delta_rule(q, k, v, g * 12.5, beta, state, scale=1.0)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-12)
