"""DeepSeek-R1 (and its Qwen and Llama distills): reasoning the template opens with `<think>`,
calls in DeepSeek's own tokens with the arguments in a JSON code block.

    ...</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": 1}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>
"""

from __future__ import annotations

import re
from typing import Any

from pendra_inference.formats.base import Call, held, json_end
from pendra_inference.formats.grammar import Grammar
from pendra_inference.formats.hermes import Tagged

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_HEAD = re.compile(r"\s*(?:function)?" + re.escape(SEP) + r"([^\n]{1,64})\n```(?:json)?\n")


class DeepSeekR1(Tagged):
    name = "deepseek-r1"
    think = ("<think>", "</think>")
    tags = (CALL_BEGIN, CALL_END)
    preserved = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
    call_starts = (CALLS_BEGIN, CALL_BEGIN)

    def parse_calls(self, text: str, schemas: dict[str, dict[str, Any]], partial: bool) -> Any:
        if partial:
            text = held(text, CALLS_BEGIN, CALLS_END)
        return super().parse_calls(text.replace(CALLS_BEGIN, "").replace(CALLS_END, ""), schemas, partial)

    def block_call(self, inner: str, schemas: dict[str, dict[str, Any]], partial: bool) -> Call | None:
        head = _HEAD.match(inner)
        if head is None or head.group(1).strip() not in schemas:
            return None
        name, at = head.group(1).strip(), head.end()
        end = json_end(inner, at)
        if end > 0:
            return Call(name, inner[at:end], None, True)
        return Call(name, inner[at:].rstrip(), None, False) if partial and end == -1 else None

    def call_rule(self, g: Grammar, name: str, schema: dict[str, Any]) -> str:
        args = g.json(schema, f"args-{name}")
        return (
            f"{g.literal(f'{CALL_BEGIN}function{SEP}{name}' + chr(10) + '```json' + chr(10))} {args} "
            + g.literal("\n```" + CALL_END)
        )

    def calls_rule(self, g: Grammar, one: str, parallel: bool) -> str:
        calls = f"{one} {one}*" if parallel else one
        return f"{g.literal(CALLS_BEGIN)} {calls} {g.literal(CALLS_END)}"
