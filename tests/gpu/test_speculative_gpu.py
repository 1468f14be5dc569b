"""Speculative decoding on the GPU (Triton/fla kernels, CUDA graphs on for plain steps): greedy output with
a draft equals the output without, for recurrent, window and mixed targets past the window.

Run on the GPU machine: `python -m pytest -q tests/gpu -s` (skipped without CUDA). fp32, so that the verify
rows' prefill path and the plain decode path agree to the last bit that an argmax can see."""

import pytest
import torch

from workers.engine import Engine, EngineConfig, Request
from workers.model.loader import load_checkpoint
from workers.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PAIRS = [("AAAAAA", "GGGGGG"), ("AAAAAA", "SSSSSS"), ("GGGGGG", "KKKKKK"), ("ASGKAS", "GGGGGG")]


def tokens(model, drafts: bool) -> dict[str, list[int]]:
    generator = torch.Generator().manual_seed(5)
    engine = Engine(model, EngineConfig(cache_budget_bytes=64 * 2**20, max_prefill_tokens=8, check_invariants=True))
    for i, (target, draft) in enumerate(PAIRS):
        prompt = [1] + torch.randint(4, model.config.vocab_size, (24 + 3 * i,), generator=generator).tolist()
        engine.add_request(Request(prompt, model.config.placement(target), SamplingParams(max_tokens=30, ignore_eos=True),
                                   f"r{i}", draft=model.config.placement(draft) if drafts else None,
                                   draft_tokens=4 if drafts else 0))
    out: dict[str, list[int]] = {}
    for event in engine.run_until_idle():
        assert event.error is None, event.error
        if event.token_id is not None:
            out.setdefault(event.request_id, []).append(event.token_id)
    return out


def test_greedy_speculation_on_the_gpu_gives_the_targets_tokens(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint, device="cuda", dtype=torch.float32)
    assert tokens(model, drafts=True) == tokens(model, drafts=False)
