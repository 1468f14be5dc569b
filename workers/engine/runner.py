"""Runs one scheduled step on the model: take and give back cache blocks, build the ForwardBatch, forward, sample.

The split follows nano-vllm's ModelRunner: ``prepare`` turns a StepBatch into the
model's flat ``ForwardBatch`` (decode rows and prefill chunks together, each row
with its own placement, its start at ``Sequence.num_computed`` and its row of the
pool's block table; every index the step needs built once, one host-to-device
copy), ``run`` executes it (a uniform decode step from a CUDA graph, ``graphs.py``)
and samples every row at once (``sampling.sample_rows``:
one device sync); seeded rows draw with their own ``torch.Generator``, so a
request draws the same tokens whatever shares its batch.

Speculating sequences (``speculation.py``) run draft rows (their draft's placement
and caches) and verify rows (several logits, kept by ``sampling.speculative_sample``
or ``greedy_accept``); the runner takes the recurrent snapshots those rows need
before the forward and restores them after a rejection.
"""

from __future__ import annotations

import torch

from workers.engine.graphs import DecodeGraphs
from workers.engine.pool import CachePool
from workers.engine.scheduler import StepBatch
from workers.engine.sequence import Sequence
from workers.engine.speculation import RowKind, needs_draft_snapshot, rollbacks
from workers.model.batch import CacheRows, ForwardBatch
from workers.model.supernet import SupernetLM
from workers.sampling import distributions, draw, greedy_accept, sample_rows, speculative_sample


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
        self.graphs = None if decode_graphs == "off" else DecodeGraphs(model, pool, pool.max_rows, decode_graphs)

    @torch.inference_mode()
    def allocate(self, sequence: Sequence) -> None:
        """The sequence's blocks for prompt + max_tokens (exactly its reserved bytes: with a draft, the draft's
        too, and the slack speculation needs) and its sampler."""
        request, k = sequence.request, sequence.request.speculative_tokens
        sequence.blocks = self.pool.allocate(request.placement, sequence.capacity, k)
        if sequence.draft is not None:
            try:
                sequence.draft.blocks = self.pool.allocate(sequence.draft.placement, sequence.capacity, k)
            except Exception:
                self.release(sequence)
                raise
        sequence.generator = request.params.generator(self.model.device)

    def release(self, sequence: Sequence) -> None:
        """Give a finished (or failed) sequence's blocks (and its draft's) back to the pool."""
        if sequence.blocks is not None:
            self.pool.release(sequence.blocks)
        if sequence.draft is not None and sequence.draft.blocks is not None:
            self.pool.release(sequence.draft.blocks)
            sequence.draft.blocks = None
        sequence.blocks = None
        sequence.generator = None

    def prepare(self, batch: StepBatch, order: list[int] | None = None) -> ForwardBatch:
        """The model's batch for ``batch``'s rows, in ``order`` (default: as scheduled): each row at its own
        caches (a draft row at its draft's), with logits at every verified position of a verify row."""
        order = range(batch.num_rows) if order is None else order
        placements, rows, starts = batch.placements, [], []
        for i in order:
            sequence = batch.sequences[i]
            cached = sequence.draft if batch.kinds[i] is RowKind.DRAFT else sequence  # (both have num_computed)
            rows.append(cached.blocks.row)
            starts.append(cached.num_computed)
        cache = CacheRows(self.pool.arena, self.pool.tables, rows)
        forward = ForwardBatch.build([batch.token_ids[i] for i in order], [placements[i] for i in order], starts,
                                     cache, device=self.model.device)
        if RowKind.VERIFY in batch.kinds:  # logits at each verified position, else each row's last token
            logit_index, at = [], 0
            for i in order:
                length = len(batch.token_ids[i])
                wanted = len(batch.sequences[i].draft.proposals) + 1 if batch.kinds[i] is RowKind.VERIFY else 1
                logit_index.extend(range(at + length - wanted, at + length))
                at += length
            forward.logit_index = torch.tensor(logit_index, dtype=torch.long, device=self.model.device)
        return forward

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> list[list[int]]:
        """Forward one step; per row, in the batch's order, the tokens it gives: one new token (none for a
        mid-prompt chunk), a draft row's proposal, or a verify row's kept proposals and one more.

        Rows run ordered by placement, so rows that share a mixer at a layer are mostly one run of the
        batch (slices, not gathers)."""
        placements = batch.placements
        if self.graphs is not None and batch.is_plain and self.graphs.accepts(placements, batch.token_ids):
            sequences = batch.sequences
            logits = self.graphs.run(placements[0], [t[0] for t in batch.token_ids],
                                     [s.num_computed for s in sequences], [s.blocks.row for s in sequences])
            return self.sample(logits, batch)
        self._take_snapshots(batch)
        order = sorted(range(batch.num_rows), key=lambda i: placements[i].code)
        logits = self.model(self.prepare(batch, order))  # row k of logits is batch row order[k] (verify: k+1)
        if batch.is_plain:
            return self.sample(logits, batch, order)
        return self._sample_speculative(logits, batch, order)

    def sample(self, logits: torch.Tensor, batch: StepBatch, order: list[int] | None = None) -> list[list[int]]:
        """A token per row of ``batch`` whose logits are wanted; logits row k belongs to batch row ``order[k]``
        (sampled in that order and put back: cheaper than reordering [rows, vocab] logits)."""
        order = range(batch.num_rows) if order is None else order
        wanted = [k for k, i in enumerate(order) if batch.samples[i]]
        tokens: list[list[int]] = [[] for _ in range(batch.num_rows)]
        if wanted:
            sequences = [batch.sequences[order[k]] for k in wanted]
            self._hold_eos(logits, [(k, s, 0) for k, s in zip(wanted, sequences)])
            rows = logits if len(wanted) == batch.num_rows else logits[wanted]
            chosen = sample_rows(rows, [s.request.params for s in sequences], [s.generator for s in sequences])
            for k, token in zip(wanted, chosen):
                tokens[order[k]] = [token]
        return tokens

    def _hold_eos(self, logits: torch.Tensor, rows: list[tuple[int, Sequence, int]]) -> None:
        """``min_tokens``: end-of-sequence cannot be drawn at a logits row whose token would be output number
        ``len(outputs) + ahead + 1`` <= min_tokens (``rows``: (logits row, sequence, ahead)). Drafts are not held:
        a proposal of it is refused by the held target."""
        held = [(row, s) for row, s, ahead in rows
                if len(s.output_ids) + ahead < s.request.params.min_tokens and not s.request.params.ignore_eos]
        if held:
            eos = [self.model.config.eos_token_id if s.request.eos_token_id is None else s.request.eos_token_id
                   for _, s in held]
            index = torch.tensor([row for row, _ in held], device=logits.device)
            logits[index, torch.tensor(eos, device=logits.device)] = float("-inf")

    def _take_snapshots(self, batch: StepBatch) -> None:
        """Before a verify row, its recurrent layers' states; before a draft row's first proposal, its draft's."""
        held = []
        for sequence, kind in zip(batch.sequences, batch.kinds):
            if kind is RowKind.VERIFY and sequence.blocks.live:
                held.append(sequence.blocks)
            elif kind is RowKind.DRAFT and needs_draft_snapshot(sequence):
                held.append(sequence.draft.blocks)
        self.pool.snapshot(held)

    def _sample_speculative(self, logits: torch.Tensor, batch: StepBatch, order: list[int]) -> list[list[int]]:
        """Tokens for a step with draft or verify rows: plain greedy rows batched, the rest row by row (each
        with its own generator), then the rejected rows' snapshots restored."""
        tokens: list[list[int]] = [[] for _ in range(batch.num_rows)]
        spans, at = [], 0
        for i in order:
            kind = batch.kinds[i]
            count = len(batch.sequences[i].draft.proposals) + 1 if kind is RowKind.VERIFY else 1
            spans.append((i, at, count))
            at += count
        self._hold_eos(logits, [(at + i, batch.sequences[r], i) for r, at, count in spans
                                if batch.samples[r] and batch.kinds[r] is not RowKind.DRAFT for i in range(count)])
        greedy = logits.argmax(dim=-1).tolist()  # one sync for every greedy decision
        restore = []
        for i, at, count in spans:
            sequence, kind, params = batch.sequences[i], batch.kinds[i], batch.sequences[i].request.params
            if not batch.samples[i]:
                continue
            if kind is RowKind.VERIFY:
                draft = sequence.draft
                if params.temperature == 0:
                    kept = greedy_accept(greedy[at:at + count], draft.proposals)
                else:
                    target = distributions(logits[at:at + count], params)
                    kept = speculative_sample(target, torch.stack(draft.probs), draft.proposals, sequence.generator)
                target_restored, draft_restored = rollbacks(sequence, len(kept) - 1)
                restore += [sequence.blocks] * target_restored + [draft.blocks] * draft_restored
                tokens[i] = kept
            elif params.temperature == 0:
                tokens[i] = [greedy[at]]
            elif kind is RowKind.DRAFT:
                q = distributions(logits[at:at + 1], params)[0]
                sequence.draft.probs.append(q)
                tokens[i] = [draw(q, sequence.generator)]
            else:
                tokens[i] = sample_rows(logits[at:at + 1], [params], [sequence.generator])
        self.pool.restore(restore)
        return tokens
