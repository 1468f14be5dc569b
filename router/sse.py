"""The server-sent events of one streamed completion, from templates encoded once per request.

Per token batch only its text (and, with ``continuous_usage_stats``, the counts) is encoded; the rest
of the chunk (id, object, created, model, the choice's frame) is the same bytes every time. The shapes
are OpenAI's: ``chat.completion.chunk`` with a ``delta``, or ``text_completion`` with ``text``; the first
event carries the ``routing`` object; ``include_usage`` adds a last chunk with the usage and no choices.
"""

from __future__ import annotations

import json
import time


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"))


class SseWriter:
    def __init__(self, completion_id: str, model: str, chat: bool, prompt_tokens: int, stream_options=None):
        self.chat, self.prompt_tokens = chat, prompt_tokens
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self.continuous_usage = bool(stream_options and stream_options.continuous_usage_stats)
        self._head = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": int(time.time()), "model": model}
        head = _dumps(self._head)[:-1]  # without its closing brace: the choices follow
        if chat:
            self._open, self._close = head + ',"choices":[{"index":0,"delta":{"content":', '},"finish_reason":null}]'
        else:
            self._open, self._close = head + ',"choices":[{"index":0,"text":', ',"logprobs":null,"finish_reason":null}]'
        self._routing: dict | None = None

    def start(self, routing: dict) -> str:
        """Chat: the assistant's role and the routing. Completions: nothing yet (routing rides on the first text)."""
        if not self.chat:
            self._routing = routing
            return ""
        return self.event({**self._head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                      "finish_reason": None}], "routing": routing})

    def tokens(self, text: str, finish_reason: str | None, tokens_so_far: int) -> str:
        """One event for a batch of tokens (``tokens_so_far``: the completion tokens including this batch)."""
        if finish_reason is not None or self._routing is not None:
            return self._full(text, finish_reason, tokens_so_far)
        usage = ',"usage":' + _dumps(self._usage(tokens_so_far)) if self.continuous_usage else ""
        return f"data: {self._open}{json.dumps(text)}{self._close}{usage}}}\n\n"

    def end(self, completion_tokens: int) -> str:
        usage = self.event({**self._head, "choices": [], "usage": self._usage(completion_tokens)})
        return (usage if self.include_usage else "") + "data: [DONE]\n\n"

    @staticmethod
    def event(payload: dict) -> str:
        return f"data: {_dumps(payload)}\n\n"

    def _full(self, text: str, finish_reason: str | None, tokens_so_far: int) -> str:
        """An event built whole: the last one (its finish reason) and a completion's first (the routing)."""
        if self.chat:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._head, "choices": [choice]}
        if self._routing is not None:
            chunk["routing"], self._routing = self._routing, None
        if self.continuous_usage:
            chunk["usage"] = self._usage(tokens_so_far)
        return self.event(chunk)

    def _usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}
