"""The Ray Serve worker: one replica holds one model and its engine, and streams tokens for any placement.

A thin shim (Ray Serve LLM's ``LLMServer`` pattern): the engine is built by an
injected factory, requests and token batches cross the actor boundary as plain
dicts, and errors as the project's own (picklable) exceptions. Every message to
the caller costs far more CPU than a token, so a message carries every token
that is already waiting when it is sent (never waiting for more). The ingress
path (``submit`` / ``subscribe`` / ``abort``, ``workers/subscriptions.py``)
sends one message per engine step per ingress, for all its requests;
``generate`` streams one request, for single callers (benches, tools).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from policies.errors import ConfigError, EngineFailure, ReplicaNotReached, WorkerUnavailable
from policies.placement import Placement
from policies.routing.arrivals import ArrivalMeter
from workers.engine import AsyncEngine, Engine, EngineConfig, Request, ServingEngine
from workers.model.loader import load_checkpoint
from workers.model.tokenizer import Tokenizer
from workers.sampling import SamplingParams
from workers.subscriptions import Subscriptions, merged

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a replica needs to build its engine (plain values: it is pickled to the replica)."""

    checkpoint: str
    device: str = "auto"
    dtype: str = "auto"
    num_threads: int = 1
    cache_budget_bytes: int | None = None
    gpu_memory_fraction: float = 0.8
    max_prefill_tokens: int = 256
    max_running: int = 64
    max_open_requests: int = 128  # accepted requests (running or waiting in the engine); more: Overloaded
    fault_injection: bool = False  # chaos tests may arm step failures (inject_step_faults)
    check_invariants: bool = False  # the engine checks its bookkeeping after every step


def build_engine(spec: WorkerSpec) -> Engine:
    """Load the checkpoint on the spec's device and wrap it in an engine."""
    if spec.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(spec.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, spec.num_threads))
    if spec.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, spec.dtype)
    model = load_checkpoint(spec.checkpoint, device=device, dtype=dtype)
    config = EngineConfig(cache_budget_bytes=spec.cache_budget_bytes, gpu_memory_fraction=spec.gpu_memory_fraction,
                          max_prefill_tokens=spec.max_prefill_tokens, max_running=spec.max_running,
                          check_invariants=spec.check_invariants)
    return Engine(model, config, Tokenizer.load(spec.checkpoint))


def build_serving_engine(spec: WorkerSpec) -> ServingEngine:
    """The default engine behind a replica: ours, stepped in its own thread."""
    return AsyncEngine(build_engine(spec))


def request_from_dict(data: dict, num_layers: int) -> Request:
    params = data.get("params", {})
    return Request(
        prompt_ids=tuple(data["prompt_ids"]),
        placement=Placement.parse(data["placement"], num_layers),
        params=SamplingParams(
            max_tokens=params.get("max_tokens", 16), temperature=params.get("temperature", 0.0),
            top_p=params.get("top_p", 1.0), top_k=params.get("top_k", 0), seed=params.get("seed"),
            stop=tuple(params.get("stop", ())), ignore_eos=params.get("ignore_eos", False),
            min_tokens=params.get("min_tokens", 0),
        ),
        request_id=data["request_id"],
        draft=Placement.parse(data["draft"], num_layers) if data.get("draft") else None,
        draft_tokens=data.get("draft_tokens", 0) if data.get("draft") else 0,
    )


def routing_stats(stats, arrivals: tuple[float, float] = (0.0, 0.0),
                  step_allowances: dict[str, float] | None = None) -> dict:
    """A compact, JSON-friendly load snapshot: running rows, the queue, cache memory, the measured step time,
    ``arrivals`` (``ArrivalMeter.snapshot``: requests per second and mean prompt tokens lately) and the
    running requests' ``step_allowances`` (``Subscriptions.step_allowances``; request id -> ms)."""
    running = len(stats.running)
    decode_steps = [r.seconds for r in stats.recent_steps[-16:]
                    if r.num_prefill_tokens == 0 and r.num_rows == running and running]
    decode_steps.sort()
    return {
        "taken_at": time.time(),
        # The request id lets the router drop rows it has seen finish since this snapshot was taken.
        "running": [[s.placement, s.context_tokens, s.max_tokens - s.output_tokens, s.cache_bytes, s.request_id]
                    for s in stats.running],
        "waiting_requests": len(stats.waiting),
        "waiting_prompt_tokens": stats.waiting_prompt_tokens,
        "prefill_backlog_tokens": sum(s.prefill_tokens_left for s in stats.running),
        "waiting_cache_bytes": sum(s.cache_bytes for s in stats.waiting),
        "cache_budget_bytes": stats.cache_budget_bytes,
        "cache_used_bytes": stats.cache_used_bytes,
        "decode_step_ms": 1000 * decode_steps[len(decode_steps) // 2] if decode_steps else None,
        "arrivals_per_s": round(arrivals[0], 4),
        "arrival_prompt_tokens": round(arrivals[1], 1),
        "step_allowance_ms": step_allowances or {},
        # Per (target, draft) pair since the engine started: proposals kept and examined (acceptance on this
        # traffic, which the router's speculation decisions use once there is enough of it).
        "speculation": [[s.target, s.draft, s.accepted, s.accepted + s.rejected_steps] for s in stats.speculation],
    }


async def batches(events: AsyncIterable) -> AsyncIterator[list]:
    """The events, each time as the next one plus every one already waiting behind it; never waits for more.

    A pump task drains the stream into a buffer as events arrive, so whatever piled up while the consumer
    was busy (sending the last batch) goes out together. Closing this generator cancels the pump, which
    closes the stream (the engine aborts the request)."""
    buffer: deque = deque()
    arrived = asyncio.Event()
    ended: list[BaseException | None] = []

    async def pump() -> None:
        try:
            async for event in events:
                buffer.append(event)
                arrived.set()
        except BaseException as exc:  # noqa: BLE001: handed to the consumer, in order after the events
            ended.append(exc)
        else:
            ended.append(None)
        arrived.set()

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            if buffer:
                batch = list(buffer)
                buffer.clear()
                yield batch
            if ended and not buffer:
                if ended[0] is not None and not isinstance(ended[0], asyncio.CancelledError):
                    raise ended[0]
                return
    finally:
        task.cancel()


def _replica_id() -> str | None:
    """This Serve replica's unique id; None outside Serve (tests, the CLI)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001: RayServeException outside a replica
        return None


class WorkerObserver(Protocol):
    """What a replica reports besides routing stats (``router.metrics.WorkerMetrics``: metrics, autoscaling)."""

    def observe(self, stats) -> None: ...  # an EngineStats, every routing stats period

    def request_done(self, request: dict, ttft_s: float | None, duration_s: float, tokens: int) -> None: ...

    def autoscaling_stats(self, waiting: int) -> dict[str, float]: ...


class WorkerServer:
    """A Serve replica's body; ``router/app.py`` turns it into a deployment."""

    def __init__(self, spec: WorkerSpec, engine_factory: Callable[[WorkerSpec], ServingEngine] = build_serving_engine,
                 observer: WorkerObserver | None = None):
        self.spec = spec
        self.engine = engine_factory(spec)  # only the ServingEngine calls (workers/engine/seam.py) from here on
        self.num_layers = self.engine.facts.num_layers
        self.observer = observer
        self.replica_id = _replica_id()  # what submit answers (the ingress's x-supernet-replica)
        self.arrivals = ArrivalMeter(started_at=time.monotonic())  # loop thread only
        self.subscriptions = Subscriptions(self.engine, lambda r: request_from_dict(r, self.num_layers),
                                           spec.max_open_requests,
                                           observer.request_done if observer is not None else None)

    # ---- the ingress path: one subscription per ingress, unary submit and abort ----

    async def submit(self, request: dict) -> str | None:
        """Accept a request (its tokens go out on ``request["ingress"]``'s subscription); this replica's id.

        Raises at once what makes it unservable (InvalidRequest, ContextTooLong, Overloaded)."""
        self._ensure_started()
        self.subscriptions.submit(request)
        self.arrivals.record(time.monotonic(), len(request["prompt_ids"]))
        return self.replica_id

    async def abort(self, request: dict) -> bool:
        """``{"ingress", "request_id"}``: the client left; the engine frees the cache at its next step."""
        return self.subscriptions.abort(request["ingress"], request["request_id"])

    async def subscribe(self, request: dict) -> AsyncIterator[dict]:
        """``{"ingress", "replica_id"}``: per engine step, ``{request_id: merged tokens}`` for that ingress.

        Pinned: a subscription routed to another replica than the one asked for (it is gone) fails, so
        that the ingress ends the requests it had there."""
        wanted = request.get("replica_id")
        if wanted is not None and self.replica_id is not None and wanted != self.replica_id:
            raise ReplicaNotReached(f"worker replica {wanted} is gone")
        self._ensure_started()
        async for message in self.subscriptions.stream(request["ingress"]):
            yield message

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Token batches as dicts: {text, tokens, finish_reason} (``merged``). A failure raises EngineFailure."""
        self._ensure_started()
        arrived, first_at, tokens = time.monotonic(), None, 0
        stream = self.engine.submit(request_from_dict(request, self.num_layers))
        self.arrivals.record(time.monotonic(), len(request["prompt_ids"]))
        async for batch in batches(stream):
            if first_at is None:
                first_at = time.monotonic()
            message = merged(batch)
            tokens += message["tokens"]
            yield message
        if self.observer is not None:
            self.observer.request_done(request, first_at - arrived if first_at is not None else None,
                                       time.monotonic() - arrived, tokens)

    async def stats(self) -> dict:
        self._ensure_started()
        return dataclasses.asdict(self.engine.stats())

    def inject_step_faults(self, steps: int = 1) -> int:
        """Chaos tests: the next ``steps`` model steps fail as on a GPU out of memory (their rows end with an
        error; the engine serves on). Refused unless the spec allows it. Returns the steps now armed."""
        faults = getattr(self.engine, "faults", None)
        if not self.spec.fault_injection or faults is None:
            raise ConfigError("fault injection is off for this worker: set worker.fault_injection: true "
                              "(chaos tests only)")
        faults.arm(steps)
        return faults.armed

    async def record_routing_stats(self) -> dict:
        """What the router needs of this replica's load, pushed by Serve every routing stats period.

        A coroutine, so that Serve runs it on the replica's loop: a plain method goes to a thread pool, a
        thread hop ten times a second for a snapshot that takes microseconds."""
        stats = self.engine.stats()
        if self.observer is not None:
            self.observer.observe(stats)
        now = time.monotonic()
        return routing_stats(stats, self.arrivals.snapshot(now), self.subscriptions.step_allowances(now))

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """This replica's load and quality signals, pulled by Serve for the autoscaling policy (in-process path)."""
        if self.observer is None:
            return {}
        return self.observer.autoscaling_stats(self.engine.stats().num_waiting)

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        if self.engine.failure is not None:
            raise EngineFailure(self.engine.failure)

    def _ensure_started(self) -> None:
        # Started lazily, from the replica's event loop, which is the loop that consumes the streams.
        if not self.engine.started:
            self.engine.start()

