"""The HTTP ingress (a Ray Serve FastAPI deployment): OpenAI-compatible completions with latency budgets.

Thin by design: it frames HTTP, and ``Gateway`` decides. Every accepted
request ends with a response or an explicit error: errors before the first
token are HTTP statuses with a JSON body; an error mid-stream is a final SSE
``error`` event.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type on Serve-wrapped methods.

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from router.api_models import ChatCompletionRequest, CompletionRequest, Usage
from router.config import AppConfig
from router.errors import SHED_REASON_HEADER, ApiError, from_exception
from router.gateway import Gateway, Prepared, first_and_rest
from router.metrics import Recorder, RequestMetrics, replica_identity
from router.replica_router import replicas_of

log = logging.getLogger(__name__)

api = FastAPI(title="supernet-router", description="OpenAI-compatible API with per-request latency budgets.")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"the request body ({declared} bytes) exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"the request body exceeds the limit of {limit} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    return data


def parse(model, data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, "invalid_request", f"{field}: {message}" if field else message, field) from None


async def collect(first, rest) -> tuple[str, int, str | None]:
    parts, tokens, finish, event = [], 0, None, first
    while event is not None:
        parts.append(event["text"])
        tokens += event["token_id"] is not None
        finish = event["finish_reason"]
        event = await anext(rest, None)
    return "".join(parts), tokens, finish


def _id(prepared: Prepared, chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{prepared.request_id}"


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@serve.deployment(name="SupernetIngress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, worker, config: dict, checkpoint: str):
        self.config = AppConfig.model_validate(config)
        self.gateway = Gateway(self.config, checkpoint, replicas=lambda: replicas_of("SupernetWorker"))
        self.worker = worker
        self._stream_handle = worker.options(stream=True)  # cached: options() is not free
        self.metrics = RequestMetrics(Recorder(replica_identity()[0], self.config.metrics.enabled))
        self._replica_metrics_task = None

    @api.get("/health")
    async def health(self):
        try:
            await self.worker.stats.remote()
        except Exception as exc:  # noqa: BLE001: any failure means not ready
            return ApiError(503, "worker_unavailable", f"no worker answered: {from_exception(exc).message}").response()
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self.gateway.authorize(request.headers.get("authorization"))
        return self.gateway.models()

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, CompletionRequest, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, ChatCompletionRequest, chat=True)

    async def _generate(self, request: Request, model, chat: bool):
        self._start_replica_metrics()
        prepared = None
        try:
            self.gateway.authorize(request.headers.get("authorization"))
            body = parse(model, await read_json(request, self.config.ingress.max_body_bytes))
            prepared = self.gateway.prepare(body, {k.lower(): v for k, v in request.headers.items()})
            events = self._stream_handle.generate.remote(self.gateway.worker_request(prepared))
            self.metrics.routed(prepared, time.monotonic() - prepared.started)
            first, rest = await first_and_rest(events)  # admission errors become statuses here
            first_at = time.monotonic()
        except Exception as exc:  # noqa: BLE001: every error maps to a status at this boundary
            if prepared is not None:
                self.gateway.done(prepared)
            error = from_exception(exc)
            self.metrics.refused(prepared, error.status, error.headers.get(SHED_REASON_HEADER))
            return error.response()
        headers = {**prepared.routing.headers(), "x-supernet-request-id": prepared.request_id}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(prepared, first, rest, chat, include_usage, first_at),
                                     media_type="text/event-stream", headers=headers)
        try:
            text, tokens, finish = await collect(first, rest)
        except Exception as exc:  # noqa: BLE001
            self.metrics.finished(prepared, "error", first_at, 0)
            return from_exception(exc).response()
        finally:
            self.gateway.done(prepared)
        self.metrics.finished(prepared, "ok", first_at, tokens)
        self.gateway.served(prepared, first_at, tokens)
        self.gateway.log_done(prepared, tokens, finish)
        usage = Usage(prompt_tokens=len(prepared.prompt_ids), completion_tokens=tokens,
                      total_tokens=len(prepared.prompt_ids) + tokens)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        response = {"id": _id(prepared, chat), "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": prepared.model, "choices": [choice],
                    "usage": usage.model_dump(), "routing": prepared.routing.model_dump()}
        return JSONResponse(response, headers=headers)

    async def _sse(self, prepared: Prepared, first, rest, chat: bool, include_usage: bool, first_at: float):
        base = {"id": _id(prepared, chat), "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": prepared.model}
        tokens, finish, outcome = 0, None, "cancelled"  # cancelled: the client left mid-stream
        if chat:
            yield _data({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}], "routing": prepared.routing.model_dump()})
        try:
            event = first
            while event is not None:
                tokens += event["token_id"] is not None
                finish = event["finish_reason"]
                if event["text"] or finish:
                    choice = ({"index": 0, "delta": {"content": event["text"]} if event["text"] else {},
                               "finish_reason": finish} if chat
                              else {"index": 0, "text": event["text"], "logprobs": None, "finish_reason": finish})
                    chunk = {**base, "choices": [choice]}
                    if not chat and tokens == 1:
                        chunk["routing"] = prepared.routing.model_dump()
                    yield _data(chunk)
                event = await anext(rest, None)
            outcome = "ok"
        except Exception as exc:  # noqa: BLE001: mid-stream errors end the stream explicitly
            outcome = "error"
            error = from_exception(exc)
            yield _data({"error": {"message": error.message, "type": "server_error", "code": error.code}})
        finally:
            self.gateway.done(prepared)
            self.metrics.finished(prepared, outcome, first_at, tokens)
            if outcome == "ok":
                self.gateway.served(prepared, first_at, tokens)
        if include_usage:
            n = len(prepared.prompt_ids)
            yield _data({**base, "choices": [], "usage": {"prompt_tokens": n, "completion_tokens": tokens,
                                                          "total_tokens": n + tokens}})
        self.gateway.log_done(prepared, tokens, finish)
        yield "data: [DONE]\n\n"

    def _start_replica_metrics(self) -> None:
        """The per-replica routing view (calibration, predicted/measured step) as gauges, every stats period."""
        if self._replica_metrics_task is None and self.gateway.routing is not None and self.config.metrics.enabled:
            self._replica_metrics_task = asyncio.get_running_loop().create_task(self._replica_metrics())

    async def _replica_metrics(self) -> None:
        while True:
            try:
                self.metrics.replicas(self.gateway.routing, self.gateway.replicas())
            except Exception:  # noqa: BLE001: metrics never break serving
                log.exception("recording the replicas' routing metrics failed")
            await asyncio.sleep(self.config.routing.stats_period_s)
