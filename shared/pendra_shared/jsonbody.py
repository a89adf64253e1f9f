"""Request bodies as strict JSON: UTF-8 without a byte-order mark, no NaN or Infinity, no lone
surrogates, and no deeper than a limit.

Python's `json.loads` is lenient where RFC 8259 is not: it guesses UTF-16 and UTF-32, skips a
BOM, takes `NaN`/`Infinity` and keeps `"\\ud800"` as a string llama.cpp cannot encode. Every
refusal here is a `json.JSONDecodeError`, which FastAPI turns into a 400 like any syntax error.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(body: bytes, max_depth: int) -> Any:
    """The JSON value of a request body, or `json.JSONDecodeError` saying what is wrong."""
    if body.startswith(_BOMS):
        raise json.JSONDecodeError("the body starts with a byte-order mark (send UTF-8 without one)", "", 0)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError("the body is not valid UTF-8", "", exc.start) from None
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError(f"the body nests deeper than {max_depth} levels", "", 0) from None
    except ValueError as exc:  # NaN/Infinity, or an integer of more than 4300 digits
        message = "a number has too many digits" if "digits" in str(exc) else str(exc)
        raise json.JSONDecodeError(message, "", 0) from None
    if text.count("[") + text.count("{") > max_depth and _deeper_than(value, max_depth):
        raise json.JSONDecodeError(f"the body nests deeper than {max_depth} levels", "", 0)
    escape = _SURROGATE_ESCAPE_RE.search(text)
    if escape and _has_lone_surrogate(value):
        raise json.JSONDecodeError(
            "a string holds a lone UTF-16 surrogate (such as \\ud800), which is not text", "", escape.start()
        )
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Level by level, so the work per element is a comprehension step, not a loop turn."""
    level = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for node in level:
            items = node.values() if type(node) is dict else node
            below += [c for c in items if type(c) is dict or type(c) is list]
        level = below
    return False


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if _SURROGATE_RE.search(node):
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False
