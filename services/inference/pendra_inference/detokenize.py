"""How bytes become text: incremental detokenization that never splits a character, and stop strings
that are held back until they can no longer match.

A token's piece is bytes, and one UTF-8 character may span several tokens; `TextStream.push` keeps
an unfinished character's bytes until its last byte arrives. Text that could be the start of a stop
string is held back too: it is sent once the next pieces show it is not a stop string, and cut
(with everything after it) when it is.
"""

from __future__ import annotations

import codecs


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
