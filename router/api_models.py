"""HTTP request and response bodies: the OpenAI completions and chat shapes plus latency budgets.

Unknown fields are refused (a misspelt ``max_token`` must not be silently
ignored); the OpenAI fields this server cannot honour are accepted only at
their neutral values, with a message saying so. vLLM's extensions that load
tools send (``ignore_eos``, ``min_tokens``, ``stream_options.continuous_usage_stats``)
are accepted; numbers must be finite (``1e999`` is refused, not read as infinity).
The response models describe the bodies in ``/openapi.json``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from policies.speculation import MAX_DRAFT_TOKENS


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Sla(_Body):
    """A latency budget: any subset of the three."""

    ttft_ms: float | None = Field(None, gt=0, description="Time to first token, milliseconds.")
    tpot_ms: float | None = Field(None, gt=0, description="Time per output token after the first, milliseconds.")
    deadline_ms: float | None = Field(None, gt=0, description="End-to-end deadline, milliseconds.")


class Speculation(_Body):
    """Speculate with this draft: a preset name or a placement code, proposing ``tokens`` per verify step."""

    draft: str = Field(..., min_length=1, description="Draft preset name or placement code.")
    tokens: int = Field(4, ge=1, le=MAX_DRAFT_TOKENS, description="Tokens drafted per verify step.")


class StreamOptions(_Body):
    include_usage: bool = Field(False, description="A last chunk with the usage (and no choices).")
    continuous_usage_stats: bool = Field(False, description="Usage in every chunk (a vLLM extension).")


class _Generation(_Body):
    model: str = Field(..., min_length=1, description="The base model id or a preset name (see /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this mass.")
    top_k: int = Field(0, ge=0, description="0: no limit (an extension).")
    seed: int | None = Field(None, description="Sampling seed: the same seed, the same tokens.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings (not part of the output).")
    ignore_eos: bool = Field(False, description="Generate past the end-of-sequence token (a vLLM extension).")
    min_tokens: int = Field(0, ge=0, description="Tokens generated before end-of-sequence or a stop string may "
                                                 "end the output (a vLLM extension).")
    stream: bool = Field(False, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true.")
    n: int = Field(1, ge=1, le=1, description="Only 1 completion per request.")
    presence_penalty: float = Field(0.0, ge=0, le=0, description="Not supported: must be 0.")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="Not supported: must be 0.")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Not supported: must be empty.")
    user: str | None = Field(None, description="The end user (accepted, not used).")
    # Latency budget and routing (extensions).
    sla: Sla | None = Field(None, description="The latency budget (headers x-slo-ttft-ms, x-slo-tpot-ms, "
                                              "x-deadline-ms give the same; the body wins).")
    min_quality: float | None = Field(None, ge=0, le=1, description="Least predicted quality retention.")
    priority: int = Field(0, description="Negative: the request may be shed when no preset meets its budget.")
    preset: str | None = Field(None, description="Force this preset.")
    placement: str | None = Field(None, description="Force this placement code (one letter per layer).")
    speculation: Literal["auto", "off"] | Speculation = Field(
        "auto", description='Speculative decoding: "auto" (the router speculates where its speed model predicts '
                            'a lower TPOT), "off", or {"draft": preset or placement, "tokens": k}. The output is '
                            "the chosen preset's either way.")

    @field_validator("speculation", mode="before")
    @classmethod
    def _speculation(cls, value):
        """One clear message for either form (a plain union would report the first branch's error)."""
        if isinstance(value, str):
            if value not in ("auto", "off"):
                raise ValueError(f'must be "auto", "off" or {{"draft": ..., "tokens": k}}, got {value!r}')
            return value
        if isinstance(value, dict):
            try:
                return Speculation.model_validate(value)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"{where}: {first['msg']}") from None
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _consistent(self):
        if self.preset is not None and self.placement is not None:
            raise ValueError("give either preset or placement, not both")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] = Field(..., description="Text, or token ids.")
    echo: bool = Field(False, description="Not supported: must be false.")
    logprobs: int | None = Field(None, description="Not supported: must be null.")

    @field_validator("echo", "logprobs")
    @classmethod
    def _unsupported(cls, value):
        if value:
            raise ValueError("not supported by this server")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request (n prompts: n requests)")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value


class TextPart(_Body):
    """One part of a message's content; only text parts (what the openai package and LangChain send)."""

    type: Literal["text"] = Field(..., description="Only text parts.")
    text: str = Field(..., description="The part's text.")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"] = Field(..., description="Who wrote it.")
    content: str | list[TextPart] = Field(..., description="Text, or a list of text parts (joined by newlines).")
    name: str | None = Field(None, description="The author's name (passed to the chat template).")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value):
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"part {i} has type {kind!r}: only text parts are supported")
        return value

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation, oldest first.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (OpenAI's newer name).")
    logprobs: bool = Field(False, description="Not supported: must be false.")

    @field_validator("logprobs")
    @classmethod
    def _unsupported(cls, value):
        if value:
            raise ValueError("not supported by this server")
        return value

    @model_validator(mode="before")
    @classmethod
    def _alias(cls, data):
        if not isinstance(data, dict):
            return data
        alias = data.get("max_completion_tokens")
        if data.get("max_tokens") is None and isinstance(alias, int) and alias >= 1:  # else its own field says why
            data = {**data, "max_tokens": alias}  # before the checks that read max_tokens
        return data


class Routing(BaseModel):
    """What was chosen for a request, and why."""

    preset: str | None
    placement: str
    predicted_ttft_ms: float | None = None
    predicted_tpot_ms: float | None = None
    predicted_quality: float | None = None
    reason: str
    sla_at_risk: bool = False
    draft_placement: str | None = None  # speculating: the draft's placement code
    draft_preset: str | None = None  # ... and its preset name, when it is one
    draft_tokens: int | None = None
    predicted_plain_tpot_ms: float | None = None  # the predicted TPOT without speculation (when chosen by it)
    predicted_speculation_gain: float | None = None  # predicted_plain_tpot_ms / predicted_tpot_ms

    def headers(self) -> dict[str, str]:
        def number(value):
            return "" if value is None else f"{value:.3f}"

        headers = {
            "x-preset": self.preset or "",
            "x-placement": self.placement,
            "x-predicted-ttft-ms": number(self.predicted_ttft_ms),
            "x-predicted-tpot-ms": number(self.predicted_tpot_ms),
            "x-predicted-quality": number(self.predicted_quality),
        }
        if self.draft_placement is not None:
            headers["x-draft-placement"] = self.draft_placement
            headers["x-draft-tokens"] = str(self.draft_tokens)
        return headers


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
