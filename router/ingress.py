"""The HTTP ingress (a Ray Serve FastAPI deployment): OpenAI-compatible completions with latency budgets.

Thin by design: it frames HTTP, and ``Gateway`` decides. Every accepted
request ends with a response or an explicit error: errors before the first
token are HTTP statuses with a JSON body (every exception is mapped once, by
``router.errors``); an error mid-stream is a final SSE ``error`` event. The
worker sends tokens in batches; each batch is one SSE event, written from a
template encoded once per request (``router.sse``). The tokens come from
``router.worker_streams``: one subscription per worker replica carries every
request's tokens of an engine step in one message.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type on Serve-wrapped methods.

import asyncio
import json
import logging
import time

import httpx

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from policies.errors import (SHED_REASON_HEADER, BodyTooLarge, InvalidJson, InvalidRequest, MetricsUnavailable,
                             SupernetError, UnsupportedMediaType, WorkerUnavailable)
from router.api_models import ChatCompletionRequest, CompletionRequest, Usage
from router.config import AppConfig
from router.errors import as_supernet_error, error_body, error_response
from router.gateway import Gateway, Prepared, first_and_rest
from router.http_server import HttpServer
from router.openapi import (ChatCompletionChunk, ChatCompletionResponse, CompletionChunk, CompletionResponse, Health,
                            ModelList, install, responses, route_docs)
from router.sse import SseWriter
from router.metrics import Recorder, RequestMetrics, replica_identity
from router.metrics_text import PROMETHEUS_TEXT, application_metrics, metrics_url
from router.replica_router import replicas_of
from router.worker_streams import WorkerStreams

log = logging.getLogger(__name__)

api = FastAPI(title="supernet-router", description="OpenAI-compatible API with per-request latency budgets.")
install(api)


@api.exception_handler(SupernetError)
async def _supernet_error(request: Request, exc: SupernetError) -> JSONResponse:
    return error_response(exc)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request: Request, limit: int) -> dict:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise UnsupportedMediaType(f"the body must be JSON: send content-type: application/json, not {kind!r}",
                                   "content-type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body ({declared} bytes) exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data


def parse(model, data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = max(errors, key=lambda e: len(e["loc"]))  # the deepest: in a union, the branch that got furthest
        # Union branches show up in the location as type names (``list[TextPart]``, ``str``): not fields.
        field = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p.isidentifier()
                         and p not in ("str", "int", "list")) or None
        message = first["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"{field}: {message}" if field else message, field) from None


async def collect(first, rest) -> tuple[str, int, str | None]:
    parts, tokens, finish, batch = [], 0, None, first
    while batch is not None:
        parts.append(batch["text"])
        tokens += batch["tokens"]
        finish = batch["finish_reason"]
        batch = await anext(rest, None)
    return "".join(parts), tokens, finish


class EndingStreamingResponse(StreamingResponse):
    """A streaming response that always closes its body and then calls ``ended``: Starlette never starts the
    body of a client that left before the response began, so the body's own cleanup would never run."""

    def __init__(self, content, ended, **kwargs):
        super().__init__(content, **kwargs)
        self._ended = ended

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._ended()


def _id(prepared: Prepared, chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{prepared.request_id}"


@serve.deployment(name="SupernetIngress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, worker, config: dict, checkpoint: str, listen: tuple[str, int] | None = None):
        """``listen``: (host, port) to serve HTTP on from this replica (``router.http_server``); None: only
        through Serve's HTTP proxy."""
        self.config = AppConfig.model_validate(config)
        self.gateway = Gateway(self.config, checkpoint, replicas=lambda: replicas_of("SupernetWorker"))
        self.worker = worker
        self.streams = WorkerStreams(worker)
        self.metrics = RequestMetrics(Recorder(replica_identity()[0], self.config.metrics.enabled))
        self._replica_metrics_task = None
        self._metrics_url = metrics_url()  # this node's, fixed for the replica's life (a GCS call: not per scrape)
        self.http = None
        if listen is not None:  # Serve runs __init__ on the replica's event loop: the server shares it
            self.http = HttpServer(api, *listen)
            self.http.start()

    @api.get("/health", responses=responses(Health, 503))
    async def health(self):
        try:
            await self.worker.stats.remote()
        except Exception as exc:  # noqa: BLE001: any failure means not ready
            return error_response(WorkerUnavailable(f"no worker answered: {as_supernet_error(exc).message}"))
        return {"status": "ok"}

    @api.get("/metrics", response_class=PlainTextResponse, responses=responses(None, 503))
    async def metrics_page(self):
        """This node's supernet_* metrics, Prometheus text format (the names the dashboards query)."""
        url = self._metrics_url
        if url is None:
            raise MetricsUnavailable("this Ray node exports no metrics (start Ray with a metrics export port)")
        try:
            text = await application_metrics(url)
        except httpx.HTTPError as exc:
            raise MetricsUnavailable(f"Ray's metrics agent at {url} did not answer: {exc}") from None
        return PlainTextResponse(text, media_type=PROMETHEUS_TEXT)

    @api.get("/v1/models", responses=responses(ModelList, 401))
    async def models(self, request: Request):
        self.gateway.authorize(request.headers.get("authorization"))
        return self.gateway.models()

    @api.post("/v1/completions", **route_docs(CompletionRequest, CompletionResponse, CompletionChunk))
    async def completions(self, request: Request):
        return await self._generate(request, CompletionRequest, chat=False)

    @api.post("/v1/chat/completions", **route_docs(ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk))
    async def chat_completions(self, request: Request):
        return await self._generate(request, ChatCompletionRequest, chat=True)

    async def _generate(self, request: Request, model, chat: bool):
        self._start_replica_metrics()
        prepared = events = None
        try:
            self.gateway.authorize(request.headers.get("authorization"))
            body = parse(model, await read_json(request, self.config.ingress.max_body_bytes))
            prepared = self.gateway.prepare(body, {k.lower(): v for k, v in request.headers.items()})
            self.metrics.in_flight(self.gateway.in_flight)
            self.metrics.routed(prepared, time.monotonic() - prepared.started)
            events = await self.streams.submit(self.gateway.worker_request(prepared))  # admission errors raise
            first, rest = await first_and_rest(events)  # and so do failures before the first token
            first_at = time.monotonic()
        except asyncio.CancelledError:  # the client left before the first token
            if events is not None:
                events.close()  # aborts the request on its worker unless it ended
            if prepared is not None and self._done(prepared):
                self.metrics.finished(prepared, "cancelled", None, 0)
            raise
        except Exception as exc:  # noqa: BLE001: every error maps to a status at this boundary
            if events is not None:
                events.close()
            if prepared is not None:
                self._done(prepared, exc)
            error = as_supernet_error(exc)
            self.metrics.refused(prepared, error.http_status, error.headers.get(SHED_REASON_HEADER))
            return error_response(error)
        prepared.served_by = events.replica_id  # the replica that accepted it
        headers = {**prepared.routing.headers(), "x-supernet-request-id": prepared.request_id,
                   "x-supernet-replica": prepared.served_by or ""}
        if body.stream:
            writer = SseWriter(_id(prepared, chat), prepared.model, chat, len(prepared.prompt_ids),
                               body.stream_options)
            return EndingStreamingResponse(self._sse(prepared, first, rest, writer, first_at),
                                           lambda: self._left_early(prepared, events, first_at),
                                           media_type="text/event-stream", headers=headers)
        try:
            text, tokens, finish = await collect(first, rest)
        except Exception as exc:  # noqa: BLE001
            self._done(prepared, exc)
            self.metrics.finished(prepared, "error", first_at, 0)
            return error_response(exc)
        except asyncio.CancelledError:
            if self._done(prepared):
                self.metrics.finished(prepared, "cancelled", first_at, 0)
            raise
        finally:
            rest.close()  # aborts the request unless it finished (the client left: this task was cancelled)
        self._done(prepared)
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

    async def _sse(self, prepared: Prepared, first, rest, writer: SseWriter, first_at: float):
        tokens, finish, outcome, failure = 0, None, "cancelled", None  # cancelled: the client left mid-stream
        opening = writer.start(prepared.routing.model_dump())
        if opening:
            yield opening
        try:
            batch = first
            while batch is not None:
                tokens += batch["tokens"]
                finish = batch["finish_reason"]
                if batch["text"] or finish:
                    yield writer.tokens(batch["text"], finish, tokens)
                batch = await anext(rest, None)
            outcome = "ok"
        except Exception as exc:  # noqa: BLE001: mid-stream errors end the stream explicitly
            outcome, failure = "error", exc
            yield writer.event(error_body(as_supernet_error(exc)))
        finally:
            rest.close()  # aborts the request unless it finished
            self._done(prepared, failure)
            self.metrics.finished(prepared, outcome, first_at, tokens)
            if outcome == "ok":
                self.gateway.served(prepared, first_at, tokens)
        yield writer.end(tokens)
        self.gateway.log_done(prepared, tokens, finish)

    def _done(self, prepared: Prepared, error: BaseException | None = None) -> bool:
        ended = self.gateway.done(prepared, error)
        self.metrics.in_flight(self.gateway.in_flight)
        return ended

    def _left_early(self, prepared: Prepared, events, first_at: float) -> None:
        """The response ended without its body running to the end (the client left before it started)."""
        if self._done(prepared):
            events.close()  # aborts the request on its worker (its cache is freed at the next step)
            self.metrics.finished(prepared, "cancelled", first_at, 0)

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
            # Ray exports metrics every second at most: recomputing these faster only spends ingress CPU
            # (10 times a second, it was a sixth of the ingress's CPU at 32 streams).
            await asyncio.sleep(max(1.0, self.config.routing.stats_period_s))
