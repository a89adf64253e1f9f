"""Streaming text is exact: characters split across tokens, and stop strings held back."""

from __future__ import annotations

from pendra_inference.detokenize import TextStream


def test_a_character_split_across_pieces_is_sent_whole() -> None:
    stream = TextStream()
    data = "é中🙂".encode()
    sent = [stream.push(data[i : i + 1]) for i in range(len(data))]
    assert "".join(sent) + stream.flush() == "é中🙂"
    assert all(part in ("", "é", "中", "🙂") for part in sent)  # never half a character


def test_an_unfinished_character_at_the_end_becomes_a_replacement() -> None:
    stream = TextStream()
    assert stream.push(b"ok\xe4\xb8") == "ok"
    assert stream.flush() == "\ufffd"


def test_a_stop_string_across_pieces_is_cut_and_never_sent() -> None:
    stream = TextStream(["STOP"])
    out = [stream.push(p) for p in (b"hello S", b"T", b"OP and more")]
    assert "".join(out) == "hello "
    assert stream.stopped
    assert stream.push(b"later") == "" and stream.flush() == ""


def test_held_text_that_turns_out_not_to_stop_is_sent() -> None:
    stream = TextStream(["<end>"])
    assert stream.push(b"a <e") == "a "
    assert stream.push(b"nd? no") == "<end? no"
    assert stream.push(b" <") == " "
    assert stream.flush() == "<"
    assert not stream.stopped


def test_the_earliest_of_several_stop_strings_wins() -> None:
    stream = TextStream(["world", "lo w"])
    assert stream.push(b"hello world") == "hel"
    assert stream.stopped
