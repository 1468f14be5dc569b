"""Engines over the session's tiny model (fp32, 6 layers, window 16), with invariants checked every step.

Their pools use 4-token pages (a window spans four; the derived default is 32 tokens), so paging is exercised.
"""

import pytest
import torch

from workers.engine import Engine, EngineConfig, Request
from workers.sampling import SamplingParams

CODES = ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS", "KGSAGK"]
PAGE_TOKENS = 4


def pool_budget(model, lent_bytes: int) -> int:
    """The budget whose pool lends exactly ``lent_bytes`` (a multiple of the block): one more block, the null one."""
    return lent_bytes + model.config.memory_model(kv_bytes=4, page_tokens=PAGE_TOKENS).block_bytes


@pytest.fixture
def make_engine(tiny_model, tiny_tokenizer):
    def make(budget_bytes: int = 10_000_000, max_prefill_tokens: int = 8, with_tokenizer: bool = True,
             page_tokens: int = PAGE_TOKENS, **kwargs):
        config = EngineConfig(cache_budget_bytes=budget_bytes, max_prefill_tokens=max_prefill_tokens,
                              check_invariants=True, page_tokens=page_tokens, **kwargs)
        return Engine(tiny_model, config, tiny_tokenizer if with_tokenizer else None)

    return make


@pytest.fixture
def make_request(tiny_model):
    generator = torch.Generator().manual_seed(0)

    def make(code: str = "ASGKAS", prompt_tokens: int = 12, request_id: str | None = None, **params) -> Request:
        vocab = tiny_model.config.vocab_size
        prompt = [1] + torch.randint(4, vocab, (prompt_tokens - 1,), generator=generator).tolist()
        extra = {} if request_id is None else {"request_id": request_id}
        return Request(prompt, tiny_model.config.placement(code), SamplingParams(**params), **extra)

    return make

