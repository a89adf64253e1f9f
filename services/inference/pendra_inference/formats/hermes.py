"""Hermes-style calls, JSON inside `<tool_call>` tags, and `<think>` reasoning: Qwen2.5, Qwen3
(and QwQ), NousResearch Hermes 2/3, IBM Granite 4.

    <think>...</think>
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

from typing import Any, ClassVar

from pendra_inference.formats.base import WS, Format, Parsed, held, json_call, json_end, rstrip_partial
from pendra_inference.formats.grammar import Grammar


class Tagged(Format):
    """Calls in `open ... close` blocks after any content; each block's inner text is one call."""

    tags: ClassVar[tuple[str, str]] = ("<tool_call>", "</tool_call>")
    call_starts: ClassVar[tuple[str, ...]] = ("<tool_call>",)

    def parse_calls(self, text: str, schemas: dict[str, dict[str, Any]], partial: bool) -> Parsed:
        start, end = self.tags
        first = text.find(start)
        if first < 0:
            content = held(text, start) if partial else text
            return Parsed(content=rstrip_partial(content, partial))
        parts = [text[:first].rstrip(WS)]  # the content's pieces, joined by newlines
        calls = []
        at = first
        while at >= 0:
            inner_at = at + len(start)
            close = self.block_end(text, inner_at)
            inner = text[inner_at:] if close < 0 else text[inner_at:close]
            # An unclosed block is still arriving, or was cut by max_tokens: a call whose name has
            # come stays a call (its arguments so far), as it was streamed.
            call = self.block_call(inner, schemas, close < 0)
            if call is not None:
                calls.append(call)
            elif close >= 0:
                parts.append(text[at : close + len(end)])  # not a call of ours: it stays text
            elif not partial:
                parts.append(text[at:])
            if close < 0:
                break
            after = close + len(end)
            at = text.find(start, after)
            tail = text[after:at] if at >= 0 else held(text[after:], start) if partial else text[after:]
            parts.append(tail.strip(WS))
        return Parsed(content="\n".join(p for p in parts if p), calls=calls)

    def block_end(self, text: str, inner_at: int) -> int:
        """Where the block that starts at `inner_at` closes (-1: not yet). A JSON body is read
        first, so a string holding the closing tag does not close it."""
        body = len(text) - len(text[inner_at:].lstrip(WS))
        if text[body : body + 1] == "{":
            json_at = json_end(text, body)
            if json_at == -1:
                return -1
            if json_at > 0:
                return text.find(self.tags[1], json_at)
        return text.find(self.tags[1], inner_at)

    def block_call(self, inner: str, schemas: dict[str, dict[str, Any]], partial: bool) -> Any:
        return json_call(inner, schemas, partial)

    def call_rule(self, g: Grammar, name: str, schema: dict[str, Any]) -> str:
        start, end = self.tags
        return f"{g.literal(start + chr(10))} {super().call_rule(g, name, schema)} {g.literal(chr(10) + end)}"


class Hermes(Tagged):
    name = "hermes"
    think = ("<think>", "</think>")
