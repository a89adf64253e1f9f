"""Each family's own format through a real `pendra serve` and the `openai` client: tiny
random-weight Qwen3.5 files (the real Qwen tokenizer) carrying the real chat template of each
family (Qwen3.5's XML calls and forced-open thinking, Qwen3's Hermes JSON, gpt-oss's harmony,
Mistral Small 3.2's [TOOL_CALLS], Llama 3.3's bare JSON). Random weights say nothing useful, so
the tests check what does not depend on the words: a forced call comes out in the family's own
syntax and is parsed into OpenAI's fields, streamed and whole alike; thinking lands in
`reasoning_content`, or in the content when asked; history with reasoning and calls renders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from pendra_inference.gguf_hybrid import QWEN35_TINY, write_hybrid_gguf
from pendra_inference.gguf_vocab import tokenizer_files
from pendra_shared.store import ModelStore

from tests.support.hybrids import LLAMA_CPP_DATA
from tests.support.openai_schemas import validate
from tests.support.server import ServerProcess, start_server

# model name: (template file, the text its raw forced call starts with)
FAMILIES = {
    "qwen-xml:tiny": ("Qwen3.5-4B.jinja", "<tool_call>\n<function=set_level>\n<parameter="),
    "hermes:tiny": ("Qwen-Qwen3-0.6B.jinja", '<tool_call>\n{"name": "set_level", "arguments": {'),
    "harmony:tiny": ("openai-gpt-oss-120b.jinja", "<|channel|>commentary to=functions.set_level"),
    "mistral:tiny": ("Mistral-Small-3.2-24B-Instruct-2506.jinja", "[TOOL_CALLS]set_level[CALL_ID]"),
    "llama3:tiny": ("meta-llama-Llama-3.3-70B-Instruct.jinja", '{"name": "set_level", "parameters": {'),
}
THINKING = "qwen-xml:tiny"
SET_LEVEL = {
    "type": "function",
    "function": {
        "name": "set_level",
        "description": "Set the level.",
        "parameters": {
            "type": "object",
            "properties": {"level": {"type": "integer"}, "loud": {"type": "boolean"}},
            "required": ["level", "loud"],
        },
    },
}
MUTE = {
    "type": "function",
    "function": {
        "name": "mute",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
ASK = [{"role": "user", "content": "Set the level to three."}]
# The tokens that end generation in llama.cpp's Qwen test vocabulary (<|endoftext|>, <|im_end|>
# and one more it marks so), made impossible.
NEVER_END = {"128247": -100, "151643": -100, "151645": -100}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("formats")
    store = ModelStore(base / "models")
    vocab, _ = tokenizer_files("qwen35", LLAMA_CPP_DATA)
    for name, (template, _) in FAMILIES.items():
        path = write_hybrid_gguf(
            base / f"{name.split(':')[0]}.gguf",
            "qwen35",
            QWEN35_TINY,
            vocab=vocab,
            chat_template=(LLAMA_CPP_DATA / template).read_text(),
            name=name,
        )
        store.import_file(path, name=name, purpose="chat")
    env = {
        "PENDRA_MODELS_DIR": str(base / "models"),
        "PENDRA_N_CTX": "2048",
        "PENDRA_PARALLEL": "2",
        "PENDRA_KEEP_ALIVE": "-1",
        "PENDRA_MAX_LOADED_MODELS": str(len(FAMILIES)),
        "HOME": str(base),
    }
    proc = start_server(env, base / "serve.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[dict[str, Any], str | None]:
    """A streamed answer gathered the way OpenAI's clients do (calls assembled by index)."""
    message: dict[str, Any] = {"content": "", "reasoning_content": "", "calls": {}}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            message["content"] += delta.get("content") or ""
            message["reasoning_content"] += delta.get("reasoning_content") or ""
            for piece in choice.delta.tool_calls or []:
                call = message["calls"].setdefault(piece.index, {"id": piece.id, "name": "", "arguments": ""})
                assert (piece.id is None) == (call["id"] != piece.id or bool(call["name"]))
                call["name"] += piece.function.name or "" if piece.function else ""
                call["arguments"] += (piece.function.arguments or "") if piece.function else ""
            finish = choice.finish_reason or finish
    return message, finish


@pytest.mark.parametrize("model", list(FAMILIES))
def test_a_forced_call_is_written_in_the_family_format_and_parsed(client: openai.OpenAI, model: str) -> None:
    request: dict[str, Any] = {"model": model, "messages": ASK, "tools": [SET_LEVEL], "max_tokens": 80}
    request |= {
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "extra_body": NO_THINKING,
    }
    whole = client.chat.completions.create(**request, logprobs=True)
    raw = "".join(t.token for t in whole.choices[0].logprobs.content)  # the text as generated
    assert raw.startswith(FAMILIES[model][1]), raw
    validate(whole.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    (choice,) = whole.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "set_level" and call.type == "function"
    assert isinstance(arguments["level"], int) and isinstance(arguments["loud"], bool)
    if model == "mistral:tiny":
        assert len(call.id) == 9 and call.id.isalnum()  # what Mistral's template accepts back

    streamed, finish = _streamed(client, **request)
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"].values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls
    ]

    # The client gives back what it got: reasoning, the call (arguments a JSON string, which the
    # templates need as an object), the tool's answer; the template renders it all.
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Level three.",
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "name": "set_level", "content": "level is 3"},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "Thanks. Now mute it."},
    ]
    again = client.chat.completions.create(
        model=model, messages=history, tools=[SET_LEVEL, MUTE], max_tokens=2
    )
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("model", ["qwen-xml:tiny", "mistral:tiny"])
def test_required_calls_may_come_in_parallel(client: openai.OpenAI, model: str) -> None:
    """Kept from ending, the model calls again and again until max_tokens: every whole call is
    parsed, the cut one is not taken for a call, and the answer says it was cut."""
    answer = client.chat.completions.create(
        model=model, messages=ASK, tools=[MUTE], tool_choice="required", max_tokens=160,
        temperature=0, extra_body=NO_THINKING, logit_bias=NEVER_END,
    )  # fmt: skip
    calls = answer.choices[0].message.tool_calls or []
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert call.function.name in ("set_level", "mute") and isinstance(
            json.loads(call.function.arguments), dict
        )
    assert answer.choices[0].finish_reason == "length"


@pytest.mark.parametrize("model", ["qwen-xml:tiny", "harmony:tiny"])
def test_a_named_tool_without_parallel_calls_is_called_once(client: openai.OpenAI, model: str) -> None:
    answer = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[MUTE, SET_LEVEL],
        tool_choice={"type": "function", "function": {"name": "set_level"}},
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
        extra_body=NO_THINKING,
    )
    assert [c.function.name for c in answer.choices[0].message.tool_calls or []] == ["set_level"]


def test_thinking_goes_to_reasoning_content_unless_asked_inline_or_off(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {"model": THINKING, "messages": ASK, "max_tokens": 24, "temperature": 0}
    inline = client.chat.completions.create(**request, extra_body={"reasoning_format": "none"})
    raw = inline.choices[0].message.content
    assert raw.startswith("<think>\n")  # what the prompt opened, then what the model wrote
    thought, _, after = raw.removeprefix("<think>\n").partition("</think>")

    split = client.chat.completions.create(**request)
    validate(split.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    message = split.choices[0].message.model_dump()
    assert message["reasoning_content"] == thought.strip()
    assert (message["content"] or "") == after.lstrip()
    assert 0 < split.usage.completion_tokens_details.reasoning_tokens <= split.usage.completion_tokens
    streamed, _ = _streamed(client, **request)
    assert streamed["reasoning_content"] == thought.strip() and streamed["content"] == after.lstrip()

    for off in (NO_THINKING, {"reasoning_effort": "none"}):
        plain = client.chat.completions.create(**request, extra_body=off)
        assert "reasoning_content" not in plain.choices[0].message.model_dump(exclude_unset=True)
        assert plain.usage.completion_tokens_details.reasoning_tokens == 0
