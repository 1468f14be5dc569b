"""Self-speculative decoding inside continuous batching: a draft placement proposes, the target verifies.

A request with ``draft`` and ``draft_tokens`` k keeps a second set of caches
for its draft placement (its own table row, reserved with the request). Each
step its sequence runs one row, like any other sequence:

- a **draft row** (the draft placement, its own caches): feeds what the draft
  has not run yet and proposes one token. The first draft row of a round feeds
  the tokens confirmed since the last round (after the prompt, the whole prompt:
  the draft's prefill, chunked like any prompt); the next k - 1 feed one
  proposal each.
- a **verify row** (the target placement): once k tokens are proposed, feeds the
  target's pending tokens plus the k proposals in one multi-token row; the
  target's distributions at the last k + 1 positions decide how many proposals
  are kept (``workers.sampling.speculative_sample``) and give one more token.

Rejected tokens are rolled back. Attention and sliding-window caches roll back
by length: the counters move back, the rejected keys are overwritten later
(a window's ring has k tokens of slack, ``policies.memory``). A recurrent
layer cannot be rewound, so its state is copied to a snapshot block before the
tokens that may be rejected (the pool's ``snapshot``) and put back after a
rejection (``restore``); the kept tokens are then fed again (replay from the
inputs): the target's in a *commit* row beside the draft's next row, the
draft's at the start of its next round. That costs a row of at most k tokens
per rejection and no per-position state: one extra block per recurrent layer,
whatever k.

The counters after a verify step that kept j of k proposals, for a target that
had run n tokens and knew N (N - n pending) and a draft that had run N + k - 1:

- target: all kept -> n + (N - n) + k; else attention-only -> N + j; else
  (restored) n;
- draft: j >= k - 1 -> unchanged (every token it ran is confirmed); else
  attention-only -> N + j; else (restored to its snapshot at N) -> N.
"""

from __future__ import annotations

from enum import Enum

from policies.placement import Placement


class RowKind(Enum):
    TARGET = "target"  # the request's own placement, its pending tokens (a prompt chunk or a decode row)
    DRAFT = "draft"  # the draft placement proposing one token
    VERIFY = "verify"  # the target over its pending tokens and the proposals


class Draft:
    """A speculating sequence's draft: placement, caches, how far it has run, and this round's proposals.

    Owners: ``blocks`` and ``probs`` the ModelRunner (caches, distributions); the counters and
    ``proposals`` the Scheduler (``after_draft`` / ``after_verify``)."""

    __slots__ = ("placement", "tokens", "blocks", "num_computed", "proposals", "probs", "num_drafted",
                 "num_accepted", "num_verifies", "num_rejected", "last_verify")

    def __init__(self, placement: Placement, tokens: int):
        self.placement = placement
        self.tokens = tokens  # k: proposals per verify step (fewer near max_tokens)
        self.blocks = None  # workers.engine.pool.SequenceBlocks while running
        self.num_computed = 0  # tokens of (prompt + outputs + proposals) the draft's caches hold
        self.proposals: list[int] = []
        self.probs: list = []  # the draft's distribution for each proposal (sampled requests only)
        self.num_drafted = 0  # proposals verified so far
        self.num_accepted = 0  # of which kept
        self.num_verifies = 0
        self.num_rejected = 0  # verify steps that refused a proposal
        self.last_verify = (0, 0)  # (proposed, kept) of the latest verify step

    def round_tokens(self, remaining: int) -> int:
        """Proposals this round when ``remaining`` tokens may still be generated: a verify step yields up to
        k + 1 tokens, so never more than ``remaining - 1`` (0: decode plainly)."""
        return max(0, min(self.tokens, remaining - 1))


def plan_rows(sequence, prefill_budget: int) -> list[tuple[RowKind, list[int], bool]]:
    """The rows a decoding, speculating sequence runs next: (kind, tokens fed, whether it samples) each.

    One row, except after a restored (rejected) verify step: the target then also replays the tokens it
    kept, but the last, in a row that samples nothing (``commit``), beside the draft's first row of the
    round (the two use different caches). The draft's prefill (its first row) is cut to
    ``prefill_budget`` and samples only when it reaches the end."""
    draft, confirmed = sequence.draft, sequence.num_tokens
    remaining = sequence.request.params.max_tokens - len(sequence.output_ids)
    round_tokens = draft.round_tokens(remaining)
    pending = sequence.tokens_from(sequence.num_computed)
    if round_tokens == 0:
        return [(RowKind.TARGET, pending, True)]
    if len(draft.proposals) == round_tokens:
        return [(RowKind.VERIFY, pending + draft.proposals, True)]
    feed = sequence.tokens_from(draft.num_computed) + draft.proposals[max(0, draft.num_computed - confirmed):]
    rows = [(RowKind.TARGET, pending[:-1], False)] if len(pending) > 1 else []
    if draft.num_computed < sequence.num_prompt_tokens and len(feed) > prefill_budget:
        return rows + [(RowKind.DRAFT, feed[:prefill_budget], False)] if prefill_budget > 0 else rows
    return rows + [(RowKind.DRAFT, feed, True)]


def needs_draft_snapshot(sequence) -> bool:
    """Whether the draft row about to run feeds its first proposal: the draft's recurrent state (having run
    every confirmed token) is what a rejection later returns to."""
    draft = sequence.draft
    return bool(draft.blocks.live) and len(draft.proposals) == 1 and draft.num_computed == sequence.num_tokens


def after_draft(sequence, fed: list[int], token: int | None) -> None:
    draft = sequence.draft
    draft.num_computed += len(fed)
    if token is not None:
        draft.proposals.append(token)


def after_verify(sequence, fed: list[int], kept: int) -> None:
    """Move the counters after a verify row kept ``kept`` proposals (the runner has restored the snapshots
    this needs, ``rollbacks``); the emitted tokens are appended by the caller."""
    draft, proposed = sequence.draft, len(sequence.draft.proposals)
    confirmed = sequence.num_tokens  # N: prompt + outputs before this step's tokens
    target_restored, draft_restored = rollbacks(sequence, kept)
    if kept == proposed:
        sequence.num_computed += len(fed)
    elif not target_restored:
        sequence.num_computed = confirmed + kept
    if kept < proposed - 1:
        draft.num_computed = confirmed if draft_restored else confirmed + kept
    draft.num_drafted += proposed
    draft.num_accepted += kept
    draft.num_verifies += 1
    draft.num_rejected += kept < proposed
    draft.last_verify = (proposed, kept)
    draft.proposals, draft.probs = [], []


def rollbacks(sequence, kept: int) -> tuple[bool, bool]:
    """Which snapshots a verify step that kept ``kept`` proposals must restore: (target's, draft's)."""
    proposed = len(sequence.draft.proposals)
    return (kept < proposed and bool(sequence.blocks.live),
            kept < proposed - 1 and bool(sequence.draft.blocks.live))
