"""What every family's format shares: the parsed message, the request's wishes, the base class.

A format answers four questions for one model family (see the families' modules):
- which variables its chat template reads for thinking and tools (`template_vars`);
- whether a rendered prompt leaves the model inside its reasoning (`opened`), or has closed it
  (`thinking`: "open", "off", or "maybe" when the model may open it itself);
- how its output splits into reasoning, content and tool calls (`parse`, whole or partial: a
  partial parse never returns text that a later, longer parse could take back, so a stream's
  deltas never leak half a tag);
- the grammar that forces a tool call in its own syntax (`call_grammar`).
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pendra_shared import jsonbody

from pendra_inference.formats.grammar import Grammar

# Deepest JSON taken from a tool call's arguments.
JSON_DEPTH = 64
WS = " \t\r\n"
Thinking = Literal["open", "off", "maybe"]


@dataclass
class Call:
    name: str
    arguments: str  # JSON text; while partial, its beginning
    id: str | None = None  # the model's own id for the call (Mistral writes one)
    done: bool = False


@dataclass
class Parsed:
    reasoning: str = ""
    content: str = ""
    calls: list[Call] = field(default_factory=list)


@dataclass(frozen=True)
class Turn:
    """What one request asks of the format."""

    tools: list[dict[str, Any]] | None = None  # OpenAI function tools, None without tools
    thinking: bool | None = None  # None: the model's default
    effort: str | None = None  # reasoning_effort
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs

    def schemas(self) -> dict[str, dict[str, Any]]:
        """Each tool's parameters schema by name."""
        return {t["function"]["name"]: t["function"].get("parameters") or {} for t in self.tools or ()}


class Format:
    """A model family's way of writing thinking and tool calls. This base is plain text: no
    reasoning, no native calls."""

    name: ClassVar[str] = "plain"
    # The tags around reasoning, when the family writes it inline (None for a model whose
    # template never mentions the opening tag: Qwen2.5 and Granite 4 do not think).
    think: tuple[str, str] | None = None
    # Special tokens the output must show as text for `parse` to see them.
    preserved: ClassVar[tuple[str, ...]] = ()
    # Where the family's calls begin: a call also ends the reasoning that the prompt opened.
    call_starts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, template: str = "") -> None:
        self.template = template
        if self.think is not None and template and self.think[0] not in template:
            self.think = None

    @property
    def thinks(self) -> bool:
        return self.think is not None

    def template_vars(self, turn: Turn) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if turn.thinking is not None or self.thinks:
            # llama-server always passes it, true unless asked otherwise; some templates (llama.cpp's
            # QwQ and R1 distills) close the reasoning when it is missing.
            out["enable_thinking"] = turn.thinking is not False
        if turn.effort is not None:
            out["reasoning_effort"] = turn.effort
        out.update(turn.template_kwargs)
        return out

    def inline(self) -> Format:
        """This format with the reasoning left in the content, tags and all (llama-server's
        `--reasoning-format none`), its calls still parsed."""
        plain = copy.copy(self)
        plain.think = None
        return plain

    def opened(self, prompt: str) -> bool:
        """Whether the prompt ends inside the reasoning (the template wrote its opening tag)."""
        return self.thinking(prompt) == "open"

    def new_id(self) -> str:
        return f"call_{secrets.token_hex(12)}"

    def parse(
        self, text: str, schemas: dict[str, dict[str, Any]] | None, opened: bool, partial: bool
    ) -> Parsed:
        """`text` (the output so far) as reasoning, content and calls; `schemas` None: no tools."""
        reasoning, rest = self.split_reasoning(text, opened, partial, self.call_starts if schemas else ())
        if schemas is None:
            return Parsed(reasoning, lstrip_once(rest, reasoning), [])
        parsed = self.parse_calls(rest, schemas, partial)
        parsed.reasoning = reasoning
        parsed.content = lstrip_once(parsed.content, reasoning)
        return parsed

    def parse_calls(self, text: str, schemas: dict[str, dict[str, Any]], partial: bool) -> Parsed:
        return Parsed(content=text)

    def split_reasoning(
        self, text: str, opened: bool, partial: bool, calls: tuple[str, ...] = ()
    ) -> tuple[str, str]:
        """(reasoning, the rest). The reasoning is trimmed; while partial, a trailing bit that may
        be the start of the closing tag, or whitespace that may be trimmed, is held back. Reasoning
        the prompt opened also ends where a call begins (one of `calls`), as llama.cpp reads it: a
        model may call a tool without closing its thoughts."""
        if self.think is None:
            return "", text
        start, end = self.think
        if not opened:
            body = text.lstrip(WS)
            if partial and start.startswith(body):
                return "", ""  # maybe the opening tag, not yet whole
            if not body.startswith(start):
                return "", text
            text = body[len(start) :]
            calls = ()
        close = text.find(end)
        before = text if close < 0 else text[:close]
        call = min((i for i in (before.find(c) for c in calls) if i >= 0), default=-1)
        if call >= 0:
            return text[:call].strip(WS), text[call:]
        if close < 0:
            reasoning = text.strip(WS) if not partial else held(text, end, *calls).lstrip(WS).rstrip(WS)
            return reasoning, ""
        return text[:close].strip(WS), text[close + len(end) :].lstrip(WS)

    def thinking(self, prompt: str) -> Thinking:
        """Where a rendered prompt leaves the reasoning: open (the template wrote the opening tag),
        off (the template wrote an empty one, as `enable_thinking: false` does), or maybe."""
        if self.think is None:
            return "off"
        end = prompt.rstrip(WS)
        return "open" if end.endswith(self.think[0]) else "off" if end.endswith(self.think[1]) else "maybe"

    def call_grammar(self, turn: Turn, names: list[str], parallel: bool, thinking: Thinking) -> str:
        """GBNF whose every sentence is one (or, with `parallel`, several) calls of `names`."""
        g = Grammar()
        one = g.alternatives("call", [self.call_rule(g, name, turn.schemas()[name]) for name in names])
        return g.build(f"{self.reasoning_rule(g, thinking)} {self.calls_rule(g, one, parallel)}".strip())

    def calls_rule(self, g: Grammar, one: str, parallel: bool) -> str:
        """One call (rule `one`), or with `parallel` several, as the family writes them in a row."""
        return f"{one} ({self.call_separator()} {one})*" if parallel else one

    def reasoning_rule(self, g: Grammar, thinking: Thinking) -> str:
        """The reasoning a forced call may start with: all of it when the prompt opened it,
        optional when the model may open it itself, none when the prompt closed it."""
        if self.think is None or thinking == "off":
            return ""
        start, end = self.think
        body = g.until("reasoning", end)
        return f"{body} pendra-ws" if thinking == "open" else f'("{g.escape(start)}" {body} pendra-ws)?'

    def content_rule(self, g: Grammar, body: str, thinking: Thinking) -> str:
        """An answer constrained to `body` (response_format), after the reasoning."""
        return f"{self.reasoning_rule(g, thinking)} {body}".strip()

    def call_rule(self, g: Grammar, name: str, schema: dict[str, Any]) -> str:
        args = g.json(schema, f"args-{name}")
        return f'"{{\\"name\\": \\"{g.escape(name)}\\", \\"arguments\\": " {args} "}}"'

    def call_separator(self) -> str:
        return '"\\n"'


def held(text: str, *tags: str) -> str:
    """`text` without the trailing bit that could be the start of one of `tags`."""
    cut = len(text)
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:n]):
                cut = min(cut, len(text) - n)
                break
    return text[:cut]


def lstrip_once(content: str, reasoning: str) -> str:
    """Content after reasoning starts at its first non-blank character (`</think>\\n\\n`)."""
    return content.lstrip(WS) if reasoning or not content.strip(WS) else content


def rstrip_partial(text: str, partial: bool) -> str:
    """Trailing whitespace is held back while partial (it may end up trimmed before a call)."""
    return text.rstrip(WS) if partial else text


# A JSON text's pieces: a whole (or unfinished) string, one bracket, or a run of anything else.
_JSON_PIECES = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[{}\[\]]|[^"{}\[\]]+', re.DOTALL)


def json_end(text: str, start: int = 0) -> int:
    """The index just past the JSON object or array starting at `text[start]`; -1 while it is not
    closed; -2 when it nests deeper than JSON_DEPTH (no call of ours). Strings are skipped by the
    regex engine, so a long argument costs no Python loop per character."""
    depth = 0
    for piece in _JSON_PIECES.finditer(text, start):
        c = piece.group()
        if c in "{[":
            depth += 1
            if depth > JSON_DEPTH:
                return -2
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return piece.end()
    return -1


def loads(text: str) -> Any:
    """JSON, bounded in depth; ValueError when it is not."""
    return jsonbody.loads(text.encode(), JSON_DEPTH)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def call_from_object(item: Any, schemas: dict[str, dict[str, Any]]) -> Call | None:
    """A call from `{"name": ..., "arguments"|"parameters": ...}`, when it names a known tool."""
    if not isinstance(item, dict) or item.get("name") not in schemas:
        return None
    args = item.get("arguments", item.get("parameters", {}))
    return Call(item["name"], args if isinstance(args, str) else dumps(args), None, True)


_NAME_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]{1,64})"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def json_call(inner: str, schemas: dict[str, dict[str, Any]], partial: bool) -> Call | None:
    """A `{"name": ..., "arguments": {...}}` call that may still be arriving (`partial`: its block
    is not closed): its arguments stream as written once the name is known. None while nothing can
    be said yet, or when it is no call."""
    head = _NAME_HEAD.match(inner)
    if head and head.group(1) in schemas and inner[head.end() : head.end() + 1] == "{":
        end = json_end(inner, head.end())
        if end > 0:
            return Call(head.group(1), inner[head.end() : end], None, True)
        if partial and end == -1:
            return Call(head.group(1), inner[head.end() :].rstrip(WS), None, False)
    body = inner.strip(WS)
    if partial and body[:1] in ("{", "") and json_end(body) == -1:
        return None  # still arriving
    try:
        data = loads(body)
    except ValueError:
        return None
    return call_from_object(data, schemas)


def cut_call(text: str, schemas: dict[str, dict[str, Any]]) -> Call | None:
    """A bare JSON call max_tokens cut: `text` ends inside a `{"name": ..., "arguments": ...}`
    object (it never closed) once the tool's name and the start of its arguments have come. It
    stays a call with the arguments it got, as the tagged families' cut calls do. None otherwise."""
    body = text.lstrip(WS)
    if body[:1] != "{" or json_end(body) != -1:
        return None
    return json_call(body, schemas, partial=True)


_ALNUM = string.ascii_letters + string.digits


def alnum_id(n: int = 9) -> str:
    """Mistral's templates accept only 9-character alphanumeric call ids."""
    return "".join(secrets.choice(_ALNUM) for _ in range(n))
