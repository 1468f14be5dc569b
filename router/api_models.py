"""HTTP request and response bodies: the OpenAI completions and chat shapes plus latency budgets.

Unknown fields are refused (a misspelt ``max_token`` must not be silently
ignored); the OpenAI fields this server cannot honour are accepted only at
their neutral values, with a message saying so.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from policies.speculation import MAX_DRAFT_TOKENS


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    include_usage: bool = False


class _Generation(_Body):
    model: str = Field(..., min_length=1, description="The base model id or a preset name (see /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no limit (an extension).")
    seed: int | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only 1 completion per request.")
    presence_penalty: float = Field(0.0, ge=0, le=0, description="Not supported: must be 0.")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="Not supported: must be 0.")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Not supported: must be empty.")
    user: str | None = None
    # Latency budget and routing (extensions).
    sla: Sla | None = None
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
    def _one_forced_choice(self):
        if self.preset is not None and self.placement is not None:
            raise ValueError("give either preset or placement, not both")
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


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: bool = Field(False, description="Not supported: must be false.")

    @field_validator("logprobs")
    @classmethod
    def _unsupported(cls, value):
        if value:
            raise ValueError("not supported by this server")
        return value

    @model_validator(mode="after")
    def _alias(self):
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


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
