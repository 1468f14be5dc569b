"""Runs one scheduled step on the model: take and give back cache blocks, build the ForwardBatch, forward, sample.

The split follows nano-vllm's ModelRunner: ``prepare`` turns a StepBatch into the
model's flat ``ForwardBatch`` (decode rows and prefill chunks together, each row
with its own placement, its start at ``Sequence.num_computed`` and its row of the
pool's block table; every index the step needs built once, one host-to-device
copy), ``run`` executes it (a uniform decode step from a CUDA graph, ``graphs.py``)
and samples every row at once (``sampling.sample_rows``:
one device sync); seeded rows draw with their own ``torch.Generator``, so a
request draws the same tokens whatever shares its batch.
"""

from __future__ import annotations

import torch

from workers.engine.graphs import DecodeGraphs
from workers.engine.pool import CachePool
from workers.engine.scheduler import StepBatch
from workers.engine.sequence import Sequence
from workers.model.batch import CacheRows, ForwardBatch
from workers.model.supernet import SupernetLM
from workers.sampling import sample_rows


def free_device_bytes(model: SupernetLM) -> int | None:
    """Free memory on the model's CUDA device (None on a CPU, where the budget is configured)."""
    if model.device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(model.device)
    return int(free)


class ModelRunner:
    def __init__(self, model: SupernetLM, pool: CachePool, decode_graphs: str = "off"):
        """``decode_graphs``: as ``EngineConfig.decode_graphs`` ("auto": captured on CUDA, off on a CPU)."""
        self.model = model
        self.pool = pool
        if decode_graphs == "auto":
            decode_graphs = "capture" if model.device.type == "cuda" else "off"
        self.graphs = None if decode_graphs == "off" else DecodeGraphs(model, pool, pool.padding_row, decode_graphs)

    @torch.inference_mode()
    def allocate(self, sequence: Sequence) -> None:
        """The sequence's blocks for prompt + max_tokens (exactly its reserved bytes) and its sampler."""
        sequence.blocks = self.pool.allocate(sequence.request.placement, sequence.capacity)
        sequence.generator = sequence.request.params.generator(self.model.device)

    def release(self, sequence: Sequence) -> None:
        """Give a finished (or failed) sequence's blocks back to the pool."""
        if sequence.blocks is not None:
            self.pool.release(sequence.blocks)
        sequence.blocks = None
        sequence.generator = None

    def prepare(self, batch: StepBatch, order: list[int] | None = None) -> ForwardBatch:
        """The model's batch for ``batch``'s rows, in ``order`` (default: as scheduled)."""
        order = range(batch.num_rows) if order is None else order
        sequences = [batch.sequences[i] for i in order]
        cache = CacheRows(self.pool.arena, self.pool.tables, [s.blocks.row for s in sequences])
        return ForwardBatch.build([batch.token_ids[i] for i in order], [s.request.placement for s in sequences],
                                  [s.num_computed for s in sequences], cache, device=self.model.device)

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> list[int | None]:
        """Forward one step; a token per row whose logits are wanted, None for mid-prompt chunks, in the
        batch's order.

        Rows run ordered by placement, so rows that share a mixer at a layer are mostly one run of the
        batch (slices, not gathers)."""
        placements = batch.placements
        if self.graphs is not None and self.graphs.accepts(placements, batch.token_ids):
            sequences = batch.sequences
            logits = self.graphs.run(placements[0], [t[0] for t in batch.token_ids],
                                     [s.num_computed for s in sequences], [s.blocks.row for s in sequences])
            return self.sample(logits, batch)
        order = sorted(range(batch.num_rows), key=lambda i: placements[i].code)
        logits = self.model(self.prepare(batch, order))  # row k of logits is batch row order[k]
        return self.sample(logits, batch, order)

    def sample(self, logits: torch.Tensor, batch: StepBatch, order: list[int] | None = None) -> list[int | None]:
        """A token per row of ``batch`` whose logits are wanted; logits row k belongs to batch row ``order[k]``
        (sampled in that order and put back: cheaper than reordering [rows, vocab] logits)."""
        order = range(batch.num_rows) if order is None else order
        wanted = [k for k, i in enumerate(order) if batch.samples[i]]
        tokens: list[int | None] = [None] * batch.num_rows
        if wanted:
            sequences = [batch.sequences[order[k]] for k in wanted]
            rows = logits if len(wanted) == batch.num_rows else logits[wanted]
            chosen = sample_rows(rows, [s.request.params for s in sequences], [s.generator for s in sequences])
            for k, token in zip(wanted, chosen):
                tokens[order[k]] = token
        return tokens
