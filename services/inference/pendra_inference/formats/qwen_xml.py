"""Qwen3.5, Qwen3.6 and Qwen3-Coder: XML calls with one tag per parameter, `<think>` reasoning
(the template opens it at the end of the prompt unless `enable_thinking` is false).

    <tool_call>
    <function=edit>
    <parameter=filename>
    foo.c
    </parameter>
    </function>
    </tool_call>

A parameter's value is text: kept as a string where the tool's schema says string, read as JSON
otherwise (`1` is a number), as the template's own instructions and llama.cpp read it. String
values stream as they arrive; others once their tag closes.
"""

from __future__ import annotations

import re
from typing import Any

from pendra_inference.formats.base import Call, dumps, held, loads
from pendra_inference.formats.grammar import Grammar
from pendra_inference.formats.hermes import Tagged

_FUNCTION = re.compile(r"\s*<function=([^>\n]{1,64})>")
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]{1,128})>\n?")
_VALUE_END = "\n</parameter>"
# A value's closing tag written without the newline: taken as its end where the next parameter or
# the function's end follows (or where the call ends there); elsewhere it is the value's own text.
_BARE_END = re.compile(r"</parameter>(\s*(?:<parameter=|</function>))?")


def _value(raw: str, schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    if kind == "string" or (isinstance(kind, list) and "string" in kind and len(kind) == 1):
        return raw
    try:
        return loads(raw.strip())
    except ValueError:
        return raw


def _is_string(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "string"


def _string_choices(schema: dict[str, Any]) -> list[str]:
    """A string parameter's allowed values, where its schema lists them (`enum`, `const`)."""
    values = (
        schema["enum"]
        if isinstance(schema.get("enum"), list)
        else [schema["const"]]
        if "const" in schema
        else []
    )
    return (
        [v for v in values if isinstance(v, str)]
        if values and all(isinstance(v, str) for v in values)
        else []
    )


class QwenXML(Tagged):
    name = "qwen-xml"
    think = ("<think>", "</think>")

    def block_call(self, inner: str, schemas: dict[str, dict[str, Any]], partial: bool) -> Call | None:
        head = _FUNCTION.match(inner)
        if head is None:
            return None
        name = head.group(1).strip()
        if name not in schemas:
            return None
        props = (schemas[name] or {}).get("properties") or {}
        parts: list[str] = []
        at = head.end()
        while True:
            param = _PARAMETER.match(inner, at)
            if param is None:
                break
            key = param.group(1).strip()
            end = inner.find(_VALUE_END, param.end())
            bare = _BARE_END.search(inner, param.end())  # a closing tag with no newline before it
            ends = bare is not None and (bool(bare.group(1)) or not (partial or inner[bare.end() :].strip()))
            if bare and ends and (end < 0 or bare.start() < end):
                end = bare.start()
            schema = props.get(key) or {}
            if end < 0:
                if partial and _is_string(schema):  # stream the string as it comes
                    sofar = inner[param.end() :]
                    cut = sofar.find("</parameter>")  # maybe its end, maybe its text: not sent yet
                    sofar = held(sofar if cut < 0 else sofar[:cut], _VALUE_END, "</parameter>")
                    parts.append(f"{dumps(key)}: {dumps(sofar)[:-1]}")
                    return Call(name, "{" + ", ".join(parts), None, False)
                if partial:
                    break
                raw = inner[param.end() :]
                parts.append(f"{dumps(key)}: {dumps(_value(raw, schema))}")
                return Call(name, "{" + ", ".join(parts) + "}", None, True)
            raw = inner[param.end() : end]
            parts.append(f"{dumps(key)}: {dumps(_value(raw, schema))}")
            at = inner.find(">", end) + 1
        closed = "</function>" in inner[at:] or not partial
        return Call(name, "{" + ", ".join(parts) + ("}" if closed else ""), None, closed)

    def call_rule(self, g: Grammar, name: str, schema: dict[str, Any]) -> str:
        props = (schema or {}).get("properties") or {}
        required = set((schema or {}).get("required") or [])
        params = []
        for key, prop in props.items():
            head = g.literal(f"<parameter={key}>\n")
            choices = _string_choices(prop)
            if choices:  # an enum (or const) of strings: one of them, as raw text
                values = " | ".join(g.literal(v) for v in choices)
                body = f"{head} ( {values} ) {g.literal(_VALUE_END + chr(10))}"
            elif _is_string(prop):
                body = f"{head} {g.until(f'value-{name}-{key}', _VALUE_END)} {g.literal(chr(10))}"
            else:
                body = f"{head} {g.json(prop, f'value-{name}-{key}')} {g.literal(_VALUE_END + chr(10))}"
            params.append(body if key in required else f"( {body} )?")
        start, end = self.tags
        return " ".join(
            [g.literal(f"{start}\n<function={name}>\n"), *params, g.literal(f"</function>\n{end}")]
        )
