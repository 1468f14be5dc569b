"""Incremental detokenization with stop strings matched on the decoded text, across token boundaries.

Each new token is decoded in a small window of recent tokens (vLLM's prefix /
read offsets), so a token costs O(1) decodes, and text is released only once it
is whole: a window that ends in an incomplete UTF-8 character (U+FFFD) waits for
the next token. With stop strings, the last ``len(longest stop) - 1`` characters
are held back until no stop string can start there; on a match the text is cut
before the stop string (OpenAI: the stop string is not returned). Before
``min_tokens`` tokens no stop string ends the output (vLLM's ``min_tokens``): the
text decoded so far is not searched, though a match may start in its last
characters.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class Detokenizer:
    __slots__ = ("tokenizer", "stop", "holdback", "ids", "prefix_offset", "read_offset", "text", "sent", "searched",
                 "min_tokens")

    def __init__(self, tokenizer: Decoder | None, stop: tuple[str, ...] = (), min_tokens: int = 0):
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0  # first token of the decode window (a character boundary)
        self.read_offset = 0  # tokens whose text is already in ``text``
        self.text = ""  # decoded output text so far (cut at a stop string once one matched)
        self.sent = 0  # characters of ``text`` already released
        self.searched = 0  # characters of ``text`` already searched for stop strings
        self.min_tokens = min_tokens

    def add(self, token: int) -> tuple[str, bool]:
        """Text newly released by ``token``, and whether a stop string ended the output."""
        if self.tokenizer is None:
            return "", False
        self.ids.append(token)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.text += new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> tuple[str, bool]:
        """At the end of the stream: everything not yet released (an incomplete character as U+FFFD)."""
        if self.tokenizer is None:
            return "", False
        if self.read_offset < len(self.ids):
            prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += self.tokenizer.decode(self.ids[self.prefix_offset:])[len(prefix_text):]
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        if self.stop and len(self.ids) < self.min_tokens:
            self.searched = len(self.text)  # too early for a stop string to end the output
        elif self.stop:
            start = max(0, self.searched - self.holdback)  # a match may begin in the held-back tail
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            self.searched = len(self.text)
            if hits:
                cut = min(hits)
                delta, self.text, self.sent = self.text[self.sent:cut], self.text[:cut], cut
                return delta, True
        end = len(self.text) if final else len(self.text) - self.holdback
        if end <= self.sent:
            return "", False
        delta, self.sent = self.text[self.sent:end], end
        return delta, False
