"""One batch with rows of different placements gives each row what it gets alone."""

import torch

from workers.generate import GenerationRequest, generate
from workers.model.batch import ForwardBatch
from workers.sampling import SamplingParams

CODES = ["AAAAAA", "SSSSSS", "GGGGGG", "KKKKKK", "ASGKAS", "KGSAGK", "GGGGGG"]


def test_mixed_batch_tokens_equal_each_request_alone(tiny_model, tiny_tokenizer):
    prompts = ["import os\n", "def main():\n    return", "class Stack:\n    def push(self, item):",
               "for i in range(10):", "x", "# compute the mean of a list\n", "while True:\n    line ="]
    requests = [GenerationRequest(tiny_tokenizer.encode(p), tiny_model.config.placement(c),
                                  SamplingParams(max_tokens=12 + 3 * i))
                for i, (p, c) in enumerate(zip(prompts, CODES))]
    together = generate(tiny_model, requests, eos_token_id=-1)
    for request, result in zip(requests, together):
        alone = generate(tiny_model, [request], eos_token_id=-1)[0]
        assert result.tokens == alone.tokens
        assert len(result.tokens) == request.params.max_tokens


def test_mixed_batch_logits_equal_rows_alone_with_caches(tiny_model):
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 2048, (n,), generator=generator).tolist() for n in (9, 23, 1, 17, 30, 4, 12)]
    placements = [tiny_model.config.placement(c) for c in CODES]
    caches = [tiny_model.new_cache(p, 64) for p in placements]
    batch = ForwardBatch.build(prompts, placements, caches)
    assert len(batch.groups(0)) == 4  # the first layer really holds four mixer groups
    mixed_prefill = tiny_model(batch, all_logits=True)
    next_tokens = [[int(t)] for t in torch.randint(4, 2048, (len(prompts),), generator=generator)]
    mixed_decode = tiny_model(ForwardBatch.build(next_tokens, placements, caches))
    offset = 0
    for i, (prompt, placement) in enumerate(zip(prompts, placements)):
        cache = tiny_model.new_cache(placement, 64)
        alone_prefill = tiny_model(ForwardBatch.build([prompt], [placement], [cache]), all_logits=True)
        alone_decode = tiny_model(ForwardBatch.build([next_tokens[i]], [placement], [cache]))
        torch.testing.assert_close(mixed_prefill[offset:offset + len(prompt)], alone_prefill, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed_decode[i], alone_decode[0], rtol=1e-5, atol=1e-5)
        offset += len(prompt)


def test_cache_bytes_match_the_memory_model(tiny_model):
    memory = tiny_model.config.memory_model(kv_bytes=4)
    for code in CODES:
        placement = tiny_model.config.placement(code)
        for capacity in (8, 16, 100):
            assert tiny_model.new_cache(placement, capacity).nbytes() == memory.sequence_bytes(placement, capacity)
