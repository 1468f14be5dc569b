"""Self-speculative decoding gives the target's own output: greedy token for token, for every kind of
target and draft (attention, sliding window past the tiny checkpoint's window of 16, GDN, KDA, mixed), in
batches with plain requests, with the pool's bytes equal to ``policies.memory``'s after every step."""

import pytest
import torch

from workers.engine import Engine, EngineConfig, Request
from workers.generate import GenerationRequest, generate
from workers.sampling import SamplingParams

# (target, draft): recurrent targets (restored after a rejection), recurrent drafts, windows, mixes.
PAIRS = [("AAAAAA", "GGGGGG"), ("AAAAAA", "SSSSSS"), ("GGGGGG", "KKKKKK"), ("ASGKAS", "GGGGGG"),
         ("SSSSSS", "AAAAAA"), ("KGSAGK", "ASGKAS"), ("KKKKKK", "SSGGAA")]


def engine(model, budget=60_000_000):
    # 4-token pages: a window of 16 is exactly 4 pages, so only the speculative slack keeps rejected writes
    # off the slots the window still sees (the default pages of 32 tokens would hide it)
    return Engine(model, EngineConfig(cache_budget_bytes=budget, max_prefill_tokens=8, check_invariants=True,
                                      page_tokens=4))


def prompts(model, count, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(4, model.config.vocab_size, (24 + 3 * i,), generator=generator).tolist()
            for i in range(count)]


def run(engine, requests):
    for request in requests:
        engine.add_request(request)
    tokens, reasons = {}, {}
    for event in engine.run_until_idle():
        assert event.error is None, event.error
        if event.token_id is not None:
            tokens.setdefault(event.request_id, []).append(event.token_id)
        if event.finished:
            reasons[event.request_id] = event.finish_reason
    return tokens, reasons


def alone(model, prompt, code, params):
    return generate(model, [GenerationRequest(prompt, model.config.placement(code), params)])[0].tokens


@pytest.mark.parametrize("draft_tokens", [1, 4])
@pytest.mark.parametrize("path", ["torch", "kernels"])
def test_greedy_speculation_gives_the_targets_tokens(tiny_model, kernel_model, path, draft_tokens):
    model = tiny_model if path == "torch" else kernel_model
    config = model.config
    texts = prompts(model, len(PAIRS))
    params = SamplingParams(max_tokens=30, ignore_eos=True)  # prompt 24-42 + 30 tokens: past the window
    requests = [Request(prompt, config.placement(target), params, f"s{i}", draft=config.placement(draft),
                        draft_tokens=draft_tokens) for i, (prompt, (target, draft)) in enumerate(zip(texts, PAIRS))]
    plain = Request(texts[0], config.placement("SSGGAA"), params, "plain")  # rides along without a draft
    got, _ = run(engine(model), requests + [plain])
    for i, (prompt, (target, draft)) in enumerate(zip(texts, PAIRS)):
        assert got[f"s{i}"] == alone(tiny_model, prompt, target, params), (target, draft)
    assert got["plain"] == alone(tiny_model, texts[0], "SSGGAA", params)


def test_a_draft_that_always_agrees_keeps_every_proposal(tiny_model):
    config = tiny_model.config
    params = SamplingParams(max_tokens=21, ignore_eos=True)
    request = Request(prompts(tiny_model, 1)[0], config.placement("ASGKAS"), params, "same",
                      draft=config.placement("ASGKAS"), draft_tokens=4)
    e = engine(tiny_model)
    e.add_request(request)
    draft = e.draft_of("same")
    tokens, _ = run(e, [])
    assert len(tokens["same"]) == 21
    # 1 token from the prefill, then 4 verify steps of 4 kept + 1, where max_tokens leaves room
    assert draft.num_accepted == draft.num_drafted == 16 and draft.num_verifies == 4
    (pair,) = e.stats().speculation
    assert (pair.target, pair.draft, pair.drafted, pair.accepted, pair.acceptance_rate) == \
        ("ASGKAS", "ASGKAS", 16, 16, 1.0)


def test_end_of_sequence_inside_a_verify_step_ends_the_stream_there(tiny_model):
    config = tiny_model.config
    prompt = prompts(tiny_model, 1, seed=9)[0]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    reference = alone(tiny_model, prompt, "AAAAAA", params)
    eos = reference[7]  # a token the target emits mid-stream: as end-of-sequence it ends the stream there
    request = Request(prompt, config.placement("AAAAAA"), SamplingParams(max_tokens=30), "eos", eos,
                      draft=config.placement("AAAAAA"), draft_tokens=4)
    tokens, reasons = run(engine(tiny_model), [request])
    assert tokens["eos"] == reference[:reference.index(eos) + 1] and reasons["eos"] == "stop"


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 6])
def test_max_tokens_is_exact_near_the_end(tiny_model, max_tokens):
    config = tiny_model.config
    prompt = prompts(tiny_model, 1, seed=2)[0]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    request = Request(prompt, config.placement("GGGGGG"), params, "r", draft=config.placement("SSSSSS"),
                      draft_tokens=4)
    tokens, reasons = run(engine(tiny_model), [request])
    assert tokens["r"] == alone(tiny_model, prompt, "GGGGGG", params) and reasons["r"] == "length"


def test_sampled_speculation_is_independent_of_the_batch(tiny_model):
    config = tiny_model.config
    texts = prompts(tiny_model, 3, seed=4)
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)

    def request(i, code, draft):
        return Request(texts[i], config.placement(code), params, f"r{i}", draft=config.placement(draft),
                       draft_tokens=3)

    together, _ = run(engine(tiny_model), [request(0, "ASGKAS", "GGGGGG"), request(1, "AAAAAA", "SSSSSS"),
                                           request(2, "KKKKKK", "AAAAAA")])
    first, _ = run(engine(tiny_model), [request(0, "ASGKAS", "GGGGGG")])
    assert together["r0"] == first["r0"] and len(first["r0"]) == 20


def test_aborting_a_speculating_request_returns_both_caches(tiny_model):
    config = tiny_model.config
    e = engine(tiny_model)
    e.add_request(Request(prompts(tiny_model, 1)[0], config.placement("KGSAGK"), SamplingParams(max_tokens=40),
                          "r", draft=config.placement("GGGGGG"), draft_tokens=4))
    for _ in range(12):
        e.step()
    assert e.stats().cache_used_bytes > 0
    e.abort("r")
    e.run_until_idle()
    assert e.stats().cache_used_bytes == 0 and e.pool.held_bytes == 0
    e.check_invariants()


def test_min_tokens_holds_end_of_sequence_back_inside_verify_steps(tiny_model):
    config = tiny_model.config
    prompt = prompts(tiny_model, 1, seed=9)[0]
    reference = alone(tiny_model, prompt, "GGGGGG", SamplingParams(max_tokens=30, ignore_eos=True))
    params = SamplingParams(max_tokens=30, min_tokens=12)
    eos = reference[3]  # ends the output at its 4th token without min_tokens

    def request(draft):
        return Request(prompt, config.placement("GGGGGG"), params, "r", eos, draft=draft and config.placement(draft),
                       draft_tokens=4 if draft else 0)

    plain, _ = run(engine(tiny_model), [request(None)])
    drafted, _ = run(engine(tiny_model), [request("AAAAAA")])
    assert drafted["r"] == plain["r"] and len(plain["r"]) >= 12 and eos not in plain["r"][:12]
