"""The synchronous engine: submit requests, call ``step()``, get token events. Continuous batching.

``add_request`` and ``abort`` may be called from any thread: they check the
request and queue an operation under a lock; ``step()`` (one thread at a time)
takes the queued operations, admits what fits, runs one forward for every
running row and turns sampled tokens into events. Everything else is touched by
the stepping thread only. ``AsyncEngine`` runs ``step()`` in its own thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque

from policies.errors import ConfigError, InvalidRequest
from workers.engine.admission import AdmissionCheck
from workers.engine.config import EngineConfig
from workers.engine.detokenizer import Decoder, Detokenizer
from workers.engine.faults import StepFaults
from workers.engine.request import Request, TokenEvent
from workers.engine.pool import CachePool
from workers.engine.runner import ModelRunner, free_device_bytes
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import Sequence, Status
from workers.engine.speculation import RowKind
from workers.engine.stats import EngineStats, FinishCounts, SequenceStats, SpeculationStats, StepRecord
from workers.model.supernet import SupernetLM

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: SupernetLM, config: EngineConfig | None = None, tokenizer: Decoder | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        # Keys, values and conv history in the model's dtype; the pool's layout is exactly this model's.
        self.memory = model.config.memory_model(kv_bytes=model.dtype.itemsize, page_tokens=self.config.page_tokens)
        budget = self.config.cache_budget_bytes
        if budget is None:
            free = free_device_bytes(model)
            if free is None:
                raise ConfigError("cache_budget_bytes must be set for an engine on the CPU (on CUDA it defaults "
                                  "to gpu_memory_fraction of the memory free after loading the weights)")
            budget = int(free * self.config.gpu_memory_fraction)
        # The whole budget, allocated once; the scheduler lends what the pool lends (all but the null block).
        self.pool = CachePool(self.memory, budget, self.config.max_running, model.config.max_position_embeddings,
                              model.dtype, model.device)
        self.runner = ModelRunner(model, self.pool, self.config.decode_graphs)
        self.scheduler = Scheduler(self.pool.usable_bytes, self.config.max_prefill_tokens, self.config.max_running)
        self.admission = AdmissionCheck(model, self.memory, self.pool.usable_bytes, has_tokenizer=tokenizer is not None)
        self.faults = StepFaults()  # chaos tests arm it: the next model steps raise
        self._lock = threading.Lock()  # guards the three fields below
        self._inbox: list[tuple[str, Sequence]] = []  # ("add" | "abort", sequence), in call order
        self._active: dict[str, Sequence] = {}  # submitted and not finished
        self._num_submitted = 0  # arrival index of the next request
        self._steps: deque[StepRecord] = deque(maxlen=self.config.step_history)
        self._speculation: dict[tuple[str, str], list[int]] = {}  # (target, draft) -> SpeculationStats' counts
        self._num_steps = 0
        self._finished = dict.fromkeys(("stop", "length", "abort", "error"), 0)  # FinishCounts' fields
        self._snapshot = self._make_stats()

    @property
    def budget_bytes(self) -> int:
        return self.scheduler.budget_bytes

    # ---- submission (any thread) ----

    def add_request(self, request: Request) -> None:
        """Queue a request for the next step; raise InvalidRequest/ContextTooLong if it can never run."""
        cache_bytes = self.admission.check(request)
        detokenizer = Detokenizer(self.tokenizer, request.stop_strings, request.params.min_tokens)
        with self._lock:
            if request.request_id in self._active:
                raise InvalidRequest(f"request id {request.request_id!r} is already in use")
            sequence = Sequence(request, self._num_submitted, cache_bytes, detokenizer)
            self._num_submitted += 1
            self._active[request.request_id] = sequence
            self._inbox.append(("add", sequence))

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its cache is freed at the next step, which emits its "abort" event.

        Returns False for an id that is unknown or already finished (nothing to do).
        """
        with self._lock:
            sequence = self._active.get(request_id)
            if sequence is not None:
                self._inbox.append(("abort", sequence))
            return sequence is not None

    def has_work(self) -> bool:
        with self._lock:
            pending = bool(self._inbox)
        return pending or self.scheduler.has_work()

    def stats(self) -> EngineStats:
        """The snapshot taken after the last step, plus requests submitted since (cheap: no torch)."""
        snapshot = self._snapshot
        with self._lock:
            pending = [s for op, s in self._inbox if op == "add"]
        if not pending:
            return snapshot
        return dataclasses.replace(snapshot, waiting=snapshot.waiting + tuple(map(_sequence_stats, pending)))

    # ---- stepping (one thread) ----

    def step(self) -> list[TokenEvent]:
        """Admit what fits, run one forward over all running rows, return the events it produced."""
        started = time.perf_counter()
        with self._lock:
            inbox, self._inbox = self._inbox, []
        events = []
        for op, sequence in inbox:
            if op == "add":
                self.scheduler.add(sequence)
            elif sequence.status is not Status.FINISHED:
                events.append(self._finish(sequence, "abort"))
        for sequence in self.scheduler.admit():
            try:
                self.runner.allocate(sequence)
            except Exception as exc:  # a bug in the accounting, or the device: end this stream, keep serving
                log.exception("allocating the cache of %s failed", sequence.request_id)
                events.append(self._finish(sequence, "error", f"cache allocation failed: {exc!r}"))
        batch = self.scheduler.schedule()
        if batch.num_rows:
            try:
                self.faults.check()
                tokens = self.runner.run(batch)
            except Exception as exc:  # the rows' caches are now partly written: end exactly those streams
                log.exception("model step over %d rows failed", batch.num_rows)
                events += [self._finish(s, "error", f"model step failed: {exc!r}") for s in batch.sequences]
                tokens = []
            else:
                self.scheduler.postprocess(batch, tokens)
                for sequence, kind, given in zip(batch.sequences, batch.kinds, tokens):
                    if kind is RowKind.VERIFY:
                        self._count_verify(sequence)
                    if kind is not RowKind.DRAFT:
                        events += self._on_tokens(sequence, given)
            seconds = time.perf_counter() - started
            emitted = sum(len(t) for t, kind in zip(tokens, batch.kinds) if kind is not RowKind.DRAFT)
            self._steps.append(StepRecord(batch.num_rows, batch.num_decode_rows, batch.num_prefill_tokens,
                                          emitted, seconds, time.monotonic()))
            self._num_steps += 1
            log.debug("step %d: %d rows (%d decode, %d prefill tokens) in %.2f ms", self._num_steps,
                      batch.num_rows, batch.num_decode_rows, batch.num_prefill_tokens, seconds * 1e3)
        self._snapshot = self._make_stats()
        if self.config.check_invariants:
            self.check_invariants()
        return events

    def run_until_idle(self, max_steps: int | None = None) -> list[TokenEvent]:
        """Step until nothing is waiting or running; all events, in order."""
        events, steps = [], 0
        while self.has_work() and (max_steps is None or steps < max_steps):
            events += self.step()
            steps += 1
        return events

    def check_invariants(self) -> None:
        """Bookkeeping checks for tests (call between steps, from the stepping thread)."""
        self.scheduler.check_invariants()
        with self._lock:
            active = set(self._active)
            pending = {s.request_id for op, s in self._inbox if op == "add"}
        queued = {s.request_id for s in self.scheduler.waiting} | {s.request_id for s in self.scheduler.running}
        assert active == queued | pending, f"active requests {active} != queued {queued} + pending {pending}"
        self.pool.check_invariants()
        for s in self.scheduler.running:
            assert s.blocks is not None, f"{s} runs without cache blocks"
            held = s.blocks.num_blocks * self.pool.block_bytes
            if s.draft is not None:
                assert s.draft.blocks is not None, f"{s} speculates without draft blocks"
                held += s.draft.blocks.num_blocks * self.pool.block_bytes
            request = s.request
            predicted = self.memory.speculative_bytes(request.placement, request.draft, s.capacity,
                                                      request.speculative_tokens)
            assert held == s.cache_bytes == predicted, f"{s}: holds {held} bytes, reserved {s.cache_bytes}, " \
                                                       f"policies.memory predicts {predicted}"
        stats = self._snapshot
        assert self.pool.held_bytes == stats.cache_used_bytes == self.scheduler.used_bytes, \
            f"the pool holds {self.pool.held_bytes} bytes, the scheduler accounts {self.scheduler.used_bytes}"
        assert stats.cache_used_bytes <= stats.cache_budget_bytes <= self.pool.arena.nbytes

    # ---- internals ----

    def _on_tokens(self, sequence: Sequence, tokens: list[int]) -> list[TokenEvent]:
        """Events for the tokens a row gave (already appended to the outputs), in order, up to the one that
        ends the sequence (a verify row may give an end-of-sequence or a stop string before its last token:
        the tokens after it are dropped)."""
        events, first = [], len(sequence.output_ids) - len(tokens)
        for i, token in enumerate(tokens):
            events.append(self._on_token(sequence, token, first + i + 1))
            if events[-1].finished:
                del sequence.output_ids[first + i + 1:]
                break
        return events

    def _on_token(self, sequence: Sequence, token: int, count: int) -> TokenEvent:
        """Text and finish reason for a sampled token, the ``count``-th output; ends the sequence when it is
        done."""
        rid, params = sequence.request_id, sequence.request.params
        try:
            text, stopped = sequence.detokenizer.add(token)
            eos = sequence.request.eos_token_id
            eos = self.model.config.eos_token_id if eos is None else eos
            reason = None
            if stopped or (token == eos and not params.ignore_eos):
                reason = "stop"
            elif count >= params.max_tokens:
                reason = "length"
            if reason is not None and not stopped:
                rest, stopped = sequence.detokenizer.flush()
                text += rest
                reason = "stop" if stopped else reason
        except Exception as exc:  # a tokenizer failure ends this stream only
            log.exception("post-processing a token of %s failed", rid)
            return self._finish(sequence, "error", f"detokenizing failed: {exc!r}")
        if reason is not None:
            self._finish(sequence, reason)
        return TokenEvent(rid, token, text, reason)

    def draft_of(self, request_id: str):
        """The ``speculation.Draft`` of a submitted, unfinished request (its counters; None without a draft)."""
        with self._lock:
            sequence = self._active.get(request_id)
        return None if sequence is None else sequence.draft

    def _count_verify(self, sequence: Sequence) -> None:
        proposed, kept = sequence.draft.last_verify
        pair = (sequence.request.placement.code, sequence.draft.placement.code)
        counts = self._speculation.setdefault(pair, [0, 0, 0, 0])
        counts[0] += proposed
        counts[1] += kept
        counts[2] += 1
        counts[3] += kept < proposed

    def _finish(self, sequence: Sequence, reason: str, error: str | None = None) -> TokenEvent:
        self.scheduler.finish(sequence)
        self.runner.release(sequence)
        sequence.finish_reason = reason
        self._finished[reason] += 1
        with self._lock:
            self._active.pop(sequence.request_id, None)
        return TokenEvent(sequence.request_id, None, "", reason, error)

    def _make_stats(self) -> EngineStats:
        return EngineStats(
            waiting=tuple(map(_sequence_stats, self.scheduler.waiting)),
            running=tuple(map(_sequence_stats, self.scheduler.running)),
            cache_budget_bytes=self.scheduler.budget_bytes,
            cache_used_bytes=self.scheduler.used_bytes,
            recent_steps=tuple(self._steps),
            num_steps=self._num_steps,
            taken_at=time.monotonic(),
            speculation=tuple(SpeculationStats(target, draft, *counts)
                              for (target, draft), counts in self._speculation.items()),
            finished=FinishCounts(**self._finished),
        )


def _sequence_stats(s: Sequence) -> SequenceStats:
    draft = s.request.draft
    return SequenceStats(s.request.placement.code, s.num_prompt_tokens, len(s.output_ids),
                         s.request.params.max_tokens, s.cache_bytes, max(s.num_prompt_tokens - s.num_computed, 0),
                         s.request_id, "" if draft is None else draft.code, s.request.speculative_tokens)
