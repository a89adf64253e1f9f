"""Each family's parser (`pendra_inference.formats`) against llama.cpp's own expectations, with the
real chat templates (`tests/data/llama.cpp/`).

The cases are transcribed from llama.cpp's `tests/test-chat.cpp` (the llama.cpp vendored in
llama-cpp-python 0.3.36, commit 0c1e570): its `peg_tester("models/templates/<name>.jinja")` blocks
and the fixtures at the top of that file (`message_assist*`, `special_function_tool`,
`python_tool`, ...); each case names its block. Cases marked "Pendra" are in the template's own
syntax where llama.cpp has none. llama.cpp compares content and reasoning with surrounding
whitespace stripped; here the values are the stripped ones, compared exactly.

Each output is parsed whole (one piece) and streamed: cut into the pieces the model would emit
(a vendored tokenizer's tokens, special tokens written out, where one fits the family) and
character by character. The streamed deltas must join to the whole answer, never carry half a
tag, and stream calls as OpenAI does. Each family's forced-call grammar must compile in llama.cpp,
accept the family's calls and reject other names and other syntax, checked by running the text's
tokens through llama.cpp's grammar sampler.
"""

from __future__ import annotations

import codecs
import ctypes
import gzip
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from pendra_inference.detokenize import token_bytes
from pendra_inference.formats import Format, Splitter, Turn, for_template
from pendra_inference.formats.templates import ChatTemplate
from pendra_shared.chat_family import capabilities, family

DATA = Path(__file__).resolve().parents[1] / "data" / "llama.cpp"

QWEN35 = "Qwen3.5-4B.jinja"
QWEN3 = "Qwen-Qwen3-0.6B.jinja"
QWQ = "Qwen-QwQ-32B.jinja"
HERMES = "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja"
GRANITE = "ibm-granite-granite-4.0.jinja"
R1 = "llama-cpp-deepseek-r1.jinja"
R1_QWEN = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"
GPT_OSS = "openai-gpt-oss-120b.jinja"
MISTRAL = "Mistral-Small-3.2-24B-Instruct-2506.jinja"
DEVSTRAL = "unsloth-mistral-Devstral-Small-2507.jinja"
LLAMA33 = "meta-llama-Llama-3.3-70B-Instruct.jinja"
GEMMA2 = "google-gemma-2-2b-it.jinja"

# The vendored tokenizer that fits each model (None: none does; streamed by characters only).
# Hermes 2 Pro is a Llama 3 fine-tune; Granite 4.0 shares Llama 3's pre-tokenizer (gguf_vocab.py).
VOCAB = {
    QWEN35: "qwen",
    QWEN3: "qwen",
    QWQ: "qwen",
    HERMES: "llama",
    GRANITE: "llama",
    LLAMA33: "llama",
}
VOCAB_FILES = {"qwen": "ggml-vocab-qwen35.gguf.gz", "llama": "ggml-vocab-llama-bpe.gguf.gz"}
# Tokens the real model holds whole that the test vocabularies lack (Qwen2's has padding where
# Qwen3's has <think>; Llama 3.0's a reserved token where 3.1 has <|python_tag|>). llama.cpp splits
# the text on special tokens before the BPE, so these come out as single pieces and the rest as
# the vocabulary cuts it.
ADDED = {
    QWEN35: ("<think>", "</think>", "<tool_call>", "</tool_call>"),
    QWEN3: ("<think>", "</think>", "<tool_call>", "</tool_call>"),
    QWQ: ("<think>", "</think>", "<tool_call>", "</tool_call>"),
    HERMES: ("<tool_call>", "</tool_call>"),
    LLAMA33: ("<|python_tag|>",),
}

# Every marker of each family: no content or reasoning delta may carry a piece of one.
MARKERS = {
    "qwen-xml": ("<think>", "</think>", "<tool_call>", "</tool_call>", "<function=", "</function>")
    + ("<parameter=", "</parameter>"),
    "hermes": ("<think>", "</think>", "<tool_call>", "</tool_call>"),
    "deepseek-r1": ("<think>", "</think>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
    + ("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"),
    "harmony": ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>")
    + ("<|return|>",),
    "mistral": ("[TOOL_CALLS]", "[CALL_ID]", "[ARGS]", "[THINK]", "[/THINK]"),
    "llama3": ("<|python_tag|>",),
    "generic": ("<tool_call>", "</tool_call>"),
}


def _tool(name: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": name, "parameters": parameters}}


# test-chat.cpp's tool fixtures.
SPECIAL = _tool("special_function", {"arg1": {"type": "integer"}}, ["arg1"])
SPECIAL_OPT = _tool(
    "special_function_with_opt", {"arg1": {"type": "integer"}, "arg2": {"type": "integer"}}, ["arg1"]
)
PYTHON = _tool("python", {"code": {"type": "string"}}, ["code"])
EDIT = _tool(
    "edit",
    {"filename": {"type": "string"}, "oldString": {"type": "string"}, "newString": {"type": "string"}},
    ["filename", "oldString", "newString"],
)
TERMINAL = _tool("run_in_terminal", {"command": {"type": "string"}}, ["command"])
EMPTY = _tool("empty_args", {}, [])
GPT_OSS_EDIT = _tool(
    "edit",
    {"oldString": {"type": "string"}, "newString": {"type": "string"}, "replaceAll": {"type": "boolean"}},
    ["oldString", "newString"],
)

ASSIST = "Hello, world!\nWhat's up?"  # message_assist
THOUGHTS = "I'm\nthinking"  # message_assist_thoughts
ARG1 = {"arg1": 1}
XML_CALL = (
    "<tool_call>\n<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n</function>\n</tool_call>"
)
XML_OPT = (
    "<tool_call>\n<function=special_function_with_opt>\n<parameter=arg1>\n1\n</parameter>\n"
    "<parameter=arg2>\n2\n</parameter>\n</function>\n</tool_call>"
)
XML_PWD = (
    "<tool_call>\n<function=run_in_terminal>\n<parameter=command>\npwd\n</parameter>\n"
    "</function>\n</tool_call>"
)
JSON_CALL = '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>'
JSON_OPT = (
    '<tool_call>\n{"name": "special_function_with_opt", "arguments": {"arg1": 1, "arg2": 2}}\n</tool_call>'
)
R1_CALL = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>special_function\n"
    '```json\n{"arg1": 1}```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
)
R1_CALL_NL = R1_CALL.replace("}```", "}\n```")  # as the template writes calls in the history
R1_OPT = (
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>special_function_with_opt\n"
    '```json\n{"arg1": 1, "arg2": 2}\n```<｜tool▁call▁end｜>'
)
R1_TWO = R1_CALL_NL.replace("<｜tool▁calls▁end｜>", R1_OPT + "<｜tool▁calls▁end｜>")  # one block, two calls
HARMONY_CALL = '<|channel|>commentary to=functions.special_function <|constrain|>json<|message|>{"arg1": 1}'


@dataclass(frozen=True)
class Case:
    source: str  # where the expectation comes from
    template: str
    output: str  # what the model writes after the prompt
    tools: list[dict[str, Any]] | None = None
    thinking: bool | None = None  # enable_thinking, as the request asks (None: not asked)
    opened: bool = False  # the rendered prompt leaves the model inside its reasoning
    reasoning: str = ""
    content: str = ""
    calls: list[tuple[str, dict[str, Any], str | None]] = field(default_factory=list)  # name, args, id


CASES = [
    # Qwen3.5: XML calls, reasoning the prompt opens (test-chat.cpp, "Qwen3.5-4B.jinja").
    Case("Qwen3.5-4B", QWEN35, f"{THOUGHTS}\n</think>\n\n{ASSIST}", None, True, True, THOUGHTS, ASSIST),
    Case("Qwen3.5-4B", QWEN35, XML_CALL, [SPECIAL], False, calls=[("special_function", ARG1, None)]),
    Case(
        "Qwen3.5-4B",
        QWEN35,
        f"{THOUGHTS}\n</think>\n\n{XML_CALL}",
        [SPECIAL],
        opened=True,
        reasoning=THOUGHTS,
        calls=[("special_function", ARG1, None)],
    ),
    Case(
        "Qwen3.5-4B: parallel",
        QWEN35,
        f"{XML_CALL}\n{XML_OPT}",
        [SPECIAL, SPECIAL_OPT],
        False,
        calls=[("special_function", ARG1, None), ("special_function_with_opt", {"arg1": 1, "arg2": 2}, None)],
    ),
    Case(
        "Qwen3.5-4B: a multi-line string parameter",
        QWEN35,
        "<tool_call>\n<function=python>\n<parameter=code>\n"
        'def hello():\n    print("Hello, world!")\n\nhello()\n'
        "</parameter>\n</function>\n</tool_call>",
        [PYTHON],
        False,
        calls=[("python", {"code": 'def hello():\n    print("Hello, world!")\n\nhello()'}, None)],
    ),
    Case(
        "Qwen3.5-4B: a value ending in a newline keeps it",
        QWEN35,
        "<tool_call>\n<function=edit>\n<parameter=filename>\nfoo.c\n</parameter>\n"
        "<parameter=oldString>\n#iclunde\n</parameter>\n<parameter=newString>\n#include\n\n</parameter>\n"
        "</function>\n</tool_call>",
        [EDIT],
        False,
        calls=[("edit", {"filename": "foo.c", "oldString": "#iclunde", "newString": "#include\n"}, None)],
    ),
    Case(
        "Qwen3.5-4B: code that starts with an indent",
        QWEN35,
        '<tool_call>\n<function=python>\n<parameter=code>\n    print("Hello, world!")\n</parameter>\n'
        "</function>\n</tool_call>",
        [PYTHON],
        False,
        calls=[("python", {"code": '    print("Hello, world!")'}, None)],
    ),
    Case(
        "Qwen3.5-4B: a call ends the reasoning the prompt opened",
        QWEN35,
        XML_PWD,
        [TERMINAL],
        True,
        True,
        calls=[("run_in_terminal", {"command": "pwd"}, None)],
    ),
    Case(
        "Qwen3.5-4B: ...after thinking about it, without </think>",
        QWEN35,
        f"Need to inspect the current directory.\n{XML_PWD}",
        [TERMINAL],
        True,
        True,
        "Need to inspect the current directory.",
        calls=[("run_in_terminal", {"command": "pwd"}, None)],
    ),
    Case(
        "Qwen3.5-4B: no-argument tool",
        QWEN35,
        "<tool_call>\n<function=empty_args>\n</function>\n</tool_call>",
        [EMPTY],
        False,
        calls=[("empty_args", {}, None)],
    ),
    Case(
        "Qwen3.5-4B: empty reasoning, content, call",
        QWEN35,
        f"</think>\n\nLet me inspect the current directory.\n{XML_PWD}",
        [TERMINAL],
        True,
        True,
        content="Let me inspect the current directory.",
        calls=[("run_in_terminal", {"command": "pwd"}, None)],
    ),
    Case(
        "Qwen3.5-4B: reasoning, content, call",
        QWEN35,
        f"I should inspect the directory.\n</think>\n\nLet me inspect it now.\n{XML_PWD}",
        [TERMINAL],
        True,
        True,
        "I should inspect the directory.",
        "Let me inspect it now.",
        [("run_in_terminal", {"command": "pwd"}, None)],
    ),
    # Qwen3 writes <think> itself (the prompt opens nothing unless thinking is off) and calls in
    # Hermes JSON (Pendra: the template's own syntax; llama.cpp tests this template for budgets only).
    Case(
        "Pendra: Qwen3 thinks, then calls",
        QWEN3,
        f"<think>\n{THOUGHTS}\n</think>\n\n{JSON_CALL}",
        [SPECIAL],
        reasoning=THOUGHTS,
        calls=[("special_function", ARG1, None)],
    ),
    Case(
        "Pendra: Qwen3 thinks, answers",
        QWEN3,
        f"<think>\n{THOUGHTS}\n</think>\n\n{ASSIST}",
        thinking=True,
        reasoning=THOUGHTS,
        content=ASSIST,
    ),
    Case(
        "Pendra: Qwen3, thinking off",
        QWEN3,
        JSON_CALL,
        [SPECIAL],
        False,
        calls=[("special_function", ARG1, None)],
    ),
    # QwQ: "always has thinking forced open" (test-chat.cpp, "Qwen-QwQ-32B.jinja").
    Case(
        "Qwen-QwQ-32B",
        QWQ,
        "Let me think about this...\n</think>\nThe answer is 42.",
        None,
        True,
        True,
        "Let me think about this...",
        "The answer is 42.",
    ),
    Case(
        "Qwen-QwQ-32B: opened by default", QWQ, "</think>Hello, world!", opened=True, content="Hello, world!"
    ),
    Case(
        "Pendra: QwQ calls after thinking",
        QWQ,
        f"{THOUGHTS}\n</think>\n\n{JSON_CALL}",
        [SPECIAL],
        opened=True,
        reasoning=THOUGHTS,
        calls=[("special_function", ARG1, None)],
    ),
    # test-chat.cpp, "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja".
    Case(
        "Hermes-2-Pro",
        HERMES,
        '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}</tool_call>',
        [SPECIAL],
        calls=[("special_function", ARG1, None)],
    ),
    Case(
        "Hermes-2-Pro: content, then a call",
        HERMES,
        f'{ASSIST}<tool_call>\n{{"name": "special_function", "arguments": {{"arg1": 1}}}}</tool_call>',
        [SPECIAL],
        content=ASSIST,
        calls=[("special_function", ARG1, None)],
    ),
    Case("Pendra: Hermes-2-Pro, tools given, plain answer", HERMES, ASSIST, [SPECIAL], content=ASSIST),
    # test-chat.cpp, "ibm-granite-granite-4.0.jinja".
    Case("granite-4.0", GRANITE, ASSIST, content=ASSIST),
    Case("granite-4.0", GRANITE, JSON_CALL, [SPECIAL], calls=[("special_function", ARG1, None)]),
    # test-chat.cpp, "llama-cpp-deepseek-r1.jinja" and "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja".
    Case("deepseek-r1", R1, f"</think>{ASSIST}", opened=True, content=ASSIST),
    Case("deepseek-r1", R1, f"{THOUGHTS}</think>{ASSIST}", opened=True, reasoning=THOUGHTS, content=ASSIST),
    Case(
        "deepseek-r1: a call",
        R1,
        f"</think>{R1_CALL}",
        [SPECIAL],
        opened=True,
        calls=[("special_function", ARG1, None)],
    ),
    Case(
        "Pendra: deepseek-r1, thinking, two calls",
        R1,
        f"{THOUGHTS}</think>\n\n{R1_TWO}",
        [SPECIAL, SPECIAL_OPT],
        opened=True,
        reasoning=THOUGHTS,
        calls=[("special_function", ARG1, None), ("special_function_with_opt", {"arg1": 1, "arg2": 2}, None)],
    ),
    Case("R1-Distill-Qwen-32B", R1_QWEN, f"</think>{ASSIST}", None, True, True, content=ASSIST),
    Case(
        "R1-Distill-Qwen-32B",
        R1_QWEN,
        f"{THOUGHTS}</think>{ASSIST}",
        opened=True,
        reasoning=THOUGHTS,
        content=ASSIST,
    ),
    Case(
        "R1-Distill-Qwen-32B: thinking off, a call",
        R1_QWEN,
        R1_CALL,
        [SPECIAL],
        False,
        calls=[("special_function", ARG1, None)],
    ),
    # test-chat.cpp, "openai-gpt-oss-120b.jinja".
    Case("gpt-oss: final", GPT_OSS, f"<|channel|>final<|message|>{ASSIST}", content=ASSIST),
    Case("gpt-oss: commentary", GPT_OSS, f"<|channel|>commentary<|message|>{ASSIST}", content=ASSIST),
    Case(
        "gpt-oss: analysis, final",
        GPT_OSS,
        f"<|channel|>analysis<|message|>{THOUGHTS}<|end|><|start|>assistant<|channel|>final<|message|>{ASSIST}",
        reasoning=THOUGHTS,
        content=ASSIST,
    ),
    Case(
        "gpt-oss: analysis, cut off", GPT_OSS, f"<|channel|>analysis<|message|>{THOUGHTS}", reasoning=THOUGHTS
    ),
    Case(
        "gpt-oss: recipient in the role header",
        GPT_OSS,
        ' to=functions.special_function<|channel|>analysis<|message|>{"arg1": 1}',
        [SPECIAL],
        calls=[("special_function", ARG1, None)],
    ),
    Case(
        "gpt-oss: recipient in the channel header",
        GPT_OSS,
        '<|channel|>analysis to=functions.special_function<|message|>{"arg1": 1}',
        [SPECIAL],
        calls=[("special_function", ARG1, None)],
    ),
    Case(
        "gpt-oss: constrained",
        GPT_OSS,
        ' to=functions.special_function<|channel|>analysis <|constrain|>json<|message|>{"arg1": 1}',
        [SPECIAL],
        calls=[("special_function", ARG1, None)],
    ),
    Case(
        "gpt-oss: commentary call",
        GPT_OSS,
        '<|channel|>commentary to=functions.special_function<|message|>{"arg1": 1}',
        [SPECIAL],
        calls=[("special_function", ARG1, None)],
    ),
    Case(
        "gpt-oss: analysis, then a call",
        GPT_OSS,
        f"<|channel|>analysis<|message|>{THOUGHTS}<|end|>"
        '<|start|>assistant to=functions.special_function<|channel|>analysis<|message|>{"arg1": 1}',
        [SPECIAL],
        reasoning=THOUGHTS,
        calls=[("special_function", ARG1, None)],
    ),
    Case(
        "gpt-oss: complex call",
        GPT_OSS,
        "<|channel|>analysis<|message|>Thinking about edit...<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.edit <|constrain|>json<|message|>"
        '{"oldString": "if (part < railCount - 1) {", "newString": "if (part < 4) {", "replaceAll": false}',
        [GPT_OSS_EDIT],
        reasoning="Thinking about edit...",
        calls=[
            (
                "edit",
                {
                    "oldString": "if (part < railCount - 1) {",
                    "newString": "if (part < 4) {",
                    "replaceAll": False,
                },
                None,
            )
        ],
    ),
    Case(
        "gpt-oss: unsolicited builtin, recipient in the role header, dropped",
        GPT_OSS,
        "<|channel|>analysis<|message|>I will execute python to say hello<|end|>"
        "<|start|>assistant to=container.exec<|channel|>commentary<|message|>python3 -c 'print(\"hello\")'",
        reasoning="I will execute python to say hello",
    ),
    Case(
        "gpt-oss: unsolicited builtin, recipient in the channel header, dropped",
        GPT_OSS,
        "<|channel|>analysis<|message|>I will execute python to say hello<|end|>"
        '<|start|>assistant<|channel|>commentary to=python <|constrain|>code<|message|>print("hello")',
        reasoning="I will execute python to say hello",
    ),
    Case(
        "Pendra: gpt-oss, an unsolicited builtin with tools given, dropped",
        GPT_OSS,
        "<|channel|>analysis<|message|>I will execute python to say hello<|end|>"
        '<|start|>assistant<|channel|>commentary to=python <|constrain|>code<|message|>print("hello")',
        [SPECIAL],
        reasoning="I will execute python to say hello",
    ),
    Case(
        "Pendra: gpt-oss, a function not offered, dropped",
        GPT_OSS,
        "<|channel|>commentary to=functions.nope <|constrain|>json<|message|>{}",
        [SPECIAL],
    ),
    Case(
        "Pendra: gpt-oss, an answer ended by <|return|>",
        GPT_OSS,
        f"<|channel|>analysis<|message|>{THOUGHTS}<|end|><|start|>assistant<|channel|>final<|message|>{ASSIST}"
        "<|return|>",
        reasoning=THOUGHTS,
        content=ASSIST,
    ),
    Case(
        'gpt-oss: "commentary to=assistant" before the reasoning',
        GPT_OSS,
        "<|channel|>commentary to=assistant<|channel|>analysis<|message|>I'm\nthinking<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>{ASSIST}",
        reasoning=THOUGHTS,
        content=ASSIST,
    ),
    Case(
        'gpt-oss: "commentary to=assistant" before the final message',
        GPT_OSS,
        "<|channel|>analysis<|message|>I'm\nthinking<|end|><|start|>assistant<|channel|>commentary "
        f"to=assistant<|channel|>final<|message|>{ASSIST}",
        reasoning=THOUGHTS,
        content=ASSIST,
    ),
    # test-chat.cpp, "Mistral-Small-3.2-24B-Instruct-2506.jinja": the model's own [CALL_ID] is kept.
    Case("Mistral-Small-3.2", MISTRAL, ASSIST, content=ASSIST),
    Case(
        "Mistral-Small-3.2: a call with its id",
        MISTRAL,
        '[TOOL_CALLS]special_function[CALL_ID]123456789[ARGS]{"arg1": 1}',
        [SPECIAL],
        calls=[("special_function", ARG1, "123456789")],
    ),
    Case(
        "Mistral-Small-3.2: parallel",
        MISTRAL,
        '[TOOL_CALLS]special_function[CALL_ID]000000001[ARGS]{"arg1": 1}'
        '[TOOL_CALLS]special_function_with_opt[CALL_ID]000000002[ARGS]{"arg1": 1, "arg2": 2}',
        [SPECIAL, SPECIAL_OPT],
        calls=[
            ("special_function", ARG1, "000000001"),
            ("special_function_with_opt", {"arg1": 1, "arg2": 2}, "000000002"),
        ],
    ),
    # test-chat.cpp, "unsloth-mistral-Devstral-Small-2507.jinja": no id written, Pendra makes one.
    Case("Devstral", DEVSTRAL, ASSIST, content=ASSIST),
    Case(
        "Devstral: a call",
        DEVSTRAL,
        '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}',
        [SPECIAL],
        calls=[("special_function", ARG1, None)],
    ),
    Case(
        "Devstral: content, then a call",
        DEVSTRAL,
        f'{ASSIST}[TOOL_CALLS]special_function[ARGS]{{"arg1": 1}}',
        [SPECIAL],
        content=ASSIST,
        calls=[("special_function", ARG1, None)],
    ),
    # test-chat.cpp, "meta-llama-Llama-3.3-70B-Instruct.jinja": plain content with tools given.
    # The calls are Pendra's, in the template's own words ({"name": ..., "parameters": ...}).
    Case("Llama-3.3: plain content, tools given", LLAMA33, ASSIST, [PYTHON], content=ASSIST),
    Case("Llama-3.3: no tools", LLAMA33, ASSIST, content=ASSIST),
    Case(
        "Pendra: Llama-3.3, a bare JSON call",
        LLAMA33,
        '{"name": "python", "parameters": {"code": "print(\'hey\'); print(1)"}}',
        [PYTHON],
        calls=[("python", {"code": "print('hey'); print(1)"}, None)],
    ),
    Case(
        "Pendra: Llama-3.3, <|python_tag|> and two calls",
        LLAMA33,
        '<|python_tag|>{"name": "special_function", "parameters": {"arg1": 1}}; '
        '{"name": "special_function_with_opt", "parameters": {"arg1": 1, "arg2": 2}}',
        [SPECIAL, SPECIAL_OPT],
        calls=[("special_function", ARG1, None), ("special_function_with_opt", {"arg1": 1, "arg2": 2}, None)],
    ),
    Case(
        "Pendra: Llama-3.3, JSON that is no call is content",
        LLAMA33,
        '{"answer": 42}',
        [PYTHON],
        content='{"answer": 42}',
    ),
    # test-chat.cpp, "google-gemma-2-2b-it.jinja": plain content.
    Case("gemma-2", GEMMA2, "Line 1\nLine 2\nLine 3", content="Line 1\nLine 2\nLine 3"),
]


class Vocab:
    """A vocab-only model of one of llama.cpp's tokenizer GGUFs."""

    def __init__(self, path: Path) -> None:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def close(self) -> None:
        llama_cpp.llama_model_free(self.model)

    def tokens(self, text: str) -> list[int]:
        """`text` tokenized with special tokens parsed, as the model would have written it."""
        raw = text.encode()
        out = (llama_cpp.llama_token * (len(raw) + 8))()
        n = int(llama_cpp.llama_tokenize(self.vocab, raw, len(raw), out, len(out), False, True))
        assert n > 0
        return list(out[:n])

    def pieces(self, text: str, added: tuple[str, ...] = ()) -> list[str]:
        """The text of each token, special tokens written out, as the server streams it (a
        character split across tokens comes out with its last byte); `added` are more special
        tokens, each one piece."""
        if added:
            parts = re.split("(" + "|".join(map(re.escape, added)) + ")", text)
            return [
                piece
                for i, part in enumerate(parts)
                if part
                for piece in ([part] if i % 2 else self.pieces(part))
            ]
        decoder = codecs.getincrementaldecoder("utf-8")()
        return [decoder.decode(token_bytes(self.vocab, t)) for t in self.tokens(text)]

    def sampler(self, grammar: str) -> Any:
        return llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether llama.cpp's grammar sampler lets the tokens of `text` through, one by one, and
        then lets the model stop (the grammar is complete)."""
        sampler = self.sampler(grammar)
        assert sampler, grammar
        try:
            for token in self.tokens(text):
                if not self._allowed(sampler, token):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return self._allowed(sampler, llama_cpp.llama_vocab_eos(self.vocab))
        finally:
            llama_cpp.llama_sampler_free(sampler)

    @staticmethod
    def _allowed(sampler: Any, token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
        candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return bool(data[0].logit != -math.inf)


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Vocab]]:
    directory = tmp_path_factory.mktemp("vocab")
    loaded: dict[str, Vocab] = {}
    for name, file in VOCAB_FILES.items():
        path = directory / file.removesuffix(".gz")
        path.write_bytes(gzip.decompress((DATA / file).read_bytes()))
        loaded[name] = Vocab(path)
    yield loaded
    for vocab in loaded.values():
        vocab.close()


def _setup(
    template: str, tools: list[dict[str, Any]] | None, thinking: bool | None
) -> tuple[Format, Turn, str]:
    source = (DATA / template).read_text()
    fmt = for_template(source)
    turn = Turn(tools, thinking)
    prompt = ChatTemplate("gguf", source, (), True).render(
        [{"role": "user", "content": "Hey there!"}],
        bos="<s>",
        eos="</s>",
        tools=tools,
        variables=fmt.template_vars(turn),
    )
    return fmt, turn, prompt


def _stream(
    fmt: Format, turn: Turn, prompt: str, pieces: list[str], split: bool = True
) -> list[dict[str, Any]]:
    splitter = Splitter(fmt, turn, prompt, split)
    return [delta for piece in pieces for delta in splitter.feed(piece)] + splitter.finish()


@dataclass
class Joined:
    reasoning: str = ""
    content: str = ""
    calls: list[dict[str, str]] = field(default_factory=list)  # id, name, arguments

    def plain(self) -> tuple[str, str, list[tuple[str, str]]]:
        return self.reasoning, self.content, [(c["name"], c["arguments"]) for c in self.calls]


def _join(deltas: list[dict[str, Any]], markers: tuple[str, ...]) -> Joined:
    """The deltas as one message, checking each as it comes: text deltas hold no piece of a marker
    that the text does not hold whole; a call's first delta names it with empty arguments, its
    later ones carry only arguments (OpenAI's streaming)."""
    out = Joined()
    texts: list[tuple[str, str]] = []
    for delta in deltas:
        assert len(delta) == 1, delta
        (key, value) = next(iter(delta.items()))
        if key in ("reasoning_content", "content"):
            assert isinstance(value, str) and value, delta
            texts.append((key, value))
            if key == "content":
                out.content += value
            else:
                out.reasoning += value
            continue
        assert key == "tool_calls" and len(value) == 1, delta
        (call,) = value
        if call["index"] == len(out.calls):
            assert set(call) == {"index", "id", "type", "function"} and call["type"] == "function", call
            assert call["function"]["arguments"] == "" and call["function"]["name"], call
            assert call["id"] and call["id"] not in [c["id"] for c in out.calls], call
            out.calls.append({"id": call["id"], "name": call["function"]["name"], "arguments": ""})
        else:
            assert call["index"] == len(out.calls) - 1, call  # only the newest call grows
            assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}, call
            assert call["function"]["arguments"], call
            out.calls[-1]["arguments"] += call["function"]["arguments"]
    for key, value in texts:
        whole = out.content if key == "content" else out.reasoning
        for marker in markers:
            if marker in whole:
                continue
            for n in range(2, len(marker)):  # neither its head nor its tail
                assert marker[:n] not in value and not value.startswith(marker[-n:]), (key, value, marker)
    return out


def _args(calls: list[dict[str, str]]) -> list[tuple[str, Any]]:
    return [(c["name"], json.loads(c["arguments"])) for c in calls]


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{i}-" + re.sub(r"\W+", "-", c.source) for i, c in enumerate(CASES)]
)
def test_whole_and_streamed_answers_match_llama_cpp(case: Case, vocabs: dict[str, Vocab]) -> None:
    fmt, turn, prompt = _setup(case.template, case.tools, case.thinking)
    assert fmt.opened(prompt) is case.opened, prompt[-40:]
    markers = MARKERS[fmt.name]

    whole = _join(_stream(fmt, turn, prompt, [case.output]), markers)
    assert (whole.reasoning, whole.content) == (case.reasoning, case.content)
    assert _args(whole.calls) == [(name, args) for name, args, _ in case.calls]
    for call, (_, _, own) in zip(whole.calls, case.calls, strict=True):
        if own is not None:
            assert call["id"] == own  # the model's own id is kept
        elif fmt.name == "mistral":
            assert re.fullmatch(r"[a-zA-Z0-9]{9}", call["id"]), call  # what Mistral's templates accept
        else:
            assert call["id"].startswith("call_"), call

    splits = {"characters": list(case.output)}
    if case.template in VOCAB:
        tokens = vocabs[VOCAB[case.template]].pieces(case.output, ADDED.get(case.template, ()))
        assert "".join(tokens) == case.output and len(tokens) < len(case.output)
        splits["tokens"] = tokens
    for how, pieces in splits.items():
        streamed = _join(_stream(fmt, turn, prompt, pieces), markers)
        assert streamed.plain() == whole.plain(), how
        for call, (_, _, own) in zip(streamed.calls, case.calls, strict=True):
            assert call["id"] == own if own is not None else len(call["id"]) >= 9


def test_the_token_split_is_the_vocabularys(vocabs: dict[str, Vocab]) -> None:
    qwen = vocabs["qwen"].pieces(f"{XML_CALL}<|im_end|>", ADDED[QWEN35])
    assert qwen[:2] == ["<tool_call>", "\n"] and qwen[-2:] == ["</tool_call>", "<|im_end|>"]
    assert qwen[2:6] == ["<", "function", "=s", "pecial"]  # the XML tags and names are words
    llama = vocabs["llama"].pieces(JSON_CALL)  # Granite: <tool_call> is words to this vocabulary
    assert llama[:4] == ["<", "tool", "_call", ">\n"], llama
    assert vocabs["llama"].pieces("<|eot_id|>") == ["<|eot_id|>"]


# reasoning_format "none": the text goes out as the model wrote it (with what the prompt opened).
# llama.cpp's test for Qwen3.5 ("Qwen3.5-4B.jinja", COMMON_REASONING_FORMAT_NONE) expects exactly
# this content. For gpt-oss llama.cpp also drops the final message's header
# ("<|start|>assistant<|channel|>final<|message|>"); Pendra leaves the harmony text whole.
@pytest.mark.parametrize(
    ("template", "thinking", "output", "content"),
    [
        (
            QWEN35,
            True,
            f"{THOUGHTS}\n</think>\n\n{ASSIST}",
            f"<think>\n{THOUGHTS}\n</think>\n\n{ASSIST}",
        ),
        (
            GPT_OSS,
            None,
            f"<|channel|>analysis<|message|>{THOUGHTS}<|end|><|start|>assistant<|channel|>final<|message|>{ASSIST}",
            f"<|channel|>analysis<|message|>{THOUGHTS}<|end|><|start|>assistant<|channel|>final<|message|>{ASSIST}",
        ),
    ],
)
def test_reasoning_format_none_leaves_the_text_inline(
    template: str, thinking: bool | None, output: str, content: str
) -> None:
    fmt, turn, prompt = _setup(template, None, thinking)
    for pieces in ([output], list(output)):
        deltas = _stream(fmt, turn, prompt, pieces, split=False)
        assert {k for d in deltas for k in d} == {"content"}
        assert "".join(d["content"] for d in deltas) == content


@pytest.mark.parametrize(
    ("template", "output", "content"),
    [
        (QWEN35, f"{THOUGHTS}\n</think>\n\n{XML_CALL}", f"<think>\n{THOUGHTS}\n</think>"),
        (
            GPT_OSS,
            f"<|channel|>analysis<|message|>{THOUGHTS}<|end|><|start|>assistant{HARMONY_CALL}",
            f"<|channel|>analysis<|message|>{THOUGHTS}<|end|>",
        ),
    ],
)
def test_reasoning_format_none_with_tools_still_parses_the_calls(
    template: str, output: str, content: str
) -> None:
    """As llama-server: the reasoning stays in the content, the call is still a call."""
    fmt, turn, prompt = _setup(template, [SPECIAL], None)
    for pieces in ([output], list(output)):
        splitter = Splitter(fmt, turn, prompt, split=False)
        for piece in pieces:
            splitter.feed(piece)
        splitter.finish()
        assert splitter.sent.content == content and not splitter.sent.reasoning
        assert [(c.name, json.loads(c.arguments)) for c in splitter.sent.calls] == [
            ("special_function", {"arg1": 1})
        ]


# Forced calls. Each family's examples, in the form its grammar writes (the template's own form:
# llama.cpp's fixtures for Hermes 2 Pro and DeepSeek-R1 drop the newline before the closing tag,
# which the parser takes and the grammar does not write).
@dataclass(frozen=True)
class Forced:
    template: str
    tools: list[dict[str, Any]]
    one: str  # special_function called
    other: str  # special_function_with_opt called
    wrong: list[str]  # not the family's syntax
    thinking: bool | None = None
    separator: str = ""  # between parallel calls
    parallel: bool = True  # False: the family writes one call a message
    both: str | None = None  # both calls, when not `one`, `separator` and `other` without its reasoning


SPECIAL_BOTH = [SPECIAL, SPECIAL_OPT]
FORCED = {
    "qwen-xml": Forced(
        QWEN35,
        SPECIAL_BOTH,
        XML_CALL,
        XML_OPT,
        [JSON_CALL, XML_CALL.replace("\n</parameter>", "</parameter>"), XML_CALL.replace("1", '"1"')],
        thinking=False,
        separator="\n",
    ),
    "qwen-xml-thinking": Forced(
        QWEN35,
        SPECIAL_BOTH,
        f"{THOUGHTS}\n</think>\n\n{XML_CALL}",
        f"</think>\n\n{XML_OPT}",
        [XML_CALL, f"{THOUGHTS}\n</think>\n\n{ASSIST}"],
        separator="\n",
    ),
    "hermes": Forced(
        QWEN3,
        SPECIAL_BOTH,
        JSON_CALL,
        JSON_OPT,
        [XML_CALL, JSON_CALL.replace('"arguments"', '"parameters"'), JSON_CALL.replace("}\n<", "}<")],
        separator="\n",
    ),
    "hermes-thinking": Forced(
        QWEN3,
        SPECIAL_BOTH,
        f"<think>\n{THOUGHTS}\n</think>\n\n{JSON_CALL}",
        JSON_OPT,
        [f"<think>\n{THOUGHTS}", f"<think>\n{THOUGHTS}\n</think>\n\n{ASSIST}"],
        separator="\n",
    ),
    "granite": Forced(GRANITE, SPECIAL_BOTH, JSON_CALL, JSON_OPT, [XML_CALL], separator="\n"),
    "deepseek-r1": Forced(
        R1,
        SPECIAL_BOTH,
        f"{THOUGHTS}</think>\n\n{R1_CALL_NL}",
        f"</think><｜tool▁calls▁begin｜>{R1_OPT}<｜tool▁calls▁end｜>",
        [R1_CALL_NL, f"</think>{R1_CALL_NL.replace('function', 'func')}"],
        both=f"{THOUGHTS}</think>\n\n{R1_TWO}",
    ),
    "harmony": Forced(
        GPT_OSS,
        SPECIAL_BOTH,
        f"<|channel|>analysis<|message|>{THOUGHTS}<|end|><|start|>assistant{HARMONY_CALL}",
        HARMONY_CALL.replace("special_function", "special_function_with_opt").replace(
            "1}", "1, " + '"arg2": 2}'
        ),
        [
            ' to=functions.special_function<|channel|>commentary<|message|>{"arg1": 1}',
            "<|channel|>final<|message|>x",
        ],
        parallel=False,
    ),
    "mistral": Forced(
        MISTRAL,
        SPECIAL_BOTH,
        '[TOOL_CALLS]special_function[CALL_ID]123456789[ARGS]{"arg1": 1}',
        '[TOOL_CALLS]special_function_with_opt[CALL_ID]a1B2c3D4e[ARGS]{"arg1": 1, "arg2": 2}',
        [
            '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}',  # Small 3.2 writes an id
            '[TOOL_CALLS]special_function[CALL_ID]12345678[ARGS]{"arg1": 1}',  # of 9 characters
            '[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}}]',
        ],
    ),
    "devstral": Forced(
        DEVSTRAL,
        SPECIAL_BOTH,
        '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}',
        '[TOOL_CALLS]special_function_with_opt[ARGS]{"arg1": 1, "arg2": 2}',
        ['[TOOL_CALLS]special_function[CALL_ID]123456789[ARGS]{"arg1": 1}', '{"name": "special_function"}'],
    ),
    "llama3": Forced(
        LLAMA33,
        SPECIAL_BOTH,
        '{"name": "special_function", "parameters": {"arg1": 1}}',
        '{"name": "special_function_with_opt", "parameters": {"arg1": 1, "arg2": 2}}',
        [
            '{"name": "special_function", "arguments": {"arg1": 1}}',
            '{"name": "special_function", "parameters": {}}',
        ],
        separator="; ",
    ),
}


def _calls(fmt: Format, turn: Turn, prompt: str, text: str) -> list[tuple[str, Any]]:
    return _args(_join(_stream(fmt, turn, prompt, [text]), MARKERS[fmt.name]).calls)


@pytest.mark.parametrize("name", list(FORCED))
def test_forced_call_grammars_accept_the_family_calls_only(name: str, vocabs: dict[str, Vocab]) -> None:
    case = FORCED[name]
    fmt, turn, prompt = _setup(case.template, case.tools, case.thinking)
    thinking = fmt.thinking(prompt)
    vocab = vocabs[VOCAB.get(case.template, "qwen")]
    one = ("special_function", ARG1)
    other = ("special_function_with_opt", {"arg1": 1, "arg2": 2})
    # What the grammar lets through is a call once parsed.
    assert _calls(fmt, turn, prompt, case.one) == [one]
    assert _calls(fmt, turn, prompt, case.other) == [other]

    required = fmt.call_grammar(turn, ["special_function", "special_function_with_opt"], False, thinking)
    assert vocab.accepts(required, case.one) and vocab.accepts(required, case.other)
    for wrong in case.wrong:
        assert not vocab.accepts(required, wrong), wrong
    assert not vocab.accepts(required, case.one.replace("special_function", "special_fnction"))
    assert not vocab.accepts(required, case.one + "\nmore")  # nothing after the call

    named = fmt.call_grammar(turn, ["special_function_with_opt"], False, thinking)
    assert vocab.accepts(named, case.other) and not vocab.accepts(named, case.one)

    if case.parallel:
        two = case.both or case.one + case.separator + case.other.split("</think>")[-1].lstrip()
        assert _calls(fmt, turn, prompt, two) == [one, other]
        parallel = fmt.call_grammar(turn, ["special_function", "special_function_with_opt"], True, thinking)
        assert vocab.accepts(parallel, two) and vocab.accepts(parallel, case.one)
        assert not vocab.accepts(required, two)
    else:  # the family writes one call a message: parallel changes nothing
        parallel = fmt.call_grammar(turn, ["special_function", "special_function_with_opt"], True, thinking)
        assert vocab.accepts(parallel, case.one)


def test_a_grammar_llama_cpp_cannot_parse_is_refused(vocabs: dict[str, Vocab]) -> None:
    """The compile check can fail: llama.cpp answers NULL for a grammar it cannot read."""
    assert not vocabs["qwen"].sampler('root ::= "unclosed')
    assert not vocabs["qwen"].sampler("root ::= missing-rule")


# pendra_shared.chat_family on the real templates: (family, capabilities).
FAMILY = {
    QWEN35: ("qwen-xml", ["completion", "tools", "thinking"]),
    QWEN3: ("hermes", ["completion", "tools", "thinking"]),
    QWQ: ("hermes", ["completion", "tools", "thinking"]),
    HERMES: ("hermes", ["completion", "tools"]),
    GRANITE: ("hermes", ["completion", "tools"]),
    R1: ("deepseek-r1", ["completion", "tools", "thinking"]),
    R1_QWEN: ("deepseek-r1", ["completion", "thinking"]),  # its template knows no tools
    GPT_OSS: ("harmony", ["completion", "tools", "thinking"]),
    MISTRAL: ("mistral", ["completion", "tools"]),
    DEVSTRAL: ("mistral", ["completion", "tools"]),
    LLAMA33: ("llama3", ["completion", "tools"]),
    GEMMA2: ("generic", ["completion"]),
}


@pytest.mark.parametrize("template", list(FAMILY))
def test_family_and_capabilities_of_real_templates(template: str) -> None:
    source = (DATA / template).read_text()
    name, caps = FAMILY[template]
    assert family(source) == name and for_template(source).name == name
    assert capabilities(source) == caps
    assert for_template(source).thinks is ("thinking" in caps)  # the parser looks for reasoning
    assert capabilities(source, vision=True) == [*caps, "vision"]
    assert capabilities(source, purpose="embedding") == ["embedding"]
    assert capabilities(source, purpose="rerank") == []
    assert family(source, override="llama3") == "llama3"
    assert family(source, override="nonsense") == name
    assert for_template(source, native=False).name == "generic"  # Pendra's stand-in knows no tools


def test_every_vendored_template_is_covered() -> None:
    assert {p.name for p in DATA.glob("*.jinja")} == set(FAMILY)
    assert family(None) == "generic" and capabilities(None) == ["completion"]


@pytest.mark.parametrize("template", [QWQ, R1_QWEN])
def test_thinking_is_on_unless_asked_off(template: str) -> None:
    """As llama-server, which passes enable_thinking (true unless asked otherwise): llama.cpp's QwQ
    and R1-distill templates close the reasoning when it is not given."""
    for thinking, opened in ((None, True), (True, True), (False, False)):
        fmt, _, prompt = _setup(template, None, thinking)
        assert prompt.endswith("<think>\n" if opened else "</think>") and fmt.opened(prompt) is opened


# Reconstruction, as llama.cpp's test-chat.cpp checks it (`expect_reconstruction`): the parsed
# answer given back as the assistant's turn renders as the prompt followed by exactly what the
# model wrote. For Pendra this is also what lets the next turn reuse the cached tokens (and a
# hybrid model's recurrent state) of this one. Qwen3.5's cases are Pendra's own.
@pytest.mark.parametrize(
    ("template", "tools", "thinking", "output"),
    [
        (MISTRAL, None, None, ASSIST),
        (MISTRAL, [SPECIAL], None, '[TOOL_CALLS]special_function[CALL_ID]123456789[ARGS]{"arg1": 1}'),
        (
            MISTRAL,
            SPECIAL_BOTH,
            None,
            '[TOOL_CALLS]special_function[CALL_ID]000000001[ARGS]{"arg1": 1}'
            '[TOOL_CALLS]special_function_with_opt[CALL_ID]000000002[ARGS]{"arg1": 1, "arg2": 2}',
        ),
        (DEVSTRAL, None, None, ASSIST),
        (DEVSTRAL, [SPECIAL], None, '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}'),
        (DEVSTRAL, [SPECIAL], None, ASSIST + '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}'),
        ("meta-llama-Llama-3.3-70B-Instruct.jinja", [PYTHON], None, ASSIST),
        ("google-gemma-2-2b-it.jinja", None, None, ASSIST),
        (QWEN35, None, True, f"{THOUGHTS}\n</think>\n\n{ASSIST}"),
        (QWEN35, [SPECIAL], False, XML_CALL),
    ],
)
def test_the_parsed_answer_renders_back_as_written(
    template: str, tools: list[dict[str, Any]] | None, thinking: bool | None, output: str
) -> None:
    from pendra_inference.chat import _messages
    from pendra_inference.protocol import ChatCompletionRequest

    fmt, turn, prompt = _setup(template, tools, thinking)
    splitter = Splitter(fmt, turn, prompt)
    splitter.feed(output)
    splitter.finish()
    answer: dict[str, Any] = {"role": "assistant", "content": splitter.sent.content}
    if splitter.sent.reasoning:
        answer["reasoning_content"] = splitter.sent.reasoning
    if splitter.sent.calls:
        answer["tool_calls"] = splitter.calls
    source = (DATA / template).read_text()
    chat = ChatTemplate("gguf", source, (), True)
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Hey there!"}, answer]}
    )
    again = chat.render(
        _messages(request, chat, None),
        bos="<s>",
        eos="</s>",
        tools=tools,
        variables=fmt.template_vars(turn),
        generation_prompt=False,
    )
    assert again.startswith(prompt + output), (prompt + output, again)


def _split(template: str, tools: list[dict[str, Any]], prompt: str, pieces: list[str]) -> Splitter:
    splitter = Splitter(for_template((DATA / template).read_text()), Turn(tools), prompt)
    for piece in pieces:
        splitter.feed(piece)
    splitter.finish()
    return splitter


def _parsed(splitter: Splitter) -> tuple[str, list[tuple[str, str]]]:
    return splitter.sent.content, [(c.name, c.arguments) for c in splitter.sent.calls]


WEATHER = _tool("get_weather", {"city": {"type": "string"}}, ["city"])
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize(
    ("template", "output", "content", "calls"),
    [
        # Text between calls and after them stays content, streamed as whole.
        (
            QWEN3,
            f"Let me check.\n{WEATHER_CALL}\nSome text between\n{WEATHER_CALL}\nAfter",
            "Let me check.\nSome text between\nAfter",
            [("get_weather", '{"city": "Paris"}')] * 2,
        ),
        # A call max_tokens cut stays a call with the arguments it got (as OpenAI's do), its text
        # never also in the content.
        (
            QWEN3,
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
            "",
            [("get_weather", '{"city": "Par')],
        ),
        (
            MISTRAL,
            '[TOOL_CALLS]get_weather[CALL_ID]abcdefghi[ARGS]{"city": "Par',
            "",
            [("get_weather", '{"city": "Par')],
        ),
        (
            QWEN35,
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
            "",
            [("get_weather", '{"city": "Par')],
        ),
        # The bare JSON families too (Gemma 3's generic format, Llama 3): a forced call at temperature 1
        # can repeat itself inside an argument until max_tokens.
        (
            GEMMA2,
            '{"name": "get_weather", "arguments": {"city": "Par',
            "",
            [("get_weather", '{"city": "Par')],
        ),
        (
            GEMMA2,
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
            "",
            [("get_weather", '{"city": "Par')],
        ),
        (
            GEMMA2,
            '{"name": "get_weather", "arguments": {"city": "P"}',
            "",
            [("get_weather", '{"city": "P"}')],
        ),
        (GEMMA2, '{"name": "get_weather", "argu', '{"name": "get_weather", "argu', []),  # nothing said yet
        (
            LLAMA33,
            '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "get_weather", "parameters": {"ci',
            "",
            [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"ci')],
        ),
        # A string argument holding the closing tag does not close the call.
        (
            QWEN3,
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a</tool_call>b"}}\n</tool_call>',
            "",
            [("get_weather", '{"city": "a</tool_call>b"}')],
        ),
        # A block naming a tool that was not offered is text.
        (
            QWEN3,
            '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
            '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
            [],
        ),
    ],
)
def test_streaming_never_takes_back_what_it_sent(
    template: str, output: str, content: str, calls: list[tuple[str, str]]
) -> None:
    prompt = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    whole = _split(template, [WEATHER], prompt, [output])
    streamed = _split(template, [WEATHER], prompt, list(output))
    assert _parsed(whole) == _parsed(streamed) == (content, calls)


def test_a_template_of_the_family_without_tools_gets_json_calls() -> None:
    """Mistral 7B's and Mixtral's templates know no tools: the tools are described in the system
    message and the answer is a JSON call (as before the families), not [TOOL_CALLS]."""
    source = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    fmt = for_template(source)
    assert fmt.name == "generic"
    parsed = fmt.parse(
        '{"name": "get_weather", "arguments": {"city": "Paris"}}', Turn([WEATHER]).schemas(), False, False
    )
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("get_weather", {"city": "Paris"})]


def test_two_tools_with_the_same_definition_name_keep_their_own() -> None:
    def tool(name: str, item: dict[str, Any]) -> dict[str, Any]:
        schema = {"type": "object", "$defs": {"Item": item}, "properties": {"x": {"$ref": "#/$defs/Item"}}}
        return {"type": "function", "function": {"name": name, "parameters": {**schema, "required": ["x"]}}}

    a = tool("a", {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]})
    b = tool("b", {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})
    grammar = for_template((DATA / QWEN3).read_text()).call_grammar(Turn([a, b]), ["a", "b"], True, "off")
    assert '"\\"id\\""' in grammar and '"\\"name\\""' in grammar
    assert b["function"]["parameters"]["properties"]["x"] == {"$ref": "#/$defs/Item"}  # left as given


def test_a_long_call_streamed_in_small_pieces_costs_linear_time() -> None:
    """The text is parsed again as it grows; with tools that happens once a 64th more has come, so
    a 100 kB call (a file written by an agent) stays well under a second of parsing, where parsing
    at every piece took minutes."""
    arguments = json.dumps({"city": "x" * 50_000, "rows": [{"a": i, "b": [i, i]} for i in range(3000)]})
    output = f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'
    started = time.monotonic()
    splitter = _split(QWEN3, [WEATHER], "", [output[i : i + 4] for i in range(0, len(output), 4)])
    assert time.monotonic() - started < 10
    assert json.loads(splitter.sent.calls[0].arguments) == json.loads(arguments)


def test_a_qwen_string_parameter_with_an_enum_is_one_of_its_values(vocabs: dict[str, Vocab]) -> None:
    """XML values are raw text, so a string's `enum` is written into the grammar as its values (a
    free string would let the model write any city)."""
    tool = _tool("get_weather", {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, ["city"])
    fmt = for_template((DATA / QWEN35).read_text())
    grammar = fmt.call_grammar(Turn([tool]), ["get_weather"], False, "off")

    def call(city: str) -> str:
        parameter = f"<parameter=city>\n{city}\n</parameter>\n"
        return f"<tool_call>\n<function=get_weather>\n{parameter}</function>\n</tool_call>"

    assert vocabs["qwen"].accepts(grammar, call("Rome"))
    assert not vocabs["qwen"].accepts(grammar, call("Berlin"))
    assert _calls(fmt, Turn([tool]), "", call("Rome")) == [("get_weather", {"city": "Rome"})]


# What Gemma 3 270M wrote in a CI run for a forced call (`tool_choice: "required"`, temperature 1):
# raw newlines inside the argument string. The converter's JSON grammar let them through, so the
# grammar ended the call, the JSON parser refused it, and the forced call came back as text.
RAW_NEWLINES = (
    '{"name": "get_weather", "arguments": {"city": "Paris (exterior)}}\n\nThe weather in photos of a city\n'
    "'{name: 'labels', *_next_asp_zone_name' radios, *_previous_asp_zone_name'}.\n"
    'You can call these functions. To call one, for example, {" }}'
)


def _weather(city: str) -> str:
    return '{"name": "get_weather", "arguments": {"city": "' + city + '"}}'


def test_a_forced_call_grammar_writes_json_strings_a_json_parser_reads(vocabs: dict[str, Vocab]) -> None:
    """JSON forbids raw control characters in strings: the grammar lets a model write them only
    escaped, so every call it completes parses as a call."""
    fmt = for_template(None)  # the generic format: Gemma 3's
    assert fmt.name == "generic"
    grammar = fmt.call_grammar(Turn([WEATHER]), ["get_weather"], False, "off")
    vocab = vocabs["llama"]
    assert not vocab.accepts(grammar, RAW_NEWLINES)
    assert _calls(fmt, Turn([WEATHER]), "", RAW_NEWLINES) == []  # why it must not: it is no call
    for raw in ("Paris\nFrance", "Paris\tFrance", "Paris\x1fFrance"):
        assert not vocab.accepts(grammar, _weather(raw)), repr(raw)
    escaped = _weather('Paris\\nFrance\\t\\u00e9\\/\\\\ \\" é')
    assert vocab.accepts(grammar, escaped)
    assert _calls(fmt, Turn([WEATHER]), "", escaped) == [("get_weather", {"city": 'Paris\nFrance\té/\\ " é'})]


def test_a_response_format_grammar_writes_json_strings_a_json_parser_reads(vocabs: dict[str, Vocab]) -> None:
    """The same for `response_format: json_schema` (and a string's minLength/maxLength, which the
    converter writes with the same character rule)."""
    from pendra_inference.chat import _schema_grammar

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "code": {"type": "string", "maxLength": 8}},
        "required": ["city", "code"],
    }
    grammar = _schema_grammar(schema, "response_format")
    vocab = vocabs["llama"]
    assert vocab.accepts(grammar, '{"city": "Paris\\nFrance", "code": "a\\tb"}')
    assert not vocab.accepts(grammar, '{"city": "Paris\nFrance", "code": "ab"}')
    assert not vocab.accepts(grammar, '{"city": "Paris", "code": "a\tb"}')
