"""One batch with rows of different placements gives each row what it gets alone."""

import torch

from workers.generate import GenerationRequest, generate, request_pool
from workers.model.batch import CacheRows, ForwardBatch
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
    pool, blocks = request_pool(tiny_model, [(p, 64) for p in placements], page_tokens=4)
    rows = CacheRows(pool.arena, pool.tables, [b.row for b in blocks])
    batch = ForwardBatch.build(prompts, placements, [0] * len(prompts), rows)
    assert len(batch.groups(0)) == 4  # the first layer really holds four mixer groups
    mixed_prefill = tiny_model(batch, all_logits=True)
    next_tokens = [[int(t)] for t in torch.randint(4, 2048, (len(prompts),), generator=generator)]
    mixed_decode = tiny_model(ForwardBatch.build(next_tokens, placements, [len(p) for p in prompts], rows))
    offset = 0
    for i, (prompt, placement) in enumerate(zip(prompts, placements)):
        pool, (own,) = request_pool(tiny_model, [(placement, 64)])
        alone = CacheRows(pool.arena, pool.tables, [own.row])
        alone_prefill = tiny_model(ForwardBatch.build([prompt], [placement], [0], alone), all_logits=True)
        alone_decode = tiny_model(ForwardBatch.build([next_tokens[i]], [placement], [len(prompt)], alone))
        torch.testing.assert_close(mixed_prefill[offset:offset + len(prompt)], alone_prefill, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed_decode[i], alone_decode[0], rtol=1e-5, atol=1e-5)
        offset += len(prompt)


def test_pool_blocks_match_the_memory_model(tiny_model):
    """What the pool takes for a sequence is exactly what policies.memory predicts, page rounding included."""
    for page_tokens in (None, 3, 16):
        memory = tiny_model.config.memory_model(kv_bytes=4, page_tokens=page_tokens)
        for code in CODES:
            placement = tiny_model.config.placement(code)
            for capacity in (1, 8, 16, 17, 100):
                pool, (blocks,) = request_pool(tiny_model, [(placement, capacity)], page_tokens)
                assert blocks.num_blocks * pool.block_bytes == pool.held_bytes
                assert pool.held_bytes == memory.sequence_bytes(placement, capacity)
