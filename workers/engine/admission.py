"""The check every request passes at submission: refuse at once what could never run, and say why.

A request that passes reserves ``sequence_bytes(placement, prompt + max_tokens)``
(policies.memory) when the scheduler admits it. One whose cache would exceed the
engine's whole budget could never be admitted; it is refused with
``ContextTooLong`` naming its bytes, the budget, the longest context its
placement could have here, and the uniform placements that would fit.
"""

from __future__ import annotations

from policies.errors import ContextTooLong, InvalidRequest
from policies.memory import CacheMemoryModel
from policies.placement import Mixer, Placement
from workers.engine.request import Request
from workers.model.supernet import SupernetLM


class AdmissionCheck:
    __slots__ = ("model", "memory", "budget_bytes", "has_tokenizer")

    def __init__(self, model: SupernetLM, memory: CacheMemoryModel, budget_bytes: int, has_tokenizer: bool):
        self.model = model
        self.memory = memory
        self.budget_bytes = budget_bytes
        self.has_tokenizer = has_tokenizer

    def check(self, request: Request) -> int:
        """Raise InvalidRequest (or a subclass) for what can never run; return the bytes it will reserve."""
        rid, prompt = request.request_id, request.prompt_ids
        if not prompt:
            raise InvalidRequest(f"request {rid}: the prompt has no tokens")
        vocab = self.model.config.vocab_size
        outside = next((t for t in prompt if not 0 <= t < vocab), None)
        if outside is not None:
            raise InvalidRequest(f"request {rid}: token id {outside} is outside the vocabulary (0..{vocab - 1})")
        self.model.check_placement(request.placement)
        if request.draft is not None:
            self.model.check_placement(request.draft)
        stop = request.stop_strings
        if stop and not self.has_tokenizer:
            raise InvalidRequest(f"request {rid}: stop strings need an engine with a tokenizer")
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest(f"request {rid}: stop strings must be non-empty strings, got {stop!r}")
        context, limit = request.context_tokens, self.model.config.max_position_embeddings
        if context > limit:
            raise ContextTooLong(
                f"request {rid}: prompt {len(prompt)} + max_tokens {request.params.max_tokens} = {context} tokens, "
                f"more than the model's {limit} positions; ask for at most {max(limit - len(prompt), 0)} new tokens")
        cache_bytes = self.reserved_bytes(request)
        if cache_bytes > self.budget_bytes:
            raise ContextTooLong(self.never_fits(request, cache_bytes))
        return cache_bytes

    def reserved_bytes(self, request: Request) -> int:
        """What the request holds while it runs: its placement's caches, and with a draft, the draft's and the
        slack speculation needs (``policies.memory``)."""
        return self.memory.speculative_bytes(request.placement, request.draft, request.context_tokens,
                                             request.speculative_tokens)

    def never_fits(self, request: Request, cache_bytes: int) -> str:
        placement, context, prompt = request.placement, request.context_tokens, len(request.prompt_ids)
        drafted = "" if request.draft is None else f" with draft {request.draft.code} ({request.draft_tokens} tokens)"
        message = (f"request {request.request_id}: placement {placement.code}{drafted} at {context} tokens (prompt {prompt} + "
                   f"max_tokens {request.params.max_tokens}) needs {cache_bytes:,} bytes of cache, more than this "
                   f"engine's whole cache budget of {self.budget_bytes:,} bytes, so it could never be admitted")
        fits = self.max_context(placement)
        if fits == 0:
            message += f"; placement {placement.code} does not fit at any context"
        else:
            message += f"; with placement {placement.code} at most {fits} tokens fit (prompt + max_tokens)"
        others = []
        for mixer in Mixer:
            uniform = Placement.uniform(mixer, len(placement))
            if uniform != placement and all(mixer in block.by_kind for block in self.model.blocks):
                need = self.memory.sequence_bytes(uniform, context)
                if need <= self.budget_bytes:
                    others.append(f"{uniform.code} ({need:,} bytes)")
        if others:
            message += f"; at {context} tokens these placements fit: {', '.join(others)}"
        return message

    def max_context(self, placement: Placement) -> int:
        """The longest context whose cache fits the budget under ``placement`` (bytes never shrink with context)."""
        lo, hi = 0, self.model.config.max_position_embeddings
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.memory.sequence_bytes(placement, mid) <= self.budget_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo
