"""The corpus: a deterministic split by document name, tokenized to one stream."""

from __future__ import annotations

import numpy as np
import pytest

from policies.errors import ConfigError
from workers.model.tokenizer import train_bpe
from workers.training.corpus import Document, TokenStream, read_documents, split


def test_split_is_by_name_disjoint_and_stable(corpus):
    documents = read_documents(str(corpus))
    train, held_out = split(documents)
    assert len(train) + len(held_out) == len(documents) and held_out and train
    assert not {d.name for d in train} & {d.name for d in held_out}
    # the same name is held out whatever its text or neighbours
    again = split([Document(d.name, "other text") for d in reversed(documents)])[1]
    assert {d.name for d in again} == {d.name for d in held_out}


def test_stdlib_corpus_holds_out_about_five_percent():
    documents = read_documents("stdlib")
    _, held_out = split(documents)
    assert len(documents) > 300
    assert 0.02 < len(held_out) / len(documents) < 0.09


def test_token_stream_concatenates_documents_each_from_bos(corpus):
    documents = read_documents(str(corpus))[:5]
    tokenizer = train_bpe((d.text for d in documents), 300)
    stream = TokenStream.encode(documents, tokenizer)
    assert stream.tokens.dtype == np.uint16
    assert int((stream.tokens == tokenizer.bos_token_id).sum()) == 5
    assert stream.summary()["documents"] == 5
    windows = stream.windows(16, max_tokens=100)
    assert windows.shape == (6, 16) and (windows.reshape(-1) == stream.tokens[:96]).all()


@pytest.mark.parametrize("spec", ["/no/such/folder", "notes.txt"])
def test_bad_corpus_is_a_clear_error(spec):
    with pytest.raises(ConfigError, match="expected 'stdlib', a folder of text files or a .jsonl file"):
        read_documents(spec)


def test_too_small_corpus_cannot_hold_out(tmp_path):
    (tmp_path / "one.py").write_text("print(1)\n")
    with pytest.raises(ConfigError, match="too few to hold some out"):
        split(read_documents(str(tmp_path)))
