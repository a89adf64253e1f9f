"""What one chat request may ask for, checked before a model is loaded or llama.cpp is called.

The limits that are settings (`max_messages`, `max_tools`, `max_stop`, `max_stop_chars`,
`max_schema_bytes`, `max_schema_depth`, and the chat-template budget) travel as `RequestLimits`.
JSON schemas (`response_format`, a tool's `parameters`) are bounded in three places, because each
stage can blow up on its own:

1. the schema itself: nesting, compact size, and the repetitions it asks for (`maxLength`,
   `minItems`, `{m,n}` in a `pattern`, ...), so llama-cpp-python's converter stays small;
2. the GBNF the converter wrote: its size and the nesting of its groups. llama.cpp parses a
   grammar recursively: `"pattern": "^a{1,100000}$"` becomes 100000 nested groups and overflows
   the C stack (a segfault, measured), and parsing 40 000 alternatives takes 1.8 s;
3. llama.cpp's own compile, in `chat.py`, which refuses what it cannot use.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import llama_cpp
from pendra_shared.api_errors import InvalidRequest
from pendra_shared.config import Settings

from pendra_inference.protocol import ChatCompletionRequest
from pendra_inference.registry import Loaded

# Repetitions a whole schema may ask for; each becomes grammar text.
MAX_SCHEMA_REPEATS = 100_000
# Properties one object may list: the converter's work grows with their square (900: 1.3 s).
MAX_OBJECT_PROPERTIES = 256
# GBNF llama.cpp is given: at most this long, and groups nested at most this deep (llama.cpp
# itself refuses nesting past about 1000 optional groups, after parsing them recursively).
MAX_GRAMMAR_CHARS = 256 * 1024
MAX_GRAMMAR_NESTING = 1000
# Tokenizers that keep every byte of the text in some token (WordPiece and Unigram drop spaces).
_LOSSLESS_VOCABS = frozenset({llama_cpp.LLAMA_VOCAB_TYPE_SPM, llama_cpp.LLAMA_VOCAB_TYPE_BPE})
_REPEAT_KEYS = frozenset(
    {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains"}
)
_QUANTIFIER_RE = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


@dataclass(frozen=True)
class RequestLimits:
    """The settings a chat request is checked against (defaults: the settings' own)."""

    max_messages: int = _default("max_messages")
    max_tools: int = _default("max_tools")
    max_stop: int = _default("max_stop")
    max_stop_chars: int = _default("max_stop_chars")
    max_schema_bytes: int = _default("max_schema_bytes")
    max_schema_depth: int = _default("max_schema_depth")
    template_max_chars: int = _default("template_max_chars")
    template_timeout_s: float = _default("template_timeout_s")

    @classmethod
    def from_settings(cls, s: Settings) -> RequestLimits:
        return cls(
            max_messages=s.max_messages,
            max_tools=s.max_tools,
            max_stop=s.max_stop,
            max_stop_chars=s.max_stop_chars,
            max_schema_bytes=s.max_schema_bytes,
            max_schema_depth=s.max_schema_depth,
            template_max_chars=s.template_max_chars,
            template_timeout_s=s.template_timeout_s,
        )


def check_chat(req: ChatCompletionRequest, limits: RequestLimits) -> None:
    """Everything about a chat request that needs no model; raises InvalidRequest."""
    if len(req.messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages has {len(req.messages)} entries; at most {limits.max_messages} per request",
            param="messages",
        )
    for i, msg in enumerate(req.messages):
        for j, call in enumerate(msg.tool_calls or []):
            fn = call.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise InvalidRequest(
                    f"messages[{i}].tool_calls[{j}].function must be an object with a name",
                    param=f"messages[{i}].tool_calls",
                )
    tools = req.tools or []
    if len(tools) > limits.max_tools:
        raise InvalidRequest(f"tools has {len(tools)} entries; at most {limits.max_tools}", param="tools")
    for i, tool in enumerate(tools):
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, f"tools[{i}].function.parameters", limits)
    _check_tool_choice(req)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.max_stop or any(not s for s in stops):
        raise InvalidRequest(f"stop takes at most {limits.max_stop} non-empty strings", param="stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise InvalidRequest(
            f"stop strings may be at most {limits.max_stop_chars} characters long", param="stop"
        )
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "response_format.json_schema.schema must be a JSON schema object", param="response_format"
            )
        check_schema(schema, "response_format", limits)


def _check_tool_choice(req: ChatCompletionRequest) -> None:
    choice = req.tool_choice
    if choice == "required" and not req.tools:
        raise InvalidRequest('tool_choice "required" needs tools', param="tool_choice")
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidRequest(
                'tool_choice must be "none", "auto", "required" or '
                '{"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        if name not in {t.function.name for t in req.tools or []}:
            raise InvalidRequest(
                f"tool_choice names {name[:64]!r}, which is not in tools", param="tool_choice"
            )


def check_schema(schema: Any, param: str, limits: RequestLimits) -> None:
    """A JSON schema small enough to become a grammar: depth first (the rest walks it), then
    its compact size, then what it would expand to."""
    repeats = 0
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_schema_depth:
            raise InvalidRequest(
                f"{param}: the schema nests deeper than {limits.max_schema_depth} levels", param=param
            )
        if isinstance(node, dict):
            properties = node.get("properties")
            if isinstance(properties, dict) and len(properties) > MAX_OBJECT_PROPERTIES:
                raise InvalidRequest(
                    f"{param}: an object lists {len(properties)} properties; at most {MAX_OBJECT_PROPERTIES}",
                    param=param,
                )
            for key, value in node.items():
                if key in _REPEAT_KEYS and type(value) is int:
                    repeats += max(0, value)
                elif key == "pattern" and isinstance(value, str):
                    repeats += _pattern_repeats(value)
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        else:
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
        if repeats > MAX_SCHEMA_REPEATS:
            raise InvalidRequest(
                f"{param}: the schema asks for more than {MAX_SCHEMA_REPEATS} repetitions "
                "(maxLength, minItems, {m,n} in patterns ...)",
                param=param,
            )
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limits.max_schema_bytes:
        raise InvalidRequest(
            f"{param}: the schema takes {size} bytes as compact JSON; at most {limits.max_schema_bytes}",
            param=param,
        )


def _pattern_repeats(pattern: str) -> int:
    total = 0
    for low, high in _QUANTIFIER_RE.findall(pattern):
        for digits in (low, high):
            if len(digits) > 9:
                return MAX_SCHEMA_REPEATS + 1
            total += int(digits or 0)
    return total


def check_grammar(grammar: str, param: str) -> None:
    """GBNF that llama.cpp can parse without deep recursion or seconds of work."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(
            f"{param}: the schema makes a grammar of {len(grammar)} characters; at most {MAX_GRAMMAR_CHARS}",
            param=param,
        )
    if gbnf_nesting(grammar) > MAX_GRAMMAR_NESTING:
        raise InvalidRequest(
            f"{param}: the schema makes a grammar nested more than {MAX_GRAMMAR_NESTING} levels deep "
            "(a long repetition such as a{1,100000}?)",
            param=param,
        )


def gbnf_nesting(grammar: str) -> int:
    """The deepest nesting of ( ) groups in GBNF text, outside "literals" and [classes]."""
    deepest = depth = 0
    quote: str | None = None
    escaped = False
    for ch in grammar:
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in '"[':
            quote = '"' if ch == '"' else "]"
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
        elif ch == "\n":
            depth = 0
    return deepest


def surely_longer(loaded: Loaded, text: str, tokens: int) -> bool:
    """Whether `text` must become more than `tokens` tokens, known without tokenizing it: no token
    stands for more bytes than its own text, so a text longer than `tokens` times the longest
    token text cannot fit. Tokenizing a megabyte a context could never hold is skipped (and a
    vocabulary that tokenizes slowly meets only texts that could fit)."""
    longest = loaded.memo.get("longest_token_bytes")
    if longest is None:
        vocab = loaded.engine.vocab
        if llama_cpp.llama_vocab_type(vocab) in _LOSSLESS_VOCABS:
            count = llama_cpp.llama_vocab_n_tokens(vocab)
            longest = max(
                (len(llama_cpp.llama_vocab_get_text(vocab, i) or b"") for i in range(count)), default=0
            )
        longest = loaded.memo["longest_token_bytes"] = longest or 0
    return bool(longest) and len(text) > tokens * longest
