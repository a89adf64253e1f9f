"""A completion's text as OpenAI's deltas: reasoning, content, and tool calls whose arguments
stream in pieces, the way OpenAI streams them (the first piece of a call carries its id, type and
name with empty arguments; later pieces carry more of the arguments).

The whole text so far is parsed again at each piece (parsing is linear and the formats hold back
what a longer text could change), and only what grew since the last piece is sent; the final
parse may add what was held. A streamed answer and the same answer unstreamed are built by the
same `Splitter`, so they always agree.
"""

from __future__ import annotations

import logging
from typing import Any

from pendra_inference.formats.base import Call, Format, Parsed, Turn

logger = logging.getLogger(__name__)
# With tools, the text is parsed again once what came since is this fraction of it (1/N).
PARSE_EVERY = 64


class Splitter:
    def __init__(self, fmt: Format, turn: Turn, prompt: str, split: bool = True) -> None:
        self.schemas = turn.schemas() if turn.tools else None
        self.opened = fmt.opened(prompt)
        # Nothing to split: the text goes out as it comes (as before formats, and as llama-server's
        # `--reasoning-format none` leaves reasoning inline when no tools are given).
        self.passthrough = self.schemas is None and (not split or not fmt.thinks)
        self.prefix = ""
        if not split and self.opened and fmt.think is not None:
            self.prefix = prompt[prompt.rfind(fmt.think[0]) :].lstrip()  # the tag the prompt opened
        self.fmt = fmt if split else fmt.inline()
        self.text = ""
        self.unparsed = 0  # characters fed since the last parse
        self.sent = Parsed()
        self.ids: list[str] = []

    def feed(self, piece: str) -> list[dict[str, Any]]:
        if self.passthrough:
            out = [{"content": self.prefix + piece}] if piece or self.prefix else []
            self.sent.content += self.prefix + piece
            self.prefix = ""
            return out
        self.text += self.prefix + piece
        self.prefix = ""
        # With tools a parse reads the calls' arguments again, so it waits until the new text is a
        # 64th of the whole: the total stays linear in the answer's length (a 100 kB call would
        # otherwise cost minutes of the event loop). Without tools, every piece is parsed.
        self.unparsed += len(piece)
        if self.schemas is not None and self.unparsed * PARSE_EVERY < len(self.text):
            return []
        self.unparsed = 0
        return self._diff(self.fmt.parse(self.text, self.schemas, self.opened, partial=True))

    def finish(self) -> list[dict[str, Any]]:
        if self.passthrough:
            return self.feed("")
        self.text += self.prefix
        self.prefix = ""
        return self._diff(self.fmt.parse(self.text, self.schemas, self.opened, partial=False))

    @property
    def calls(self) -> list[dict[str, Any]]:
        """The calls sent so far, in OpenAI's message form."""
        return [
            {"id": self.ids[i], "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(self.sent.calls)
        ]

    def _diff(self, now: Parsed) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for key in ("reasoning", "content"):
            was, new = getattr(self.sent, key), getattr(now, key)
            if new == was:
                continue
            if not new.startswith(was):
                # A format must never do this; should one, the stream goes on rather than stalls.
                logger.warning("%s: a later parse changed the %s already sent", self.fmt.name, key)
                if len(new) <= len(was):
                    continue
            out.append({"reasoning_content" if key == "reasoning" else "content": new[len(was) :]})
            setattr(self.sent, key, new)
        for i, call in enumerate(now.calls):
            if i == len(self.sent.calls):
                # The model's own id (Mistral writes one), unless it wrote that one already.
                self.ids.append(call.id if call.id and call.id not in self.ids else self.fmt.new_id())
                self.sent.calls.append(Call(call.name, "", call.id))
                out.append(
                    {
                        "tool_calls": [
                            {
                                "index": i,
                                "id": self.ids[i],
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
            sent = self.sent.calls[i]
            if call.arguments != sent.arguments and call.arguments.startswith(sent.arguments):
                out.append(
                    {
                        "tool_calls": [
                            {"index": i, "function": {"arguments": call.arguments[len(sent.arguments) :]}}
                        ]
                    }
                )
                sent.arguments = call.arguments
            elif call.arguments != sent.arguments:
                logger.debug("%s: a later parse changed call %d's arguments; keeping them", self.fmt.name, i)
        return out
