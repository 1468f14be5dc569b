"""One request's state inside the engine: its tokens, how far the model has run them, its cache.

Each field has one owner, so no counter is mutated from two places:

- ``status``, ``num_computed``, ``output_ids``, ``cache_bytes`` accounting: the Scheduler
  (admission, ``postprocess`` after each step, ``finish``);
- ``blocks`` and ``generator``: the ModelRunner takes them at admission and gives them back at finish;
- ``draft`` (a speculating request's ``speculation.Draft``): its counters the Scheduler, its caches the
  ModelRunner;
- ``detokenizer`` and ``finish_reason``: the Engine.

``num_computed`` is the one length counter of the sequence's caches (``draft.num_computed`` of its
draft's): caches hold no length of their own (the pool's pages are addressed by position), so a
step that feeds ``n`` tokens moves exactly this, and a rejected speculation moves it back.
"""

from __future__ import annotations

import enum

from workers.engine.detokenizer import Detokenizer
from workers.engine.request import Request
from workers.engine.speculation import Draft


class Status(enum.Enum):
    WAITING = "waiting"  # submitted, no cache reserved
    RUNNING = "running"  # admitted: bytes reserved, prefilling or decoding
    FINISHED = "finished"  # done; holds nothing


class Sequence:
    __slots__ = ("request", "arrival", "cache_bytes", "status", "num_computed", "output_ids", "blocks",
                 "generator", "detokenizer", "finish_reason", "draft")

    def __init__(self, request: Request, arrival: int, cache_bytes: int, detokenizer: Detokenizer):
        self.request = request
        self.arrival = arrival  # submission order: FIFO admission keeps it increasing in both queues
        self.cache_bytes = cache_bytes  # what its cache at prompt + max_tokens holds; reserved while running
        self.status = Status.WAITING
        self.num_computed = 0  # tokens already run through the model (prompt chunks, then outputs)
        self.output_ids: list[int] = []
        self.blocks = None  # workers.engine.pool.SequenceBlocks while running
        self.generator = None  # torch.Generator for seeded sampling (None: greedy)
        self.detokenizer = detokenizer
        self.finish_reason: str | None = None
        self.draft = None if request.draft is None else Draft(request.draft, request.draft_tokens)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens so far (the last generated one is not yet run)."""
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def capacity(self) -> int:
        """Tokens its cache is sized for: prompt + max_tokens."""
        return self.request.context_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < len(self.request.prompt_ids)

    def next_tokens(self, budget: int) -> list[int]:
        """What the next step feeds: a prompt chunk of at most ``budget`` tokens, or the tokens generated and
        not yet run (the last one; after a rolled-back speculation, the ones since its snapshot)."""
        if self.is_prefilling:
            return list(self.request.prompt_ids[self.num_computed:self.num_computed + budget])
        return self.tokens_from(self.num_computed)

    def tokens_from(self, start: int) -> list[int]:
        """Prompt + outputs from position ``start`` on."""
        prompt = self.request.prompt_ids
        if start >= len(prompt):
            return self.output_ids[start - len(prompt):]
        return list(prompt[start:]) + self.output_ids

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, placement={self.request.placement.code}, "
                f"prompt={self.num_prompt_tokens}, computed={self.num_computed}, outputs={len(self.output_ids)})")
