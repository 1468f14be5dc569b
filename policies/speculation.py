"""Self-speculative decoding arithmetic: what a draft placement buys a target placement. Pure, no torch.

A draft placement of the same supernet proposes ``k`` tokens one at a time; the
target checks them in one (k+1)-token step and keeps the longest agreeing prefix
plus one token of its own. With a per-token acceptance rate ``a`` (independent
tokens, the usual model), a verify step yields

    E[tokens] = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

for the cost of k draft steps and one verify step of k+1 tokens. The router
speculates only where that wins (``policies.routing.policy``): the shared MLPs
dominate a step's weight reads, so at small batches and short contexts a draft
step costs nearly what a target step does, and speculation loses.
"""

from __future__ import annotations

import numpy as np

from policies.errors import InvalidRequest

MAX_DRAFT_TOKENS = 8  # the most tokens a draft may propose per verify step (the pools size their slack for it)


def expected_tokens(acceptance: float, tokens: int) -> float:
    """Tokens one verify step yields on average, given the per-token acceptance rate and ``tokens`` proposed."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"an acceptance rate is in [0, 1], got {acceptance}")
    return float(_expected(acceptance, np.float64(tokens)))


def check_draft_tokens(tokens: int) -> None:
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_DRAFT_TOKENS:
        raise InvalidRequest(f"draft tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {tokens!r}")


LIVE_MIN_PROPOSALS = 200  # proposals a pair's live rate needs before it replaces the table's


class AcceptanceRates:
    """Per-token acceptance rates by (target code, draft code), greedy and sampled: an acceptance table's
    (``policies.tables.AcceptanceFile``, measured on its own prompts) until the service has examined
    ``LIVE_MIN_PROPOSALS`` of the pair's proposals on its own traffic (``observe``); from then on that live
    rate, for greedy and sampled alike. Acceptance depends on the text: the default checkpoint's table says
    0.76 for the quality preset drafted by the fastest, on its held-out text; GuideLLM's synthetic prompts
    got 0.54, where speculating made every such request slower."""

    __slots__ = ("_rates", "_live")

    def __init__(self, rates: dict[tuple[str, str], tuple[float, float]]):
        self._rates = dict(rates)
        self._live: dict[tuple[str, str], float] = {}

    def observe(self, target: str, draft: str, accepted: int, examined: int) -> None:
        """The service's own count for a pair (``accepted`` of ``examined`` proposals, all replicas, since
        they started); a pair the table does not rate stays unrated (the policy drafts only what it rates)."""
        if (target, draft) in self._rates and examined >= LIVE_MIN_PROPOSALS:
            self._live[(target, draft)] = accepted / examined

    @classmethod
    def from_table(cls, table) -> "AcceptanceRates":
        return cls({(e.target, e.draft): (e.greedy.acceptance_rate, e.sampled.acceptance_rate) for e in table.entries})

    def rate(self, target: str, draft: str, sampled: bool) -> float | None:
        live = self._live.get((target, draft))
        if live is not None:
            return live
        found = self._rates.get((target, draft))
        return None if found is None else found[1 if sampled else 0]

    def drafts_of(self, target: str) -> list[str]:
        return [draft for (t, draft) in self._rates if t == target]

    def __len__(self) -> int:
        return len(self._rates)


def speculative_tpot(acceptance: float, tokens: np.ndarray, draft_step_ms, verify_step_ms,
                     draft_prefill_ms, output_tokens: float) -> np.ndarray:
    """Predicted time per output token with speculation, for each draft length in ``tokens`` (k).

    A round is k draft steps and one verify step (``verify_step_ms``: per k, the target's step with the k
    extra tokens of every verifying row) and yields ``expected_tokens`` tokens; the draft's prefill of the
    prompt (after the first token) is spread over the ``output_tokens``."""
    expected = _expected(acceptance, tokens)
    return (tokens * draft_step_ms + verify_step_ms) / expected + draft_prefill_ms / max(output_tokens - 1.0, 1.0)


def _expected(acceptance: float, tokens: np.ndarray) -> np.ndarray:
    if acceptance >= 1.0:
        return tokens + 1.0
    return (1.0 - acceptance ** (tokens + 1.0)) / (1.0 - acceptance)
