"""Incremental text and stop strings matched on decoded text across token boundaries."""

import random

import pytest

from workers.engine.detokenizer import Detokenizer


class BytesTokenizer:
    """Each id is a byte string; decoding joins them and replaces incomplete UTF-8, like byte-level BPE."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def stream(pieces: list[bytes], stop=()):
    detokenizer = Detokenizer(BytesTokenizer(pieces), tuple(stop))
    deltas, stopped_at = [], None
    for i in range(len(pieces)):
        delta, stopped = detokenizer.add(i)
        deltas.append(delta)
        if stopped:
            stopped_at = i
            break
    else:
        delta, stopped = detokenizer.flush()
        deltas[-1] += delta
        stopped_at = len(pieces) - 1 if stopped else None
    return deltas, stopped_at


def test_text_is_the_decoded_output_without_stops():
    pieces = [b"def", b" f", b"(x", b"):", b"\n  ", b"return"]
    deltas, stopped_at = stream(pieces)
    assert "".join(deltas) == "def f(x):\n  return" and deltas == [p.decode() for p in pieces]
    assert stopped_at is None


def test_stop_string_across_token_boundaries_is_cut_from_the_text():
    deltas, stopped_at = stream([b"ab", b"c<", b"/s", b">d", b"ef"], stop=["</s>"])
    assert stopped_at == 3 and "".join(deltas) == "abc"
    assert deltas == ["", "a", "bc", ""]  # the last three characters wait while "</s>" could start there


def test_held_back_text_is_released_when_no_stop_string_can_start_there():
    deltas, stopped_at = stream([b"x<", b"/t", b"y", b"zz"], stop=["</s>"])
    assert stopped_at is None and "".join(deltas) == "x</tyzz"


def test_earliest_stop_string_wins():
    deltas, stopped_at = stream([b"one two ", b"three"], stop=["three", "two"])
    assert "".join(deltas) == "one " and stopped_at == 0


def test_stop_string_inside_one_token_and_at_the_start():
    assert stream([b"STOP", b"more"], stop=["STOP"]) == ([""], 0)
    deltas, stopped_at = stream([b"abSTOPcd"], stop=["STOP"])
    assert deltas == ["ab"] and stopped_at == 0


def test_stop_string_completed_by_the_last_token_before_flush():
    deltas, stopped_at = stream([b"ab", b"c"], stop=["bc"])
    assert "".join(deltas) == "a" and stopped_at == 1


def test_incomplete_utf8_characters_wait_for_their_last_byte():
    e_acute = "é".encode()
    deltas, _ = stream([b"caf", e_acute[:1], e_acute[1:], b"!"])
    assert deltas == ["caf", "", "é", "!"]


def test_flush_releases_an_unfinished_character_as_replacement():
    deltas, _ = stream([b"ok", "é".encode()[:1]])
    assert "".join(deltas) == "ok\ufffd"


def test_without_a_tokenizer_there_is_no_text():
    detokenizer = Detokenizer(None)
    assert detokenizer.add(5) == ("", False) and detokenizer.flush() == ("", False)
    with pytest.raises(ValueError):
        Detokenizer(None, ("x",))


def test_deltas_join_to_the_full_decode_with_the_real_tokenizer(tiny_tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(4, tiny_tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        detokenizer = Detokenizer(tiny_tokenizer)
        text = "".join(detokenizer.add(t)[0] for t in ids) + detokenizer.flush()[0]
        assert text == tiny_tokenizer.decode(ids)
