"""Self-speculative decoding arithmetic: what a draft placement buys a target placement. Pure, no torch.

A draft placement of the same supernet proposes ``k`` tokens one at a time; the
target checks them in one (k+1)-token step and keeps the longest agreeing prefix
plus one token of its own. With a per-token acceptance rate ``a`` (independent
tokens, the usual model), a verify step yields

    E[tokens] = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

for the cost of k draft steps and one verify step of k+1 tokens.
"""

from __future__ import annotations

from policies.errors import InvalidRequest

MAX_DRAFT_TOKENS = 8  # the most tokens a draft may propose per verify step (the pools size their slack for it)


def expected_tokens(acceptance: float, tokens: int) -> float:
    """Tokens one verify step yields on average, given the per-token acceptance rate and ``tokens`` proposed."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"an acceptance rate is in [0, 1], got {acceptance}")
    if acceptance == 1.0:
        return tokens + 1.0
    return (1.0 - acceptance ** (tokens + 1)) / (1.0 - acceptance)


def check_draft_tokens(tokens: int) -> None:
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_DRAFT_TOKENS:
        raise InvalidRequest(f"draft tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {tokens!r}")
