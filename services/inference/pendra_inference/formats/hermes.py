"""Hermes-style calls, JSON inside `<tool_call>` tags, and `<think>` reasoning: Qwen2.5, Qwen3
(and QwQ), NousResearch Hermes 2/3, IBM Granite 4.

    <think>...</think>
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

from typing import Any, ClassVar

from pendra_inference.formats.base import Format, Parsed, held, json_call, rstrip_partial
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
        parsed = Parsed(content=text[:first].rstrip(" \t\r\n"))
        at = first
        while at >= 0:
            inner_at = at + len(start)
            close = text.find(end, inner_at)
            inner = text[inner_at:] if close < 0 else text[inner_at:close]
            call = self.block_call(inner, schemas, partial and close < 0)
            if call is None:
                if partial and close < 0:
                    return parsed  # not yet known: held
                raw = text[at:] if close < 0 else text[at : close + len(end)]
                parsed.content += ("\n" if parsed.content else "") + raw  # not a call after all
            else:
                parsed.calls.append(call)
            if close < 0:
                return parsed
            after = close + len(end)
            at = text.find(start, after)
            tail = text[after:] if at < 0 else text[after:at]
            if tail.strip() and at < 0:
                tail = held(tail, start) if partial else tail
                parsed.content += ("\n" if parsed.content else "") + rstrip_partial(tail.strip(), partial)
        return parsed

    def block_call(self, inner: str, schemas: dict[str, dict[str, Any]], partial: bool) -> Any:
        return json_call(inner, schemas, partial)

    def call_rule(self, g: Grammar, name: str, schema: dict[str, Any]) -> str:
        start, end = self.tags
        return f"{g.literal(start + chr(10))} {super().call_rule(g, name, schema)} {g.literal(chr(10) + end)}"


class Hermes(Tagged):
    name = "hermes"
    think = ("<think>", "</think>")
