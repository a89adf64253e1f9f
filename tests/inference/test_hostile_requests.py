"""Hostile requests to /v1/chat/completions and /v1/embeddings get clear 400s (checklist A2-A17,
A19, A20), and a GGUF with a hostile chat template is refused without side effects (B7).

Everything runs against a real `pendra serve` over small real llamas (`tiny_server`); every error
body any test here receives passes `assert_clean_error` (A19): OpenAI's shape, and no traceback,
memory address, file path or key echoed back.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pendra_shared.store import ModelStore

from tests.inference.conftest import TINY, TINY_EMBED, TINY_N_CTX, TINY_SHAPE, TinyStore
from tests.support.openai_schemas import validate
from tests.support.server import ServerProcess

HELLO = [{"role": "user", "content": "Say something."}]
GOOD = json.dumps({"model": TINY, "messages": HELLO, "max_tokens": 1})
API_KEY = "sk-pendra-test-0123456789abcdef"  # sent with every request; never echoed back
_LEAKS = {
    "a traceback": re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+"),
    "a memory address": re.compile(r"0x[0-9a-fA-F]{8,}"),
    "an object repr": re.compile(r"object at "),
    "a file path": re.compile(r"(?:/tmp/|/root/|/home/|/usr/|/var/|/work/|site-packages|\.py\b)"),
}


def assert_clean_error(response: httpx.Response, *, extra_secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """A19: an OpenAI-style error body that gives nothing away. Returns `error`."""
    assert response.status_code >= 400, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text[:200]
    body = response.json()
    validate(body, "ErrorResponse")
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and isinstance(error["code"], str), body
    text = response.text
    for what, pattern in _LEAKS.items():
        assert not pattern.search(text), f"the error body holds {what}: {text[:500]}"
    for secret in (API_KEY, *extra_secrets):
        assert secret not in text, f"the error body echoes {secret!r}"
    return dict(error)


@pytest.fixture(scope="module")
def http(tiny_server: ServerProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=tiny_server.base_url, headers=headers, timeout=60) as client:
        yield client


def post(http: httpx.Client, path: str, body: Any = None, *, raw: bytes | None = None) -> httpx.Response:
    """POST a JSON body (or raw bytes as application/json); error bodies are checked for A19."""
    if raw is None:
        raw = json.dumps(body).encode()
    response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    if response.status_code >= 400:
        assert_clean_error(response)
    return response


def chat(http: httpx.Client, **body: Any) -> httpx.Response:
    return post(http, "/v1/chat/completions", {"model": TINY, "messages": HELLO, "max_tokens": 2, **body})


def expect_400(response: httpx.Response, param_or_text: str, code: str = "invalid_request") -> dict[str, Any]:
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert error["code"] == code, error
    assert param_or_text in (error["message"] + " " + str(error["param"])), error
    return dict(error)


def with_literal(field: str, literal: str) -> bytes:
    """A chat body whose `field` is the JSON text `literal` (which json.dumps would not write)."""
    return GOOD.removesuffix("}").encode() + f', "{field}": {literal}}}'.encode()


def still_serving(http: httpx.Client) -> None:
    assert http.get("/health").json()["status"] == "ok"
    ok = chat(http)
    assert ok.status_code == 200, ok.text


# -- A2: malformed JSON --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b'{"model": "tiny:q8", "messages": [],}',
        GOOD.encode("utf-16"),  # with its BOM
        GOOD.encode("utf-16-le"),
        GOOD.encode("utf-32"),
        b"\xef\xbb\xbf" + GOOD.encode(),  # UTF-8 with a BOM
        b"",
        b"null",
        b"[]",
        b'"text"',
        b"12",
        b"{'model': 'tiny:q8'}",
    ],
    ids=[
        "open",
        "trailing-comma",
        "utf16-bom",
        "utf16le",
        "utf32",
        "utf8-bom",
        "empty",
        "null",
        "list",
        "string",
        "number",
        "single-quotes",
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_malformed_json_is_a_400(http: httpx.Client, path: str, raw: bytes) -> None:
    response = post(http, path, raw=raw)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


# -- A3: deep nesting ------------------------------------------------------------------------------


def _nested_schema(depth: int) -> str:
    """JSON text of a schema nesting `depth` objects deep (arrays of arrays of ... strings); text,
    because json.dumps itself stops at about 1000 levels."""
    return '{"type": "array", "items": ' * (depth - 1) + '{"type": "string"}' + "}" * (depth - 1)


def chat_with(http: httpx.Client, field: str, value_json: str, **body: Any) -> httpx.Response:
    """A chat request whose `field` is the JSON text `value_json`."""
    text = json.dumps({"model": TINY, "messages": HELLO, "max_tokens": 2, **body})
    return post(http, "/v1/chat/completions", raw=f'{text[:-1]}, "{field}": {value_json}}}'.encode())


def _tool_json(name: str, parameters_json: str) -> str:
    return f'[{{"type": "function", "function": {{"name": "{name}", "parameters": {parameters_json}}}}}]'


def _format_json(schema_json: str) -> str:
    return f'{{"type": "json_schema", "json_schema": {{"name": "x", "schema": {schema_json}}}}}'


def test_deep_nesting_is_a_fast_400(http: httpx.Client) -> None:
    started = time.monotonic()
    deep = "[" * 100_000 + "]" * 100_000
    expect_400(chat_with(http, "messages", f'[{{"role": "user", "content": {deep}}}]'), "nests deeper")
    raw = b'{"model": "tiny-embed:q8", "input": ' + b"[" * 100_000 + b"1" + b"]" * 100_000 + b"}"
    expect_400(post(http, "/v1/embeddings", raw=raw), "nests deeper")
    expect_400(chat_with(http, "tools", _tool_json("deep", _nested_schema(33))), "nests deeper than 32")
    expect_400(chat_with(http, "tools", _tool_json("deep", _nested_schema(10_000))), "nests deeper")
    expect_400(chat_with(http, "response_format", _format_json(_nested_schema(33))), "nests deeper than 32")
    expect_400(chat_with(http, "extra", deep), "nests deeper")  # even where nothing reads it
    assert time.monotonic() - started < 2
    # A schema at the depth limit is fine.
    ok = chat_with(http, "response_format", _format_json(_nested_schema(32)))
    assert ok.status_code == 200, ok.text
    ok = chat_with(http, "tools", _tool_json("ok", _nested_schema(32)), tool_choice="none")
    assert ok.status_code == 200, ok.text


# -- A4: NaN, Infinity, 1e309 ---------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e309", "-1e309"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "logit_bias", "presence_penalty"])
def test_non_finite_numbers_are_a_400(http: httpx.Client, field: str, literal: str) -> None:
    value = '{"5": ' + literal + "}" if field == "logit_bias" else literal
    response = post(http, "/v1/chat/completions", raw=with_literal(field, value))
    assert response.status_code == 400, response.text


# -- A5, A6: max_tokens and n ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (0, "invalid_request"),
        (-5, "invalid_request"),
        (10**9, "context_length_exceeded"),
        (2**63, "context_length_exceeded"),
        (2**70, "context_length_exceeded"),
        ("100", "invalid_request"),
        (1.5, "invalid_request"),
        (True, "invalid_request"),
    ],
)
@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_bounds(http: httpx.Client, field: str, value: Any, code: str) -> None:
    response = post(http, "/v1/chat/completions", {"model": TINY, "messages": HELLO, field: value})
    expect_400(response, field if code == "invalid_request" else "maximum context length", code)


@pytest.mark.parametrize(
    ("n", "ok"), [(1, True), (2, True), (128, True), (129, False), (0, False), (-1, False)]
)
def test_n_bounds(http: httpx.Client, n: int, ok: bool) -> None:
    response = chat(http, n=n, max_tokens=1)
    if ok:
        assert response.status_code == 200, response.text
        assert len(response.json()["choices"]) == n
    else:
        expect_400(response, "n")


# -- A7: logit_bias --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["①", "٣", "²", "-1", "99999999", "abc", "", " 5", "5 ", "9" * 5000, "0x10", str(TINY_SHAPE.n_vocab)],
)
def test_logit_bias_keys_are_token_ids(http: httpx.Client, key: str) -> None:
    expect_400(chat(http, logit_bias={key: 5}), "logit_bias")


def test_logit_bias_values_and_size_are_bounded(http: httpx.Client) -> None:
    expect_400(chat(http, logit_bias={"5": 101}), "logit_bias")
    expect_400(chat(http, logit_bias={"5": "1"}), "logit_bias")
    started = time.monotonic()
    expect_400(chat(http, logit_bias={str(i): 1 for i in range(200_000)}), "at most 1024")
    assert time.monotonic() - started < 2
    ok = chat(http, logit_bias={str(i): 1 for i in range(1024)})
    assert ok.status_code == 200, ok.text


# -- A8: stop --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop",
    [["a", "b", "c", "d", "e"], "x" * 1_000_000, "x" * 257, "", [""], [None], [["a"]], 5, {"a": 1}],
    ids=["five", "1mb", "257", "empty", "empty-in-list", "null", "nested", "number", "object"],
)
def test_bad_stop_strings(http: httpx.Client, stop: Any) -> None:
    expect_400(chat(http, stop=stop), "stop")


def test_stop_strings_at_the_limits_are_fine(http: httpx.Client) -> None:
    assert chat(http, stop=["a", "b", "c", "x" * 256]).status_code == 200


# -- A9: text that is not text ---------------------------------------------------------------------


def test_invalid_utf8_and_lone_surrogates_are_a_400(http: httpx.Client) -> None:
    body = GOOD.replace("Say something.", "caf\\u00e9").encode()
    assert post(http, "/v1/chat/completions", raw=body).status_code == 200
    for bad in (b"caf\xe9", b"\xff\xfe\xfd", b"\xc0\xaf", b"\xed\xa0\x80"):  # the last: a UTF-8 surrogate
        raw = GOOD.encode().replace(b"Say something.", bad)
        expect_400(post(http, "/v1/chat/completions", raw=raw), "UTF-8")
    for escape in ("\\ud800", "\\udfff", "a\\ud83d"):
        raw = GOOD.replace("Say something.", escape).encode()
        expect_400(post(http, "/v1/chat/completions", raw=raw), "surrogate")
    raw = json.dumps({"model": TINY_EMBED, "input": ["ok", "\ud800"]}, ensure_ascii=True).encode()
    expect_400(post(http, "/v1/embeddings", raw=raw), "surrogate")


@pytest.mark.parametrize(
    "content",
    [
        "\u0000",
        "a\u0000b",
        "\u202eevil\u202c",
        "zero\u200bwidth\ufeff",
        "\U0001f600",
        "\u0301" * 50,
        "\ufffd",
    ],
    ids=["nul", "inner-nul", "rtl", "zero-width", "emoji", "combining", "replacement"],
)
def test_odd_but_valid_text_is_tokenized(http: httpx.Client, content: str) -> None:
    response = chat(http, messages=[{"role": "user", "content": content}])
    assert response.status_code == 200, response.text
    embedded = post(http, "/v1/embeddings", {"model": TINY_EMBED, "input": content})
    assert embedded.status_code == 200, embedded.text


# -- A10, A11: embeddings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_", "index"),
    [
        ([-1], 0),
        ([TINY_SHAPE.n_vocab], 0),
        ([2**31], 0),
        ([2**64], 0),
        ([1.5], 0),
        ([True], 0),
        ([5, 1.5], 1),
        ([[]], 0),
        ([[1], [-1]], 1),
        ([[1], [1.5]], 1),
        ([[1], "text", [True]], 2),
        (["text", 5], 1),
        (["text", None], 1),
        (["text", {"a": 1}], 1),
        (["ok", ""], 1),
    ],
)
def test_embedding_inputs_name_the_bad_item(http: httpx.Client, input_: Any, index: int) -> None:
    error = expect_400(
        post(http, "/v1/embeddings", {"model": TINY_EMBED, "input": input_}), f"input[{index}]"
    )
    assert error["param"] == f"input[{index}]"


def test_embedding_batch_and_length_limits(http: httpx.Client) -> None:
    expect_400(post(http, "/v1/embeddings", {"model": TINY_EMBED, "input": ["a"] * 2049}), "at most 2048")
    expect_400(post(http, "/v1/embeddings", {"model": TINY_EMBED, "input": []}), "empty")
    big = "word " * 200_000  # 1 MB
    error = expect_400(
        post(http, "/v1/embeddings", {"model": TINY_EMBED, "input": big, "truncate": False}),
        "input[0]",
        "context_length_exceeded",
    )
    assert error["param"] == "input[0]"
    # (The tiny vocabulary, bytes only, tokenizes in quadratic time: a smaller text to cut.)
    cut = post(http, "/v1/embeddings", {"model": TINY_EMBED, "input": big[:20_000], "truncate": True})
    assert cut.status_code == 200 and len(cut.json()["data"]) == 1
    expect_400(
        post(http, "/v1/embeddings", {"model": TINY_EMBED, "input": "x", "dimensions": 0}), "dimensions"
    )
    expect_400(
        post(http, "/v1/embeddings", {"model": TINY_EMBED, "input": "x", "dimensions": "8"}), "dimensions"
    )


# -- A12: the context's very end -------------------------------------------------------------------


def _prompt_tokens(http: httpx.Client, content: str) -> int:
    response = chat(http, messages=[{"role": "user", "content": content}], max_tokens=1)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens"])


def test_prompt_and_completion_up_to_the_context_end(http: httpx.Client) -> None:
    base = _prompt_tokens(http, "x")
    assert _prompt_tokens(http, "x" * 11) == base + 10  # one token per "x" with this vocabulary
    # prompt + max_tokens == n_ctx, generated to the end: "length", no abort.
    room = TINY_N_CTX - base
    full = chat(
        http,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=room,
        temperature=0,
        logit_bias={"2": -100},
    )  # no end-of-sequence token: it runs to the limit
    assert full.status_code == 200, full.text
    result = full.json()
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == room
    assert result["usage"]["total_tokens"] == TINY_N_CTX
    expect_400(
        chat(http, messages=[{"role": "user", "content": "x"}], max_tokens=room + 1),
        "maximum context length",
        "context_length_exceeded",
    )
    # A prompt of n_ctx - 1 tokens still gets its one token; one of exactly n_ctx has no room.
    edge = "x" * (TINY_N_CTX - base)
    last = chat(http, messages=[{"role": "user", "content": edge}], max_tokens=1, logit_bias={"2": -100})
    assert last.status_code == 200 and last.json()["choices"][0]["finish_reason"] == "length", last.text
    expect_400(
        chat(http, messages=[{"role": "user", "content": edge + "x"}]),
        "the messages use",
        "context_length_exceeded",
    )
    # Streamed to the end too.
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": TINY,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": room,
            "stream": True,
            "logit_bias": {"2": -100},
        },
    ) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines[:-1]]
    assert finishes[-1] == "length"
    still_serving(http)


# -- A13: response_format schemas that would blow up ---------------------------------------------


def _fmt(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize(
    ("schema", "text"),
    [
        ({"$ref": "#"}, "unsupported"),
        (
            {
                "definitions": {"a": {"$ref": "#/definitions/b"}, "b": {"$ref": "#/definitions/a"}},
                "$ref": "#/definitions/a",
            },
            "response_format",
        ),
        ("10k-deep", "nests deeper"),
        ({"enum": list(range(100_000))}, "bytes as compact JSON"),
        ({"type": "string", "pattern": "(a+)+b"}, "unsupported"),
        ({"type": "string", "pattern": "(a{1,1000}){1,1000}"}, "response_format"),
        ({"type": "string", "pattern": "^a{1,100000}$"}, "repetitions"),  # 100 000 nested groups: a segfault
        ({"type": "string", "pattern": "^a{1,5000}$"}, "nested more than"),
        ({"type": "string", "pattern": "^a{1,99999999999999999999}$"}, "repetitions"),
        ({"type": "string", "maxLength": 10**9}, "repetitions"),
        ({"type": "array", "items": {"type": "string"}, "minItems": 10**6}, "repetitions"),
        ({"type": "object", "properties": {f"p{i}": {} for i in range(300)}}, "at most 256"),
        ({"anyOf": [{"const": f"value-{i}"} for i in range(40_000)]}, "response_format"),
        ({"type": "string", "minLength": 60_000}, "characters; at most"),
    ],
    ids=[
        "ref-root",
        "ref-cycle",
        "10k-deep",
        "100k-enum",
        "pattern-redos",
        "pattern-nested-counts",
        "pattern-100k",
        "pattern-5k",
        "pattern-huge",
        "maxlength-1e9",
        "minitems-1e6",
        "300-properties",
        "40k-alternatives",
        "grammar-300k",
    ],
)
def test_hostile_schemas_are_a_fast_400(http: httpx.Client, schema: Any, text: str) -> None:
    schema_json = _nested_schema(10_000) if schema == "10k-deep" else json.dumps(schema)
    started = time.monotonic()
    expect_400(chat_with(http, "response_format", _format_json(schema_json)), text)
    assert time.monotonic() - started < 2
    started = time.monotonic()
    tools = chat_with(http, "tools", _tool_json("f", schema_json), tool_choice="required")
    expect_400(tools, "nests deeper" if schema == "10k-deep" else "tools")
    assert time.monotonic() - started < 2


def test_ambiguous_patterns_compile_and_generate_in_bounded_time(http: httpx.Client) -> None:
    """Patterns that are catastrophic for a backtracking matcher are plain for llama.cpp's grammar."""
    for pattern in ("^(a+)+b$", "^(a{1,10}){1,10}$", "^(a|a)*b$"):
        started = time.monotonic()
        response = chat(
            http,
            response_format=_fmt({"type": "string", "pattern": pattern}),
            max_tokens=24,
            logit_bias={str(3 + ord("a")): 20},
        )
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 5
    still_serving(http)


# -- A14: tools ------------------------------------------------------------------------------------


def _tool(name: str = "get_weather", parameters: Any = None) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": name}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"tools": [_tool(f"t{i}") for i in range(1000)]}, "at most 128"),
        ({"tools": [_tool(f"t{i}") for i in range(129)]}, "at most 128"),
        ({"tools": [_tool("a" * 65)]}, "name"),
        ({"tools": [_tool("")]}, "name"),
        ({"tools": [_tool("bad name!")]}, "name"),
        ({"tools": [_tool("ｇｅｔ")]}, "name"),
        ({"tools": [_tool(parameters=[])]}, "parameters"),
        ({"tools": [_tool(parameters="object")]}, "parameters"),
        ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "type"),
        ({"tools": [_tool()], "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "launch"),
        ({"tools": [_tool()], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [_tool()], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": "x"}]}, *HELLO]}, "tool_calls"),
    ],
    ids=[
        "1000",
        "129",
        "name-65",
        "name-empty",
        "name-space",
        "name-fullwidth",
        "params-list",
        "params-str",
        "type",
        "unknown-choice",
        "choice-no-name",
        "choice-word",
        "required-no-tools",
        "bad-tool-call",
    ],
)
def test_bad_tools_are_a_400(http: httpx.Client, body: dict[str, Any], text: str) -> None:
    expect_400(chat(http, **body), text)


def test_tools_at_the_limits_are_fine(http: httpx.Client) -> None:
    tools = [_tool(f"t{i}", {"type": "object", "properties": {"a": {"type": "string"}}}) for i in range(128)]
    tools[0] = _tool("a" * 64)
    # (tool_choice none: 128 tools described in the prompt would not fit the tiny context)
    response = chat(http, tools=tools, tool_choice="none")
    assert response.status_code == 200, response.text


def test_tool_call_parsing_of_hostile_model_output_is_linear() -> None:
    """A model can be talked into printing `<tool_call>` and then thousands of spaces, or `[`s:
    parsing its output must not backtrack (the old pattern took 59 s for 5000 spaces), whole or
    streamed piece by piece (each piece parses the text so far again)."""
    from pendra_inference.formats import Splitter, Turn, for_template

    tools = [{"type": "function", "function": {"name": "f"}}]
    hermes, generic = for_template("<tool_call>"), for_template("", native=False)
    for text in ("<tool_call>" + " " * 100_000, "<tool_call>" + "\n" * 100_000 + "x", "[" * 100_000):
        for fmt in (hermes, generic):
            started = time.monotonic()
            assert fmt.parse(text, Turn(tools).schemas(), False, partial=False).calls == []
            assert time.monotonic() - started < 0.5
    streamed = Splitter(hermes, Turn(tools), "")
    started = time.monotonic()
    for piece in ["<tool_call>", '{"name": "f", "arguments": '] + ["["] * 5000 + [" "] * 5000:
        streamed.feed(piece)
    streamed.finish()
    assert streamed.calls == [] and time.monotonic() - started < 5
    deep = '{"name": "f", "arguments": ' + "[" * 100 + "]" * 100 + "}"
    assert generic.parse(deep, Turn(tools).schemas(), False, partial=False).calls == []  # nested past 64
    (call,) = hermes.parse(
        '<tool_call> {"name": "f", "arguments": {"a": 1}} </tool_call>', Turn(tools).schemas(), False, False
    ).calls
    assert call.name == "f" and json.loads(call.arguments) == {"a": 1}


# -- A15: unknown fields are ignored, and reach nothing -------------------------------------------


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    plain = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "seed": 7}
    extras = {
        "n_discard": -1,
        "n_probs": 1e9,
        "mirostat": 99,
        "mirostat_tau": -5,
        "grammar": "root ::= ",
        "n_keep": -1,
        "logits_all": True,
        "samplers": ["evil"],
        "penalty_last_n": 2**62,
        "__class__": {"x": 1},
    }
    expected = chat(http, **plain)
    assert expected.status_code == 200, expected.text
    got = chat(http, **plain, **extras)
    assert got.status_code == 200, got.text
    # The same tokens: none of them changed sampling (an empty grammar would fail to compile).
    assert got.json()["choices"][0]["message"] == expected.json()["choices"][0]["message"]
    embedded = post(
        http, "/v1/embeddings", {"model": TINY_EMBED, "input": "x", "pooling": "evil", "n_ubatch": -1}
    )
    assert embedded.status_code == 200, embedded.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", -5),
        ("top_k", 2**31),
        ("top_k", 1.5),
        ("min_p", 2),
        ("seed", 2**64),
        ("seed", "7"),
        ("top_logprobs", 21),
        ("cache_prompt", "maybe"),
    ],
)
def test_pendra_extensions_are_bounded(http: httpx.Client, field: str, value: Any) -> None:
    expect_400(chat(http, **{field: value}), field)


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**64 - 1, 0])
def test_any_openai_seed_works(http: httpx.Client, seed: int) -> None:
    assert chat(http, seed=seed).status_code == 200


# -- A16: messages ---------------------------------------------------------------------------------


def test_message_count_and_roles(http: httpx.Client) -> None:
    one = {"role": "user", "content": "x"}
    raw = json.dumps({"model": TINY, "messages": [one] * 100_000}).encode()
    started = time.monotonic()
    expect_400(post(http, "/v1/chat/completions", raw=raw), "at most 4096")
    assert time.monotonic() - started < 2
    expect_400(chat(http, messages=[one] * 4097), "at most 4096")
    expect_400(chat(http, messages=[{"role": "wizard", "content": "x"}]), "role")
    expect_400(chat(http, messages=[{"role": "user", "content": 5}]), "content")
    expect_400(chat(http, messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), "content")
    expect_400(chat(http, messages=[]), "messages")
    expect_400(chat(http, messages={"role": "user"}), "messages")


class _Listener:
    """A TCP listener that records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_image_urls_are_refused_without_a_connection(http: httpx.Client) -> None:
    listener = _Listener()
    try:
        for url in (
            f"http://127.0.0.1:{listener.port}/cat.png",
            "http://169.254.169.254/latest/meta-data/",
            "file:///etc/passwd",
            f"http://localhost:{listener.port}/x",
        ):
            part = {"type": "image_url", "image_url": {"url": url}}
            for content in ([part], [{"type": "text", "text": "look"}, part]):
                answer = chat(http, messages=[{"role": "user", "content": content}])
                expect_400(answer, "does not read images", "model_not_multimodal")
            audio = {"type": "input_audio", "input_audio": {"data": url, "format": "wav"}}
            expect_400(
                chat(http, messages=[{"role": "user", "content": [audio]}]), "only text and image_url parts"
            )
        time.sleep(0.3)
        assert listener.connections == 0
    finally:
        listener.close()


# -- A17: model names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "../tiny",
        "a:b:c",
        "x" * 10_240,
        "%00",
        "tiny:q8\u0000",
        "ｔｉｎｙ:q8",
        "/etc/passwd",
        "tiny:q8/../../escaped-the-sandbox",
        "..",
        "",
        "TINY:Q8",
        "tiny:q8 ",
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_odd_model_names_are_not_found(
    http: httpx.Client, tiny_store: TinyStore, path: str, name: str
) -> None:
    body = {"model": name, "messages": HELLO} if "chat" in path else {"model": name, "input": "x"}
    response = post(http, path, body)
    assert response.status_code in (400, 404), response.text


def tiny_store_models(tiny_store: TinyStore) -> list[Any]:
    return ModelStore(tiny_store.root).scan().valid


def test_a_gguf_outside_the_store_is_never_served(http: httpx.Client, tiny_store: TinyStore) -> None:
    outside = tiny_store.root.parent / "tiny.gguf"  # the file the store's copies were made from
    assert outside.is_file()
    for name in ("../tiny", "../tiny.gguf", "tiny.gguf", "../../" + outside.parent.name + "/tiny"):
        response = chat(http, model=name)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"
    # "tiny" alone is the family name of the store's own tiny:q8: served, from the store.
    assert chat(http, model="tiny").json()["model"] == "tiny"
    assert [m.name for m in tiny_store_models(tiny_store) if m.name.partition(":")[0] == "tiny"] == [
        "tiny:q8"
    ]


# -- A20: keep_alive -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("forever", False),
        ("5m", True),
        (-1, True),
        ("-1", True),
        (10**12, True),
        (0.5, True),
        (10**400, False),
        ("9" * 5000 + "s", False),
        ("1e400s", False),
        (True, False),
        ([1], False),
    ],
)
def test_keep_alive(http: httpx.Client, value: Any, ok: bool) -> None:
    response = chat(http, keep_alive=value)
    if ok:
        assert response.status_code == 200, response.text
    else:
        expect_400(response, "keep_alive")


@pytest.mark.parametrize("literal", ["1e309", "NaN", "-Infinity"])
def test_keep_alive_non_finite(http: httpx.Client, literal: str) -> None:
    assert post(http, "/v1/chat/completions", raw=with_literal("keep_alive", literal)).status_code == 400


# -- B7: GGUFs with hostile chat templates, end to end ---------------------------------------------


@pytest.mark.parametrize("model", ["ssti-lipsum:1", "ssti-cycler:1"])
def test_ssti_templates_fail_without_side_effects(
    http: httpx.Client, tiny_store: TinyStore, model: str
) -> None:
    for stream in (False, True):
        response = chat(http, model=model, stream=stream)
        expect_400(response, "chat template")
    assert not tiny_store.marker.exists()
    still_serving(http)


@pytest.mark.parametrize("model", ["bomb-mul:1", "bomb-pow:1", "bomb-loops:1", "bomb-output:1"])
def test_template_bombs_fail_fast_while_others_are_served(http: httpx.Client, model: str) -> None:
    def bomb() -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = chat(http, model=model)
        return response, time.monotonic() - started

    # The first request loads the model (probing it in a child process first, which takes long).
    first = http.post("/v1/chat/completions", json={"model": model, "messages": HELLO}, timeout=300)
    assert_clean_error(first)
    expect_400(first, "the model's chat template")
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(bomb)
        time.sleep(0.1)
        normal = chat(http, max_tokens=4)  # while the bomb renders
        response, elapsed = running.result()
    assert normal.status_code == 200, normal.text
    error = expect_400(response, "the model's chat template")
    assert "exceeded" in error["message"] or "longer than" in error["message"]
    assert elapsed <= 2.0, elapsed
    still_serving(http)
