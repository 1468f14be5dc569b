"""Sampling parameters and the token choice: greedy, or temperature with top-k / top-p, seeded per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from policies.errors import InvalidRequest


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")

    def generator(self, device) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        return torch.Generator(device=device).manual_seed(self.seed if self.seed is not None else 0)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` [rows, vocab], all rows at once, with one device sync.

    Greedy rows (temperature 0) take the argmax. The others draw from their own temperature / top-k / top-p
    distribution by inverting its cumulative sum at one uniform number from their own generator, so a row's
    tokens depend on its seed and logits only, not on what shares its batch.
    """
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature != 0]
    if sampled:
        tokens[sampled] = _draw(logits[sampled].float(), [params[i] for i in sampled],
                                [generators[i] for i in sampled])
    return tokens.tolist()


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    device, vocab = logits.device, logits.shape[-1]
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    if any(p.top_k for p in params):  # keep each row's k largest (ties at the k-th included); 0: all
        ks = [min(p.top_k, vocab) if p.top_k else vocab for p in params]
        k = torch.tensor(ks, device=device)
        kth = torch.topk(logits, max(ks)).values.gather(1, (k - 1)[:, None])  # max in Python: no device sync
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    # top-p: the smallest most-likely set whose mass reaches top_p (rows at 1.0 keep everything)
    probs = probs.masked_fill((probs.cumsum(-1) - probs > top_p) & (top_p < 1), 0.0)
    cumulative = probs.cumsum(-1)
    uniform = torch.stack([torch.rand((), generator=g, device=device) for g in generators])
    index = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None]).clamp_(max=vocab - 1)
    return order.gather(1, index)[:, 0]
