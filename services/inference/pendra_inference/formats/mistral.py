"""Mistral Small 3.x, Devstral, Ministral, Magistral: calls after `[TOOL_CALLS]`, reasoning in
`[THINK]...[/THINK]` where the model has it.

    [TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}     (Small 3.2)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}                      (Devstral, Ministral 3)
    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}] (Nemo, Small 3.1)

Call ids are 9 letters and digits: Mistral's templates refuse any other id in the history.
"""

from __future__ import annotations

import re
from typing import Any

from pendra_inference.formats.base import (
    Call,
    Format,
    Parsed,
    alnum_id,
    call_from_object,
    held,
    json_end,
    loads,
    rstrip_partial,
)
from pendra_inference.formats.grammar import Grammar

CALLS, CALL_ID, ARGS = "[TOOL_CALLS]", "[CALL_ID]", "[ARGS]"
_NAME = re.compile(
    r"\s*([a-zA-Z0-9_-]{1,64})(?:" + re.escape(CALL_ID) + r"([a-zA-Z0-9]{1,64}))?" + re.escape(ARGS)
)


class Mistral(Format):
    name = "mistral"
    think = ("[THINK]", "[/THINK]")
    preserved = (CALLS, CALL_ID, ARGS, "[THINK]", "[/THINK]")
    call_starts = (CALLS,)

    def new_id(self) -> str:
        return alnum_id()

    def parse_calls(self, text: str, schemas: dict[str, dict[str, Any]], partial: bool) -> Parsed:
        pieces = text.split(CALLS)
        head = pieces[0] if len(pieces) > 1 or not partial else held(pieces[0], CALLS)
        parts = [rstrip_partial(head, partial) if len(pieces) == 1 else head.rstrip()]
        calls: list[Call] = []
        for i, piece in enumerate(pieces[1:], 1):
            last = i == len(pieces) - 1
            named = _NAME.match(piece)
            if named and named.group(1) in schemas:
                at = named.end()
                end = json_end(piece, at)
                if end > 0:
                    calls.append(Call(named.group(1), piece[at:end], named.group(2), True))
                elif end == -1 and last:  # still arriving, or cut by max_tokens: a call all the same
                    calls.append(Call(named.group(1), piece[at:].rstrip(), named.group(2), False))
                else:
                    parts.append(CALLS + piece)  # nested too deep, or never closed: no call of ours
                continue
            if not named and piece.lstrip().startswith("["):  # the JSON list form: whole, once closed
                end = json_end(piece, piece.find("["))
                if end == -1 and partial and last:
                    break
                try:
                    items = loads(piece[: end if end > 0 else len(piece)])
                except ValueError:
                    items = None
                listed = [call_from_object(x, schemas) for x in items] if isinstance(items, list) else [None]
                if all(listed):
                    calls += [c for c in listed if c]
                    continue
            if partial and last and not named:
                break  # the name is still arriving
            parts.append(CALLS + piece)
        return Parsed(content="".join(parts), calls=calls)

    def call_rule(self, g: Grammar, name: str, schema: dict[str, Any]) -> str:
        args = g.json(schema, f"args-{name}")
        if ARGS not in self.template:  # the older list form
            return f'"[{{\\"name\\": \\"{g.escape(name)}\\", \\"arguments\\": " {args} "}}]"'
        call_id = f"{g.literal(CALL_ID)} [a-zA-Z0-9]{{9}} " if CALL_ID in self.template else ""
        return f"{g.literal(name)} {call_id}{g.literal(ARGS)} {args}"

    def calls_rule(self, g: Grammar, one: str, parallel: bool) -> str:
        calls = f"{g.literal(CALLS)} {one}"  # each call after its own [TOOL_CALLS]
        return f"{calls} ( {calls} )*" if parallel else calls
