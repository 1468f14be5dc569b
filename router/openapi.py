"""The published API schema: response bodies as models, and the request bodies the ingress parses itself.

The ingress reads and validates bodies itself (its size limit, its JSON rules, one error shape), so
FastAPI does not see the request models; ``route_docs`` names them in each route's OpenAPI entry and
``install`` adds them (and the streamed chunk shapes) to ``/openapi.json``'s components.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from router.api_models import ChatCompletionRequest, CompletionRequest, Routing, Usage


class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong and how to fix it.")
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = Field(description="The request field (or header) it concerns.")
    code: str = Field(description="Machine-readable: invalid_request, context_too_long, shed, overloaded, ...")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length", "abort"] | None


class _Completion(BaseModel):
    id: str
    created: int = Field(description="Unix seconds.")
    model: str = Field(description="The model or preset name the request gave.")


class CompletionResponse(_Completion):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage
    routing: Routing = Field(description="The preset and placement chosen, the predictions, and why.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletionResponse(_Completion):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage
    routing: Routing


class CompletionChunk(_Completion):
    """One server-sent event (``data: {...}``); the stream ends with ``data: [DONE]``."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice] = Field(description="Empty in the usage chunk (stream_options.include_usage).")
    usage: Usage | None = Field(None, description="With include_usage (last chunk) or continuous_usage_stats.")
    routing: Routing | None = Field(None, description="On the first chunk.")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletionChunk(_Completion):
    """One server-sent event (``data: {...}``); the stream ends with ``data: [DONE]``."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice] = Field(description="Empty in the usage chunk (stream_options.include_usage).")
    usage: Usage | None = None
    routing: Routing | None = Field(None, description="On the first chunk (the assistant's role).")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(None, description="Presets: the base model they run.")
    placement: str | None = Field(None, description="Presets: the placement code, one letter per layer.")
    quality: float | None = Field(None, description="Presets: predicted quality retention against all-attention.")
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


REQUESTS = (CompletionRequest, ChatCompletionRequest)
CHUNKS = (CompletionChunk, ChatCompletionChunk)
ERRORS = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or preset",
          413: "body or context too long", 415: "the body is not JSON", 429: "shed or overloaded (Retry-After)",
          500: "internal error", 503: "no worker available"}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def responses(ok: type[BaseModel] | None, *errors: int) -> dict:
    """A route's documented bodies: ``ok`` for 200 (None: the route's own), the error body for the given
    statuses (all when none)."""
    documented = {200: {"model": ok}} if ok is not None else {}
    return documented | {status: {"model": ErrorResponse, "description": what}
                         for status, what in ERRORS.items() if not errors or status in errors}


def route_docs(request: type[BaseModel], response: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """The OpenAPI keywords of a completion route: its request body, its plain and streamed bodies, its errors."""
    documented = responses(response)
    documented[200] |= {"description": "The completion; with stream: true, server-sent events",
                        "content": {"text/event-stream": {"schema": _ref(chunk)}}}
    return {"openapi_extra": {"requestBody": {"required": True,
                                              "content": {"application/json": {"schema": _ref(request)}}}},
            "responses": documented}


def install(api) -> None:
    """Wrap ``api.openapi`` so the schema also holds the request and chunk models."""
    generate = api.openapi

    def openapi() -> dict:
        if api.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (*REQUESTS, *CHUNKS):
                definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definition.pop("$defs", {}))
                components[model.__name__] = definition
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi


if __name__ == "__main__":  # docs/openapi.json: .venv/bin/python -m router.openapi > docs/openapi.json
    import json

    from router.ingress import api

    print(json.dumps(api.openapi(), indent=1, sort_keys=True))
