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
    min_tokens: int = 0  # neither end-of-sequence nor a stop string ends the output before this many tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")

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


def distributions(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``params`` samples from at each row of ``logits`` [n, vocab] (temperature, top-k,
    top-p applied; fp32, in vocabulary order): what speculative sampling compares (``speculative_sample``)."""
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, vocab)).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        ordered, order = probs.sort(dim=-1, descending=True)
        ordered = ordered.masked_fill(ordered.cumsum(-1) - ordered > params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, ordered)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from ``probs`` [vocab] (need not sum to 1), by inverting its cumulative sum at one uniform
    number from ``generator``."""
    cumulative = probs.cumsum(-1)
    uniform = torch.rand((), generator=generator, device=probs.device)
    return int(torch.searchsorted(cumulative, (uniform * cumulative[-1])[None]).clamp_(max=probs.shape[-1] - 1))


def speculative_sample(target: torch.Tensor, draft: torch.Tensor, proposals: Sequence[int],
                       generator: torch.Generator) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the tokens a verify step keeps.

    ``target`` [k+1, vocab]: the target's distributions at the k proposals' positions and one past;
    ``draft`` [k, vocab]: the distributions the proposals were drawn from. Proposal i is kept with
    probability min(1, p(x) / q(x)); the first one refused is replaced by a draw from max(0, p - q)
    (normalised) and ends the step; when all k are kept, one more token is drawn from the last target
    distribution. Whatever q is, each returned token is distributed exactly as the target alone would
    have drawn it. Returns the kept proposals and that one token (1 to k+1 tokens).
    """
    kept: list[int] = []
    for i, token in enumerate(proposals):
        p, q = float(target[i, token]), float(draft[i, token])
        uniform = float(torch.rand((), generator=generator, device=target.device))
        if uniform * q < p:  # accept with probability min(1, p / q) (q > 0: the token was drawn from it)
            kept.append(token)
            continue
        residual = (target[i] - draft[i]).clamp_(min=0.0)
        kept.append(draw(residual if float(residual.sum()) > 0 else target[i], generator))
        return kept
    kept.append(draw(target[len(proposals)], generator))
    return kept


def greedy_accept(target_tokens: Sequence[int], proposals: Sequence[int]) -> list[int]:
    """Greedy verification: keep proposals while they equal the target's argmax at their position, then the
    target's own token (``target_tokens``: its argmax at each of the k+1 positions)."""
    kept: list[int] = []
    for token, wanted in zip(proposals, target_tokens):
        if token != wanted:
            break
        kept.append(token)
    kept.append(target_tokens[len(kept)])
    return kept
