"""Static-batch generation: every request runs its own placement inside one batch.

This is the reference loop the CLI uses and the exactness tests compare
against; the continuous-batching engine serves production traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policies.placement import Placement
from workers.engine.pool import CachePool
from workers.model.batch import CacheRows, ForwardBatch
from workers.model.supernet import SupernetLM
from workers.sampling import SamplingParams, sample_rows


@dataclass(slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    placement: Placement
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(slots=True)
class GenerationResult:
    tokens: list[int]
    finish_reason: str  # "length" or "stop"


@torch.inference_mode()
def generate(model: SupernetLM, requests: list[GenerationRequest], use_cache: bool = True,
             eos_token_id: int | None = None) -> list[GenerationResult]:
    """Run all requests as one batch until each hits max_tokens or end-of-sequence.

    ``use_cache=False`` recomputes every sequence from scratch at each step: the slow reference.
    """
    for request in requests:
        model.check_placement(request.placement)
        if not request.prompt_ids:
            raise ValueError("a prompt needs at least one token")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    placements = [r.placement for r in requests]
    if use_cache:
        pool, blocks = request_pool(model, [(r.placement, len(r.prompt_ids) + r.params.max_tokens) for r in requests])
    computed = [0] * len(requests)  # tokens already in each request's cache
    generators = [r.params.generator(model.device) for r in requests]
    outputs: list[list[int]] = [[] for _ in requests]
    finish: list[str | None] = [None] * len(requests)
    new_tokens = [list(r.prompt_ids) for r in requests]
    active = list(range(len(requests)))
    while active:
        if use_cache:
            cache = CacheRows(pool.arena, pool.tables, [blocks[i].row for i in active])
            batch = ForwardBatch.build([new_tokens[i] for i in active], [placements[i] for i in active],
                                       [computed[i] for i in active], cache, device=model.device)
        else:
            batch = ForwardBatch.build([requests[i].prompt_ids + outputs[i] for i in active],
                                       [placements[i] for i in active], None, device=model.device)
        logits = model(batch)
        still = []
        chosen = sample_rows(logits, [requests[i].params for i in active], [generators[i] for i in active])
        for i, token in zip(active, chosen):
            params = requests[i].params
            computed[i] += len(new_tokens[i])
            outputs[i].append(token)
            new_tokens[i] = [token]
            if token == eos and not params.ignore_eos:
                finish[i] = "stop"
            elif len(outputs[i]) >= params.max_tokens:
                finish[i] = "length"
            else:
                still.append(i)
        active = still
    return [GenerationResult(tokens, reason) for tokens, reason in zip(outputs, finish)]


def request_pool(model: SupernetLM, sequences: list[tuple[Placement, int]], page_tokens: int | None = None):
    """A cache pool holding exactly these (placement, capacity) sequences, and their blocks, in order."""
    memory = model.config.memory_model(kv_bytes=model.dtype.itemsize, page_tokens=page_tokens)
    need = sum(memory.sequence_blocks(placement, capacity) for placement, capacity in sequences)
    pool = CachePool(memory, (need + 1) * memory.block_bytes, len(sequences),
                     max(capacity for _, capacity in sequences), model.dtype, model.device)
    return pool, [pool.allocate(placement, capacity) for placement, capacity in sequences]


@dataclass(slots=True)
class SpeculativeResult:
    tokens: list[int]
    finish_reason: str
    drafted: int  # proposals verified
    accepted: int  # of which kept
    verifies: int  # verify steps
    rejected_steps: int  # verify steps that refused a proposal


def generate_speculative(model: SupernetLM, requests: list[GenerationRequest], draft: Placement, draft_tokens: int,
                         eos_token_id: int | None = None) -> list[SpeculativeResult]:
    """The requests as one continuous batch on the engine, each drafted by ``draft`` (``draft_tokens`` per
    verify step): the tokens are the ones ``generate`` gives (greedy) or follow its distribution (sampled)."""
    from workers.engine import Engine, EngineConfig, Request

    memory = model.config.memory_model(kv_bytes=model.dtype.itemsize)
    need = sum(memory.speculative_bytes(r.placement, draft, len(r.prompt_ids) + r.params.max_tokens, draft_tokens)
               for r in requests)
    engine = Engine(model, EngineConfig(cache_budget_bytes=need + 2 * memory.block_bytes, max_running=len(requests),
                                        decode_graphs="off"))
    ids = [f"request-{i}" for i in range(len(requests))]
    for rid, r in zip(ids, requests):
        engine.add_request(Request(r.prompt_ids, r.placement, r.params, rid, eos_token_id, draft, draft_tokens))
    drafts = {rid: engine.draft_of(rid) for rid in ids}
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    reasons: dict[str, str] = {}
    for event in engine.run_until_idle():
        if event.token_id is not None:
            tokens[event.request_id].append(event.token_id)
        if event.finished:
            if event.error:
                raise RuntimeError(f"{event.request_id}: {event.error}")
            reasons[event.request_id] = event.finish_reason
    return [SpeculativeResult(tokens[rid], reasons[rid], drafts[rid].num_drafted, drafts[rid].num_accepted,
                              drafts[rid].num_verifies, drafts[rid].num_rejected) for rid in ids]
