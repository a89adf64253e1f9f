"""GBNF for forced tool calls and response formats, built from pieces: literals, JSON schemas
(llama-cpp-python's own converter, its strings made strict JSON), and "any text up to this tag" (a
small automaton, so the text cannot contain the tag before it ends)."""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp.llama_grammar import BuiltinRule, SchemaConverter

_RULE_NAME = re.compile(r"[^a-zA-Z0-9-]+")
# One character of a JSON string. JSON forbids raw control characters there (RFC 8259, section 7):
# llama-cpp-python 0.3.36's converter lets them through (`[^"\\]`), so a model could write a raw
# newline inside an argument, and the call, complete by the grammar, failed to parse and came back
# as text. The class is llama.cpp's own converter's (common/json-schema-to-grammar.cpp), DEL too.
JSON_CHAR = BuiltinRule(r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})', [])


class _Converter(SchemaConverter):
    """llama-cpp-python's converter, with JSON strings as strict as JSON parsers read them."""

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        strict = JSON_CHAR if name == "char" else rule
        return str(super()._add_primitive(name, strict))


class Grammar:
    def __init__(self) -> None:
        self.converter = _Converter(  # type: ignore[no-untyped-call]
            prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
        )
        self.rules: dict[str, str] = {"pendra-ws": "[ \\t\\n]*"}

    @staticmethod
    def escape(text: str) -> str:
        """`text` inside a GBNF string literal."""
        return json.dumps(text, ensure_ascii=False)[1:-1]

    def literal(self, text: str) -> str:
        return f'"{self.escape(text)}"'

    def rule(self, name: str, body: str) -> str:
        key = "pendra-" + (_RULE_NAME.sub("-", name).strip("-") or "r")
        base, i = key, 0
        while key in self.rules and self.rules[key] != body:
            i += 1
            key = f"{base}{i}"
        self.rules[key] = body
        return key

    def alternatives(self, name: str, bodies: list[str]) -> str:
        return self.rule(name, " | ".join(f"( {b} )" for b in bodies))

    def json(self, schema: Any, name: str) -> str:
        """The rule for a JSON value of `schema` (already bounded by the request limits). Its
        definitions are renamed after `name` first, so two tools' `$defs/Item` stay two rules."""
        resolved = self.converter.resolve_refs(_namespaced(schema, _RULE_NAME.sub("-", name)), "stdin")
        return str(self.converter.visit(resolved, _RULE_NAME.sub("-", name)))  # type: ignore[no-untyped-call]

    def until(self, name: str, end: str) -> str:
        """Any text that ends with `end` and holds it nowhere before: the prefix automaton of
        `end` (state k: the last k characters read are `end[:k]`), one rule per state."""
        states = [self.rule(f"{name}-{k}", "") for k in range(len(end))]
        # Rules refer to each other; register names first, then the bodies.
        for k in range(len(end)):
            moves: dict[str, int] = {}
            for c in set(end):
                text = end[:k] + c
                moves[c] = next(n for n in range(len(text), -1, -1) if end.startswith(text[len(text) - n :]))
            alts = []
            for c, n in sorted(moves.items()):
                if n == len(end):
                    alts.append(self.literal(c))
                else:  # n == 0 too: a character of `end` that starts nothing of it here
                    alts.append(f"{self.literal(c)} {states[n]}")
            others = "".join(_class_char(c) for c in sorted(set(end)))
            alts.append(f"[^{others}] {states[0]}")
            self.rules[states[k]] = " | ".join(alts)
        return states[0]

    def build(self, root: str) -> str:
        converted_rules = set(self.converter._rules)
        if clash := converted_rules & set(self.rules):
            raise ValueError(f"rule names used twice: {sorted(clash)[:3]}")
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items()]
        converted = str(self.converter.format_grammar())  # type: ignore[no-untyped-call]
        lines += [line for line in converted.splitlines() if not line.startswith("root ::=")]
        return "\n".join(lines)


def _namespaced(schema: Any, prefix: str) -> Any:
    """A copy of `schema` whose local definitions (`$defs`, `definitions`) and the `$ref`s to them
    carry `prefix` (the converter names a definition's rule after it, once per grammar)."""
    if isinstance(schema, list):
        return [_namespaced(item, prefix) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("$defs", "definitions") and isinstance(value, dict):
            out[key] = {f"{prefix}-{name}": _namespaced(v, prefix) for name, v in value.items()}
        elif key == "$ref" and isinstance(value, str) and value.startswith(("#/$defs/", "#/definitions/")):
            parts = value.split("/")  # "#", "$defs", the name, maybe a path inside it
            out[key] = "/".join([*parts[:2], f"{prefix}-{parts[2]}", *parts[3:]])
        else:
            out[key] = _namespaced(value, prefix)
    return out


def _class_char(c: str) -> str:
    if c in "\\]^-[":
        return "\\" + c
    if c == "\n":
        return "\\n"
    if c == "\t":
        return "\\t"
    if c == "\r":
        return "\\r"
    return c
