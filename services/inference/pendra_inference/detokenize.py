"""How bytes become text: incremental detokenization that never splits a character, and stop strings
that are held back until they can no longer match.

A token's piece is bytes, and one UTF-8 character may span several tokens; `TextStream.push` keeps
an unfinished character's bytes until its last byte arrives. Text that could be the start of a stop
string is held back too: it is sent once the next pieces show it is not a stop string, and cut
(with everything after it) when it is.
"""

from __future__ import annotations

import codecs
import ctypes
from typing import Any

import llama_cpp


class TextStream:
    def __init__(self, stops: list[str] | tuple[str, ...] = ()) -> None:
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not sent yet: it may begin a stop string
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Text that is now safe to send. After a stop string matched, `stopped` is True and the
        text before the stop string is the last thing returned."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(piece)
        return self._release(final=False)

    def flush(self) -> str:
        """What is left at the end: held text, and any unfinished character as U+FFFD."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        held = self._held
        if not self.stops:
            self._held = ""
            return held
        cut = min((i for i in (held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return held[:cut]
        keep = 0 if final else self._partial_stop(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


def token_bytes(vocab: Any, token: int, buffer: Any = None, special: bool = True) -> bytes:
    """The bytes of one token's piece (special tokens written out unless `special` is off), however
    long it is: llama.cpp says how long when the buffer is too short (a negative size), and is
    asked again. `buffer`: a `ctypes.create_string_buffer` to reuse (the scheduler's, for every
    sampled token). Every path from token ids to text goes through here or `tokens_bytes`."""
    buffer = buffer if buffer is not None else ctypes.create_string_buffer(64)
    size = int(llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, special))
    if size < 0:
        buffer = ctypes.create_string_buffer(-size)
        size = int(llama_cpp.llama_token_to_piece(vocab, token, buffer, -size, 0, special))
    raw: bytes = buffer.raw
    return raw[: max(0, size)]


def tokens_bytes(vocab: Any, tokens: list[int]) -> bytes:
    """The bytes of a token sequence, as llama.cpp's own `llama_detokenize` writes them (special
    tokens written out, nothing removed): what llama-server's /detokenize gives."""
    if not tokens:
        return b""
    ids = (llama_cpp.llama_token * len(tokens))(*tokens)
    buffer = ctypes.create_string_buffer(max(64, 8 * len(tokens)))
    size = int(llama_cpp.llama_detokenize(vocab, ids, len(tokens), buffer, len(buffer), False, True))
    if size < 0:
        buffer = ctypes.create_string_buffer(-size)
        size = int(llama_cpp.llama_detokenize(vocab, ids, len(tokens), buffer, -size, False, True))
    raw: bytes = buffer.raw
    return raw[: max(0, size)]
