"""Cached decode equals the no-cache forward: per mixer and for whole placements, past the window,
with chunked prefill and multi-token steps (fp32, plain-torch path)."""

import pytest
import torch

from workers.generate import GenerationRequest, generate, request_pool
from workers.model.batch import CacheRows, ForwardBatch
from workers.sampling import SamplingParams

PLACEMENTS = ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS", "KGSAGK"]
WINDOW = 16


def full_logits(model, tokens, code):
    """No cache: the whole sequence at once, logits at every position."""
    return model(ForwardBatch.build([tokens], [model.config.placement(code)]), all_logits=True)


def chunked_logits(model, tokens, code, chunks, page_tokens=None):
    """With a cache, feeding the sequence in the given chunk sizes; logits at every position."""
    placement = model.config.placement(code)
    pool, (blocks,) = request_pool(model, [(placement, len(tokens))], page_tokens)
    out, at = [], 0
    for size in chunks:
        cache = CacheRows(pool.arena, pool.tables, [blocks.row])
        out.append(model(ForwardBatch.build([tokens[at:at + size]], [placement], [at], cache), all_logits=True))
        at += size
    assert at == len(tokens)
    return torch.cat(out)


@pytest.fixture(scope="module")
def sequence():
    generator = torch.Generator().manual_seed(7)
    return [1] + torch.randint(4, 2048, (47,), generator=generator).tolist()  # 48 tokens: three windows


@pytest.mark.parametrize("code", PLACEMENTS)
@pytest.mark.parametrize(
    "chunks",
    [
        [1] * 48,  # token-by-token decode from the start
        [20] + [1] * 28,  # prompt longer than the window, then decode
        [5, 7, 1, 16, 3, 16],  # chunked prefill, chunks crossing and equal to the window
        [48],  # one prefill into an empty cache
        [10, 30, 8],  # a multi-token step longer than the window on a non-empty cache
    ],
    ids=["decode", "long-prompt", "chunked", "prefill", "multi-token"],
)
@pytest.mark.parametrize("page_tokens", [None, 5], ids=["default-pages", "5-token-pages"])
def test_cached_logits_equal_full_recompute(tiny_model, sequence, code, chunks, page_tokens):
    """Also with 5-token pages: the window of 16 spans four pages and its ring (20 tokens) wraps mid-page."""
    expected = full_logits(tiny_model, sequence, code)
    got = chunked_logits(tiny_model, sequence, code, chunks, page_tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("code", PLACEMENTS)
def test_greedy_tokens_with_cache_equal_no_cache_past_the_window(tiny_model, tiny_tokenizer, code):
    prompt = tiny_tokenizer.encode("def fibonacci(n):\n    if n < 2:")
    request = GenerationRequest(prompt, tiny_model.config.placement(code), SamplingParams(max_tokens=2 * WINDOW))
    cached = generate(tiny_model, [request], use_cache=True, eos_token_id=-1)[0].tokens
    recomputed = generate(tiny_model, [request], use_cache=False, eos_token_id=-1)[0].tokens
    assert len(prompt) + len(cached) > 2 * WINDOW
    assert cached == recomputed


def test_placements_really_differ(tiny_model, sequence):
    """Guard against a model where every placement runs the same mixer."""
    outputs = [full_logits(tiny_model, sequence, code)[-1] for code in ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK"]]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert not torch.allclose(outputs[i], outputs[j], atol=1e-3)


def test_sliding_window_equals_attention_inside_the_window(tiny_model, sequence):
    """SWA and FA share nothing but their math; with random weights they differ, so compare the masks
    through a model whose SWA weights are FA's: inside the window the two agree, past it they do not."""
    import copy

    from policies.placement import Mixer

    model = copy.deepcopy(tiny_model)
    for block in model.blocks:
        block.by_kind[Mixer.SLIDING_WINDOW].load_state_dict(block.by_kind[Mixer.ATTENTION].state_dict())
    fa, swa = full_logits(model, sequence, "AAAAAA"), full_logits(model, sequence, "SSSSSS")
    torch.testing.assert_close(swa[:WINDOW], fa[:WINDOW], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(swa[WINDOW + 1:], fa[WINDOW + 1:], atol=1e-3)
