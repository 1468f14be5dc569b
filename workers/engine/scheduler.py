"""Which sequences run in the next step, and how many cache bytes they hold. Pure Python, no torch.

Two deques, as in nano-vllm: ``waiting`` (submitted, nothing reserved) and
``running`` (admitted, cache bytes reserved). Policy:

- Admission is FIFO against a byte budget: the head of ``waiting`` is admitted
  when its cache at prompt + max_tokens fits in what is free (and a row is free);
  otherwise admission stops there. A smaller request behind it does not overtake
  it, so a large request cannot starve; the cost is some idle memory while the
  head waits for enough to be freed.
- Reservation is for the sequence's whole life, so the engine never runs out of
  cache memory and never preempts.
- Every step carries one row per running sequence: a decode row (its last token)
  for each sequence past its prompt, and prompt chunks, in admission order, up to
  ``max_prefill_tokens`` prompt tokens in all. Decodes are never stalled by a long
  prompt; a prompt longer than the budget is prefilled over several steps.
- A speculating sequence's row past its prompt is a draft row or a verify row,
  with a commit row beside a draft row after a rejection (``speculation.plan_rows``);
  its draft's prefill shares the prompt-token budget.
"""

from __future__ import annotations

from collections import deque

from workers.engine.sequence import Sequence, Status
from workers.engine.speculation import RowKind, after_draft, after_verify, plan_rows


class StepBatch:
    """One step's rows: a sequence, what the row runs (``RowKind``), the tokens it feeds, and whether its
    logits give a token (a new one, or a draft's proposal)."""

    __slots__ = ("sequences", "kinds", "token_ids", "samples", "num_prefill_tokens", "num_decode_rows")

    def __init__(self):
        self.sequences: list[Sequence] = []
        self.kinds: list[RowKind] = []
        self.token_ids: list[list[int]] = []
        self.samples: list[bool] = []  # False: a prompt chunk that does not end the prompt
        self.num_prefill_tokens = 0
        self.num_decode_rows = 0

    def add(self, sequence: Sequence, token_ids: list[int], samples: bool, kind: RowKind = RowKind.TARGET) -> None:
        if sequence.is_prefilling or (kind is not RowKind.VERIFY and len(token_ids) > 1):
            self.num_prefill_tokens += len(token_ids)  # a prompt chunk, a draft's prefill, a replay
        else:
            self.num_decode_rows += 1  # (a verify row counts as one decode row)
        self.sequences.append(sequence)
        self.kinds.append(kind)
        self.token_ids.append(token_ids)
        self.samples.append(samples)

    @property
    def placements(self):
        return [s.draft.placement if kind is RowKind.DRAFT else s.request.placement
                for s, kind in zip(self.sequences, self.kinds)]

    @property
    def is_plain(self) -> bool:
        """No draft or verify row: every row is its sequence's own placement, one sampled token at most."""
        return all(kind is RowKind.TARGET for kind in self.kinds)

    @property
    def num_rows(self) -> int:
        return len(self.sequences)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_rows


class Scheduler:
    def __init__(self, budget_bytes: int, max_prefill_tokens: int, max_running: int):
        self.budget_bytes = budget_bytes
        self.max_prefill_tokens = max_prefill_tokens
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.used_bytes = 0  # sum of running sequences' cache_bytes; only admit() and finish() change it

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, sequence: Sequence) -> None:
        assert sequence.status is Status.WAITING and sequence.cache_bytes <= self.budget_bytes
        self.waiting.append(sequence)

    def admit(self) -> list[Sequence]:
        """Move sequences from the head of ``waiting`` to ``running`` while their caches fit; return them."""
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            head = self.waiting[0]
            if head.cache_bytes > self.free_bytes:
                break  # FIFO: nothing behind the head may overtake it
            self.waiting.popleft()
            head.status = Status.RUNNING
            self.used_bytes += head.cache_bytes
            self.running.append(head)
            admitted.append(head)
        return admitted

    def schedule(self) -> StepBatch:
        """Rows for the next step over the running sequences (call ``admit`` first)."""
        batch = StepBatch()
        prefill_budget = self.max_prefill_tokens
        for sequence in self.running:
            if not sequence.is_prefilling and sequence.draft is not None:
                for kind, tokens, samples in plan_rows(sequence, prefill_budget):
                    if kind is RowKind.DRAFT and sequence.draft.num_computed < sequence.num_prompt_tokens:
                        prefill_budget -= len(tokens)  # the draft's prefill shares the prompt budget
                    batch.add(sequence, tokens, samples, kind)
            elif not sequence.is_prefilling:
                batch.add(sequence, sequence.next_tokens(1), True)
            elif prefill_budget > 0:
                chunk = sequence.next_tokens(prefill_budget)
                prefill_budget -= len(chunk)
                batch.add(sequence, chunk, sequence.num_computed + len(chunk) == sequence.num_prompt_tokens)
        return batch

    def postprocess(self, batch: StepBatch, tokens: list[list[int]]) -> None:
        """After the model ran ``batch``: advance each row and append the tokens it gave (a draft row's
        proposal goes to its draft; a verify row gives the kept proposals and one more)."""
        for sequence, kind, fed, given in zip(batch.sequences, batch.kinds, batch.token_ids, tokens):
            if kind is RowKind.DRAFT:
                after_draft(sequence, fed, given[0] if given else None)
                continue
            if kind is RowKind.VERIFY:
                after_verify(sequence, fed, len(given) - 1)
            else:
                sequence.num_computed += len(fed)
            sequence.output_ids.extend(given)

    def finish(self, sequence: Sequence) -> None:
        """Take a sequence out of either queue and free its reservation (idempotent; the runner frees its blocks)."""
        if sequence.status is Status.RUNNING:
            self.running.remove(sequence)
            self.used_bytes -= sequence.cache_bytes
        elif sequence.status is Status.WAITING:
            self.waiting.remove(sequence)
        sequence.status = Status.FINISHED

    def check_invariants(self) -> None:
        running_ids = {s.request_id for s in self.running}
        waiting_ids = {s.request_id for s in self.waiting}
        assert len(running_ids) == len(self.running) and len(waiting_ids) == len(self.waiting), "duplicate ids"
        assert not running_ids & waiting_ids, f"both waiting and running: {running_ids & waiting_ids}"
        assert self.used_bytes == sum(s.cache_bytes for s in self.running), "bytes accounted != bytes reserved"
        assert 0 <= self.used_bytes <= self.budget_bytes, f"{self.used_bytes} bytes used, budget {self.budget_bytes}"
        assert len(self.running) <= self.max_running
        for queue, status in ((self.waiting, Status.WAITING), (self.running, Status.RUNNING)):
            arrivals = [s.arrival for s in queue]
            assert arrivals == sorted(arrivals), f"{status.value} is out of submission order"
            assert all(s.status is status for s in queue), f"a sequence in {status.value} has another status"
        if self.running and self.waiting:
            assert self.running[-1].arrival < self.waiting[0].arrival, "a request overtook an earlier one"
        for s in self.waiting:
            assert s.num_computed == 0 and not s.output_ids and s.blocks is None, f"{s} holds state while waiting"
        for s in self.running:
            assert len(s.output_ids) < s.request.params.max_tokens, f"{s} should have finished"
            if s.output_ids and s.draft is not None:  # a rolled-back target replays what it kept
                assert s.num_computed <= s.num_tokens - 1, f"{s}: decode position out of step"
                assert len(s.draft.proposals) <= s.draft.tokens, f"{s}: more proposals than draft tokens"
                assert s.draft.num_computed <= s.num_tokens + len(s.draft.proposals), f"{s}: draft ran ahead"
            elif s.output_ids:
                assert s.num_computed == s.num_tokens - 1, f"{s}: decode position out of step"
            else:
                assert 0 <= s.num_computed <= s.num_prompt_tokens, f"{s}: prefill position out of range"
