"""Runs one scheduled step on the model: allocate caches, build the ForwardBatch, forward, sample.

The split follows nano-vllm's ModelRunner: ``prepare`` turns a StepBatch into the
model's flat ``ForwardBatch`` (decode rows and prefill chunks together, each row
with its own placement and cache), ``run`` executes it and samples every row at
once (``sampling.sample_rows``: one device sync); seeded rows draw with their
own ``torch.Generator``, so a request draws the same tokens whatever shares its batch.
"""

from __future__ import annotations

import torch

from workers.engine.scheduler import StepBatch
from workers.engine.sequence import Sequence
from workers.model.batch import ForwardBatch
from workers.model.supernet import SupernetLM
from workers.sampling import sample_rows


class ModelRunner:
    def __init__(self, model: SupernetLM):
        self.model = model

    @property
    def kv_bytes(self) -> int:
        """Element size of keys, values and conv history: the model's dtype."""
        return self.model.dtype.itemsize

    def free_device_bytes(self) -> int | None:
        """Free memory on the model's CUDA device (None on a CPU, where the budget is configured)."""
        if self.model.device.type != "cuda":
            return None
        free, _total = torch.cuda.mem_get_info(self.model.device)
        return int(free)

    @torch.inference_mode()
    def allocate(self, sequence: Sequence) -> None:
        """The sequence's cache at prompt + max_tokens (exactly its reserved bytes) and its sampler."""
        sequence.cache = self.model.new_cache(sequence.request.placement, sequence.capacity)
        sequence.generator = sequence.request.params.generator(self.model.device)

    def prepare(self, batch: StepBatch) -> ForwardBatch:
        return ForwardBatch.build(batch.token_ids, batch.placements, [s.cache for s in batch.sequences],
                                  device=self.model.device)

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> list[int | None]:
        """Forward one step; a token per row whose logits are wanted, None for mid-prompt chunks."""
        logits = self.model(self.prepare(batch))
        return self.sample(logits, batch)

    def sample(self, logits: torch.Tensor, batch: StepBatch) -> list[int | None]:
        wanted = [i for i, want in enumerate(batch.samples) if want]
        tokens: list[int | None] = [None] * batch.num_rows
        if wanted:
            sequences = [batch.sequences[i] for i in wanted]
            chosen = sample_rows(logits[wanted], [s.request.params for s in sequences], [s.generator for s in sequences])
            for i, token in zip(wanted, chosen):
                tokens[i] = token
        return tokens
