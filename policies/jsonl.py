"""JSON Lines input files (requests, texts): one object per line, errors name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from policies.errors import InvalidRequest


def jsonl_objects(path: Path, text: str, required: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of ``text``, each an object with a string ``required``."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get(required), str):
            raise InvalidRequest(f'{path}:{number}: each line must be an object with a "{required}" string')
        yield number, entry
