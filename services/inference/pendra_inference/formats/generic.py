"""Models whose template knows no tools (Gemma 3, base models): the tools are described in the
system message and the answer is a JSON call, in `<tool_call>` tags, a ```json block, or bare.
The answer is held until it ends, since only then is it known to be a call; one that max_tokens
cut inside the call is the call with the arguments it got."""

from __future__ import annotations

import re
from typing import Any

from pendra_inference.formats.base import WS, Format, Parsed, call_from_object, cut_call, loads

_TAGGED = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_FENCED = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n?```\s*$", re.DOTALL)
_OPENINGS = ("<tool_call>", "```json", "```")  # what a cut call may stand after


class Generic(Format):
    name = "generic"

    def parse_calls(self, text: str, schemas: dict[str, dict[str, Any]], partial: bool) -> Parsed:
        if partial:
            return Parsed()
        fenced = _FENCED.match(text)
        candidates = _TAGGED.findall(text) or [fenced.group(1) if fenced else text]
        calls = []
        for raw in candidates:
            try:
                data = loads(raw.strip())
            except ValueError:
                continue
            for item in data if isinstance(data, list) else [data]:
                call = call_from_object(item, schemas)
                if call is not None:
                    calls.append(call)
        if not calls:
            body = text.lstrip(WS)
            opening = next((o for o in _OPENINGS if body.startswith(o)), "")
            cut = cut_call(body[len(opening) :], schemas)
            calls = [cut] if cut is not None else []
        return Parsed(calls=calls) if calls else Parsed(content=text)
