"""What a client hands the engine (``Request``) and what it gets back, one per generated token (``TokenEvent``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from policies.errors import InvalidRequest
from policies.placement import Placement
from policies.speculation import check_draft_tokens
from workers.sampling import SamplingParams


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Request:
    """One generation: prompt token ids, its own placement and sampling parameters.

    ``eos_token_id``: the end-of-sequence token; None takes the model's (``params.ignore_eos``
    turns it off). Stop strings live in ``params.stop``.
    ``draft`` / ``draft_tokens``: speculate: ``draft`` (a placement of the same checkpoint) proposes
    ``draft_tokens`` tokens, ``placement`` verifies them in one step (``speculation.py``); the output is
    the one ``placement`` alone would give (greedy: token for token; sampled: in distribution).
    """

    prompt_ids: tuple[int, ...]
    placement: Placement
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=new_request_id)
    eos_token_id: int | None = None
    draft: Placement | None = None
    draft_tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        if self.draft is not None:
            check_draft_tokens(self.draft_tokens)
        elif self.draft_tokens:
            raise InvalidRequest(f"draft_tokens={self.draft_tokens} needs a draft placement")

    @property
    def speculative_tokens(self) -> int:
        """Tokens proposed per verify step (0: no speculation)."""
        return self.draft_tokens if self.draft is not None else 0

    @property
    def context_tokens(self) -> int:
        """The most tokens this request's cache can ever hold: prompt plus max_tokens."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stop = self.params.stop
        return (stop,) if isinstance(stop, str) else tuple(stop)  # one string is allowed, as in OpenAI


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token (``token_id``, and ``text``: the decoded text it adds), or the end of a stream.

    ``finish_reason`` is set on a stream's last event: "stop" (end-of-sequence or a stop
    string; the stop string is not in ``text``), "length" (max_tokens), "abort"
    (cancelled) or "error" (``error`` says why; ``token_id`` is None). "abort" and
    "error" events carry no token. ``text`` may be empty while a possible stop string
    or an incomplete UTF-8 character is held back.
    """

    request_id: str
    token_id: int | None
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
