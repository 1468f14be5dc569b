"""The training text: documents split into train and held-out parts by file, tokenized once.

``stdlib`` is the Python standard library's own sources (every machine with
Python has them, offline); any other value is a folder of text files (``.py``,
``.txt``, ``.md``, ``.rst``) or one ``.jsonl`` file with a "text" per line.
The split is by document and depends only on its name (a hash), so it is the
same on every machine and does not shift when files are added.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policies.errors import ConfigError
from policies.jsonl import jsonl_objects

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
SKIPPED_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}  # stdlib test suites: repetitive fixtures
HELD_OUT_PER_MILLE = 50  # 5% of documents


@dataclass(frozen=True, slots=True)
class Document:
    name: str  # path relative to the corpus root (or "FILE.jsonl:LINE")
    text: str

    @property
    def held_out(self) -> bool:
        digest = hashlib.sha256(self.name.encode()).digest()
        return int.from_bytes(digest[:4], "big") % 1000 < HELD_OUT_PER_MILLE


def read_documents(spec: str) -> list[Document]:
    """The documents of a corpus, in a fixed order (sorted by name)."""
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in root.rglob("*.py") if not SKIPPED_PARTS.intersection(p.relative_to(root).parts)]
        return _read_files(root, files)
    path = Path(spec)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()]
        documents = _read_files(path, files)
    elif path.suffix == ".jsonl" and path.is_file():
        lines = jsonl_objects(path, path.read_text(encoding="utf-8"), "text")
        documents = [Document(f"{path.name}:{number}", entry["text"]) for number, entry in lines]
    else:
        raise ConfigError(f"--corpus {spec}: expected 'stdlib', a folder of text files or a .jsonl file")
    if not documents:
        raise ConfigError(f"--corpus {spec}: no documents in it")
    return documents


def _read_files(root: Path, files: list[Path]) -> list[Document]:
    documents = []
    for file in sorted(files):
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are Latin-1 test data; the corpus is text
        if text.strip():
            documents.append(Document(file.relative_to(root).as_posix(), text))
    return documents


def split(documents: list[Document]) -> tuple[list[Document], list[Document]]:
    train = [d for d in documents if not d.held_out]
    held_out = [d for d in documents if d.held_out]
    if not train or not held_out:
        raise ConfigError(f"the corpus has {len(documents)} document(s): too few to hold some out (need ~20+)")
    return train, held_out


@dataclass(frozen=True, slots=True)
class TokenStream:
    """Documents' tokens end to end (each starts with the tokenizer's BOS), as one uint16 array."""

    tokens: np.ndarray
    documents: int
    characters: int

    @classmethod
    def encode(cls, documents: list[Document], tokenizer) -> "TokenStream":
        if tokenizer.vocab_size > 2**16:
            raise ConfigError(f"vocabulary of {tokenizer.vocab_size} does not fit the uint16 token stream")
        encoded = tokenizer.encode_batch([d.text for d in documents])
        tokens = np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in encoded])
        return cls(tokens, len(documents), sum(len(d.text) for d in documents))

    def windows(self, length: int, max_tokens: int | None = None) -> np.ndarray:
        """Consecutive non-overlapping windows of ``length`` tokens, [count, length] (the tail is dropped)."""
        usable = len(self.tokens) if max_tokens is None else min(len(self.tokens), max_tokens)
        count = usable // length
        if count == 0:
            raise ConfigError(f"{usable} tokens are fewer than one window of {length}")
        return self.tokens[:count * length].reshape(count, length)

    def summary(self) -> dict:
        return {"documents": self.documents, "characters": self.characters, "tokens": int(len(self.tokens))}
