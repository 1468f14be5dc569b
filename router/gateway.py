"""The ingress's request logic, free of HTTP framing: validate, tokenize, choose a placement, call a worker.

``ingress.py`` maps HTTP onto it; tests and benchmarks can drive it directly.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from collections.abc import Callable

from policies.errors import (SHED_REASON_HEADER, BudgetUnmeetable, ContextTooLong, InvalidPlacement, InvalidRequest,
                             Unauthorized, UnknownModel, UnknownPreset)
from policies.placement import Placement
from policies.routing import PresetInfo, RoutingRequest
from policies.routing.types import Prediction
from router.api_models import ChatCompletionRequest, CompletionRequest, Routing, Sla
from router.config import AppConfig
from router.errors import replica_died
from router.routing import RoutingService
from workers.model.config import load_config
from workers.model.tokenizer import Tokenizer

log = logging.getLogger("supernet_router.requests")

SLA_HEADERS = {"x-slo-ttft-ms": "ttft_ms", "x-slo-tpot-ms": "tpot_ms", "x-deadline-ms": "deadline_ms"}


@dataclass(slots=True)
class Prepared:
    """A validated request, ready for a worker."""

    request_id: str
    prompt_ids: list[int]
    placement: Placement
    routing: Routing
    params: dict
    model: str
    started: float
    replica_id: str | None = None  # the replica the routing decision chose (None: Serve chooses)
    sla: Sla | None = None  # the request's budgets (metrics count them met or missed)
    downgrade: str | None = None  # why a faster preset than the best was chosen: "budget", "load" or None
    raw_prediction: Prediction | None = None  # the policy's uncalibrated prediction (for its calibration)
    draft: Placement | None = None  # speculate: the draft placement, proposing draft_tokens per verify step
    draft_tokens: int = 0
    served_by: str | None = None  # the replica that answered (its first message says)
    ended: bool = False  # Gateway.done ran

    @property
    def preset_label(self) -> str:
        """The preset as a metric label: its name, or "custom" for a placement that is no preset."""
        return self.routing.preset or "custom"


def load_api_keys(config: AppConfig) -> frozenset[str]:
    keys = {k.strip() for k in os.environ.get(config.ingress.api_keys_env, "").split(",") if k.strip()}
    if config.ingress.api_keys_file:
        keys |= {line.strip() for line in Path(config.ingress.api_keys_file).read_text().splitlines()
                 if line.strip() and not line.startswith("#")}
    return frozenset(keys)


class Gateway:
    def __init__(self, config: AppConfig, checkpoint: str, replicas: Callable[[], list] = list):
        self.config = config
        self.tokenizer = Tokenizer.load(checkpoint)
        model_config = load_config(checkpoint)
        self.num_layers = model_config.num_layers
        self.max_context = config.model.max_context_tokens or model_config.max_position_embeddings
        self.model_id = config.ingress.model_name or Path(checkpoint).name
        self.presets = {p.name: p for p in config.presets}
        self.placements = {name: model_config.placement(p.placement) for name, p in self.presets.items()}
        rated = [p for p in config.presets if p.quality is not None]
        best = max(rated, key=lambda p: p.quality).name if rated else (config.presets[0].name if config.presets else None)
        self.default_preset = config.routing.default_preset or best
        self.api_keys = load_api_keys(config)
        self.replicas = replicas  # Serve's running replicas, with their routing stats
        self.in_flight = 0  # prepared and not done: accepted requests that have not ended yet
        self.routing: RoutingService | None = None
        if config.tables.speed is not None:
            infos = [PresetInfo(n, self.placements[n], p.quality) for n, p in self.presets.items()]
            self.routing = RoutingService(config.routing.policy, config.tables.speed, infos, self.num_layers,
                                          self.default_preset, config.routing.margin, config.tables.acceptance,
                                          future_load_quantile=config.routing.future_load_quantile,
                                          protect_running=config.routing.protect_running,
                                          prefill_chunk=config.worker.max_prefill_tokens)
        self.best_quality = max((p.quality for p in rated), default=None)

    # ---- access ----

    def authorize(self, authorization: str | None) -> None:
        if not self.api_keys:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip(), k) for k in self.api_keys):
            raise Unauthorized("a valid API key is required: Authorization: Bearer <key>")

    def models(self) -> dict:
        created = 0
        data = [{"id": self.model_id, "object": "model", "created": created, "owned_by": "supernet-router"}]
        for name, preset in self.presets.items():
            data.append({"id": name, "object": "model", "created": created, "owned_by": "supernet-router",
                         "parent": self.model_id, "placement": self.placements[name].code,
                         "quality": preset.quality, "description": preset.description})
        return {"object": "list", "data": data}

    # ---- requests ----

    def prepare(self, body: CompletionRequest | ChatCompletionRequest, headers: dict[str, str]) -> Prepared:
        started = time.monotonic()
        sla = self._sla(body.sla, headers)
        if isinstance(body, ChatCompletionRequest):
            prompt_ids = self.tokenizer.encode_chat([{"role": m.role, "content": m.text} | ({"name": m.name} if m.name else {})
                                                   for m in body.messages])
        elif isinstance(body.prompt, list):
            prompt_ids = list(body.prompt)
            if any(t < 0 or t >= self.tokenizer.vocab_size for t in prompt_ids):
                raise InvalidRequest(f"token ids must be in [0, {self.tokenizer.vocab_size})", "prompt")
        else:
            prompt_ids = self.tokenizer.encode(body.prompt)
        max_tokens = body.max_tokens or self.config.ingress.max_tokens_default
        if body.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})",
                                 "min_tokens")
        if len(prompt_ids) + max_tokens > self.max_context:
            raise ContextTooLong(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                 f"context of {self.max_context} tokens: shorten the prompt or lower max_tokens",
                                 "max_tokens" if max_tokens > self.max_context // 2 else "prompt")
        placement, routing, replica, downgrade, *raw = self.choose(body, sla, len(prompt_ids), max_tokens)
        params = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                  "top_k": body.top_k, "seed": body.seed, "stop": list(body.stop or []), "ignore_eos": body.ignore_eos,
                  "min_tokens": body.min_tokens}
        prepared = Prepared(uuid.uuid4().hex, prompt_ids, placement, routing, params, body.model, started, replica,
                            sla, downgrade, raw[0] if raw else None)
        if routing.draft_placement is not None:
            prepared.draft = Placement.parse(routing.draft_placement, self.num_layers)
            prepared.draft_tokens = routing.draft_tokens
        if self.routing is not None:
            self.routing.dispatched(replica, prepared.request_id)
        self.in_flight += 1
        return prepared

    def served(self, prepared: Prepared, first_at: float | None, tokens: int) -> None:
        """A request ended well: its measured TTFT and TPOT calibrate the policy's later predictions."""
        policy = self.routing.policy if self.routing is not None else None
        if not hasattr(policy, "observe") or first_at is None or prepared.raw_prediction is None:
            return
        now = time.monotonic()
        ttft_ms = 1000 * (first_at - prepared.started)
        tpot_ms = 1000 * (now - first_at) / (tokens - 1) if tokens > 1 else None
        policy.observe(prepared.raw_prediction, ttft_ms, tpot_ms)

    def done(self, prepared: Prepared, error: BaseException | None = None) -> bool:
        """The request ended (``error``: how it failed). Idempotent: False if it had already ended."""
        if prepared.ended:
            return False
        prepared.ended = True
        self.in_flight -= 1
        if self.routing is not None:
            self.routing.finished(prepared.replica_id, prepared.request_id)
        if error is not None and replica_died(error):
            log.warning("worker replica %s died under request %s", prepared.served_by or prepared.replica_id,
                        prepared.request_id)
        return True

    def _sla(self, sla: Sla | None, headers: dict[str, str]) -> Sla | None:
        values = sla.model_dump() if sla else {}
        for header, field in SLA_HEADERS.items():
            raw = headers.get(header)
            if raw is None or values.get(field) is not None:
                continue  # the body wins over headers
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if not value > 0:
                raise InvalidRequest(f"header {header} must be a positive number of milliseconds, got {raw!r}",
                                     header)
            values[field] = value
        return Sla(**values) if any(v is not None for v in values.values()) else None

    def choose(self, body, sla: Sla | None, prompt_tokens: int, max_tokens: int):
        """(placement, routing, replica id, downgrade reason[, raw prediction]): the routing policy's decision,
        or forced / default without tables."""
        if body.model != self.model_id and body.model not in self.presets:
            raise UnknownModel(f"unknown model {body.model!r}: use {self.model_id!r} or a "
                               f"preset ({', '.join(self.presets) or 'none'})", "model")
        forced_placement = None
        if body.placement is not None:
            try:
                forced_placement = Placement.parse(body.placement, self.num_layers)
            except InvalidPlacement as exc:
                raise InvalidPlacement(exc.message, "placement") from None
        name = body.preset or (body.model if body.model in self.presets else None)
        if name is not None and name not in self.presets:
            raise UnknownPreset(f"unknown preset {name!r}: use one of "
                                f"{', '.join(self.presets) or 'none configured'}", "preset")
        draft = self._given_draft(body.speculation)
        if self.routing is not None:
            return self._decide(body, sla, prompt_tokens, max_tokens, name, forced_placement, draft)
        if forced_placement is not None:
            known = next((n for n, p in self.placements.items() if p == forced_placement), None)
            return (forced_placement, self._routing(known, forced_placement, "placement forced by the request", draft),
                    None, None)
        if name is not None:
            return (self.placements[name], self._routing(name, self.placements[name], "preset forced by the request",
                                                         draft), None, None)
        if self.default_preset is None:
            raise InvalidRequest("no presets are configured: give a placement", "placement")
        return (self.placements[self.default_preset],
                self._routing(self.default_preset, self.placements[self.default_preset],
                              "default preset (no speed table configured)", draft), None, None)

    def _given_draft(self, speculation) -> tuple[Placement, int] | None:
        """The client's own draft (``{"draft": ..., "tokens": k}``): a preset name or a placement code."""
        if isinstance(speculation, str):
            return None
        if speculation.draft in self.placements:
            return self.placements[speculation.draft], speculation.tokens
        try:
            return Placement.parse(speculation.draft, self.num_layers), speculation.tokens
        except InvalidPlacement as exc:
            raise InvalidPlacement(f"speculation.draft is neither a preset ({', '.join(self.presets)}) nor a "
                                   f"placement: {exc.message}", "speculation.draft") from None

    def _decide(self, body, sla: Sla | None, prompt_tokens: int, max_tokens: int, name: str | None,
                placement: Placement | None, draft: tuple[Placement, int] | None):
        speculation = "given" if draft is not None else body.speculation
        request = RoutingRequest(prompt_tokens, max_tokens, sla.ttft_ms if sla else None, sla.tpot_ms if sla else None,
                                 sla.deadline_ms if sla else None, body.min_quality, body.priority,
                                 preset=name if placement is None else None, placement=placement,
                                 speculation=speculation, draft=draft[0] if draft else None,
                                 draft_tokens=draft[1] if draft else 0, sampled=body.temperature > 0)
        replicas = self.replicas()
        decision = self.routing.decide(request, replicas)
        if decision.shed:
            retry = self.config.routing.retry_after_s
            raise BudgetUnmeetable("no preset can meet this request's latency budget at the current load; "
                                   f"retry in {retry} s, relax the budget or raise its priority",
                                   headers={"Retry-After": str(retry), SHED_REASON_HEADER: decision.reason})
        prediction = decision.prediction
        routing = Routing(preset=decision.preset, placement=decision.placement.code,
                          predicted_ttft_ms=prediction.ttft_ms if prediction else None,
                          predicted_tpot_ms=prediction.tpot_ms if prediction else None,
                          predicted_quality=prediction.quality if prediction else None,
                          reason=decision.reason, sla_at_risk=decision.sla_at_risk)
        if decision.draft is not None:
            routing.draft_placement, routing.draft_preset = decision.draft.code, decision.draft_preset
            routing.draft_tokens = decision.draft_tokens
            if decision.plain_tpot_ms is not None and prediction is not None and prediction.tpot_ms > 0:
                routing.predicted_plain_tpot_ms = decision.plain_tpot_ms
                routing.predicted_speculation_gain = decision.plain_tpot_ms / prediction.tpot_ms
        downgrade = (self.routing.downgrade(decision, request, self.best_quality, replicas)
                     if self.config.routing.policy == "sla" else None)
        return decision.placement, routing, decision.replica_id, downgrade, decision.raw_prediction

    def _routing(self, name: str | None, placement: Placement, reason: str,
                 draft: tuple[Placement, int] | None = None) -> Routing:
        quality = self.presets[name].quality if name is not None else None
        routing = Routing(preset=name, placement=placement.code, predicted_quality=quality, reason=reason)
        if draft is not None:
            routing.draft_placement, routing.draft_tokens = draft[0].code, draft[1]
            routing.draft_preset = next((n for n, p in self.placements.items() if p == draft[0]), None)
        return routing

    def worker_request(self, prepared: Prepared) -> dict:
        return {"request_id": prepared.request_id, "prompt_ids": prepared.prompt_ids,
                "placement": prepared.placement.code, "params": prepared.params, "replica_id": prepared.replica_id,
                "sla": prepared.sla.model_dump() if prepared.sla else None, "downgrade": prepared.downgrade,
                "draft": prepared.draft.code if prepared.draft is not None else None,
                "draft_tokens": prepared.draft_tokens}

    def log_done(self, prepared: Prepared, completion_tokens: int, finish_reason: str | None,
                 prompt_text: str | None = None) -> None:
        elapsed_ms = 1000 * (time.monotonic() - prepared.started)
        extra = f" prompt={prompt_text!r}" if self.config.ingress.log_prompts and prompt_text is not None else ""
        log.info("request %s preset=%s placement=%s prompt_tokens=%d completion_tokens=%d finish=%s ms=%.1f%s",
                 prepared.request_id, prepared.routing.preset, prepared.placement.code, len(prepared.prompt_ids),
                 completion_tokens, finish_reason, elapsed_ms, extra)


async def first_and_rest(stream: AsyncIterator):
    """Await the first item (so admission errors surface before any response is sent), then the rest."""
    iterator = stream.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None
    return first, iterator
