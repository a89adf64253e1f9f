"""Llama 3.1, 3.2, 3.3: a call is the whole answer, one JSON object (or several joined by `;`),
maybe after `<|python_tag|>`:

    {"name": "get_weather", "parameters": {"city": "Paris"}}

An answer that starts like JSON is held until it ends, since only then is it known to be a call;
one that max_tokens cut inside its last call keeps that call with the arguments it got.
"""

from __future__ import annotations

from typing import Any

from pendra_inference.formats.base import (
    Format,
    Parsed,
    call_from_object,
    cut_call,
    json_end,
    loads,
    rstrip_partial,
)
from pendra_inference.formats.grammar import Grammar

PYTHON_TAG = "<|python_tag|>"


class Llama3(Format):
    name = "llama3"
    preserved = (PYTHON_TAG,)

    def parse_calls(self, text: str, schemas: dict[str, dict[str, Any]], partial: bool) -> Parsed:
        body = text.strip()
        looks = body.startswith(("{", PYTHON_TAG)) or (partial and PYTHON_TAG.startswith(body))
        if not looks:
            return Parsed(content=rstrip_partial(text, partial))
        if partial:
            return Parsed()
        calls = []
        rest = body.removeprefix(PYTHON_TAG).strip()
        while rest:  # objects one after another, `;` between them (not a split: strings hold `;` too)
            end = json_end(rest) if rest.startswith("{") else -1
            try:
                call = call_from_object(loads(rest[:end]), schemas) if end > 0 else cut_call(rest, schemas)
            except ValueError:
                call = None
            if call is None:
                return Parsed(content=text)
            calls.append(call)
            if end < 0:  # the cut call, the last
                break
            rest = rest[end:].strip()
            rest = rest.removeprefix(";").strip()
        return Parsed(calls=calls)

    def call_rule(self, g: Grammar, name: str, schema: dict[str, Any]) -> str:
        args = g.json(schema, f"args-{name}")
        return f'"{{\\"name\\": \\"{g.escape(name)}\\", \\"parameters\\": " {args} "}}"'

    def call_separator(self) -> str:
        return '"; "'
