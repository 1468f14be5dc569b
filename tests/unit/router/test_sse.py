"""The stream's events, built from templates: each is one JSON object in OpenAI's chunk shape."""

import json

import pytest

from router.api_models import StreamOptions
from router.sse import SseWriter


def events(text: str) -> list:
    assert text.endswith("\n\n")
    return [None if e == "data: [DONE]" else json.loads(e.removeprefix("data: ")) for e in text[:-2].split("\n\n")]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_a_stream_of_batches_is_valid_chunks_with_routing_first_and_usage_last(chat):
    options = StreamOptions(include_usage=True, continuous_usage_stats=True)
    writer = SseWriter("id-1", "quality", chat, prompt_tokens=5, stream_options=options)
    routing = {"preset": "quality", "placement": "AAAAAA", "reason": "r"}
    stream = writer.start(routing) + writer.tokens('a "quoted"\n\u00e9', None, 2) + writer.tokens("b", None, 3) \
        + writer.tokens("", "length", 3) + writer.end(3)
    chunks = events(stream)
    assert chunks[-1] is None and chunks[-2]["choices"] == [] and chunks[-2]["usage"]["total_tokens"] == 8
    texts = [c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"]
             for c in chunks[:-2] if c["choices"]]
    assert "".join(texts) == 'a "quoted"\n\u00e9b'
    assert chunks[0]["routing"] == routing and all("routing" not in c for c in chunks[1:-1])
    assert [c["usage"]["completion_tokens"] for c in chunks[:-2] if "usage" in c][-3:] == [2, 3, 3]
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"
    assert {c["object"] for c in chunks[:-1]} == {"chat.completion.chunk" if chat else "text_completion"}
    assert {c["id"] for c in chunks[:-1]} == {"id-1"}


def test_without_stream_options_no_usage_is_sent():
    writer = SseWriter("id-2", "m", chat=False, prompt_tokens=1)
    chunks = events(writer.tokens("x", None, 1) + writer.tokens("y", "stop", 2) + writer.end(2))
    assert all("usage" not in c for c in chunks if c) and chunks[-1] is None
