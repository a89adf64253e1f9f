"""Fuzzed chat and embedding requests against a real `pendra serve` over the tiny llama.

Bodies are OpenAI-shaped with hostile leaves (huge, negative and non-finite numbers, odd strings,
wrong types, unknown fields). Property: the answer is a 200, or a 4xx with an OpenAI-style error
body that gives nothing away (`assert_clean_error`); never a 500, never a body that is not JSON,
and a stream is well-formed server-sent events ending in [DONE].
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.inference.conftest import TINY, TINY_EMBED
from tests.inference.test_hostile_requests import assert_clean_error
from tests.support.server import ServerProcess

FUZZ = settings(
    max_examples=120,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

ODD_TEXT = st.sampled_from(
    [
        "",
        "\x00",
        "\ud800",
        "\udfff",
        "\u202e",
        "\u200b\ufeff",
        "①",
        "٣",
        "²",
        "-1",
        "1e309",
        "NaN",
        "../x",
        "%00",
        "a:b:c",
        "ｇｅｍｍａ",
        "x" * 300,
        "<tool_call>",
        "{{ 7 * 7 }}",
        "\U0001f600",
    ]
)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), ODD_TEXT)
LEAVES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


# Hypothesis favours the ends of a range: the rare choice sits in the middle.
_ODDS = st.sampled_from([False] * 6 + [True] + [False] * 6)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a sensible value, now and then anything."""
    return _ODDS.flatmap(lambda odd: LEAVES if odd else strategy)


@st.composite
def with_one_fault(draw: st.DrawFn, sensible: st.SearchStrategy[dict[str, Any]], fields: list[str]) -> Any:
    """Half the time a sensible body, else one with one field set to anything (or dropped)."""
    body = dict(draw(sensible))
    if draw(st.sampled_from([False, True, True, False])):
        field = draw(st.sampled_from(fields))
        if draw(st.integers(0, 5)) == 0:
            body.pop(field, None)
        else:
            body[field] = draw(LEAVES)
    return body


CONTENT = st.one_of(
    st.text(max_size=40),
    st.text(max_size=40),
    ODD_TEXT,
    st.lists(
        st.fixed_dictionaries({"type": maybe(st.just("text")), "text": maybe(st.text(max_size=20))}),
        min_size=1,
        max_size=2,
    ),
    st.just([{"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}]),
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": maybe(
            st.sampled_from(["system", "developer", "user", "user", "assistant", "tool", "wizard"])
        ),
        "content": CONTENT,
    },
    optional={"name": maybe(st.text(max_size=8)), "tool_call_id": maybe(st.text(max_size=8))},
)
PARAMETERS = {"type": "object", "properties": {"a": {"type": "string"}}}
TOOL = st.fixed_dictionaries(
    {
        "type": maybe(st.just("function")),
        "function": st.fixed_dictionaries(
            {"name": maybe(st.from_regex(r"[a-z_]{1,8}", fullmatch=True))},
            optional={"parameters": maybe(st.just(PARAMETERS)), "description": maybe(st.text(max_size=20))},
        ),
    },
)
SCHEMA = st.one_of(
    st.just({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    st.fixed_dictionaries(
        {
            "type": st.just("string"),
            "pattern": st.sampled_from(["^a+$", "(a+)+b", "^a{1,99999}$", "^[0-9]{3}$"]),
        }
    ),
    st.fixed_dictionaries({"type": st.just("string"), "maxLength": NUMBERS}),
    st.fixed_dictionaries({"enum": st.lists(SCALARS, min_size=1, max_size=4)}),
    LEAVES,
)
CHAT_OPTIONAL = {
    "temperature": maybe(st.floats(0, 2)),
    "top_p": maybe(st.floats(0, 1)),
    "n": maybe(st.integers(1, 3)),
    "stop": maybe(
        st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=4))
    ),
    "logit_bias": maybe(st.dictionaries(st.integers(0, 1999).map(str), st.floats(-100, 100), max_size=3)),
    "seed": maybe(st.integers(-(2**63), 2**64 - 1)),
    "stream": maybe(st.booleans()),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "tools": maybe(st.lists(TOOL, max_size=2)),
    "tool_choice": maybe(st.sampled_from(["none", "auto"])),
    "response_format": maybe(
        st.one_of(
            st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
            st.fixed_dictionaries(
                {
                    "type": st.just("json_schema"),
                    "json_schema": st.fixed_dictionaries({"name": st.just("x"), "schema": SCHEMA}),
                }
            ),
        )
    ),
    "logprobs": maybe(st.booleans()),
    "presence_penalty": maybe(st.floats(-2, 2)),
    "frequency_penalty": maybe(st.floats(-2, 2)),
    "top_k": maybe(st.integers(0, 50)),
    "min_p": maybe(st.floats(0, 1)),
    "keep_alive": maybe(st.sampled_from(["5m", -1, 0.5, "1h"])),
    "user": maybe(st.text(max_size=8)),
    # unknown fields: ignored
    "n_discard": LEAVES,
    "grammar": LEAVES,
    "mirostat": LEAVES,
}
CHAT_SENSIBLE = st.fixed_dictionaries(
    {
        "model": maybe(st.sampled_from([TINY, TINY, TINY, TINY, "nope:1", TINY_EMBED])),
        "messages": st.lists(MESSAGE, min_size=1, max_size=3),
        # A few tokens: the property is about validation, not generation.
        "max_tokens": st.integers(1, 3),
    },
    optional=CHAT_OPTIONAL,
)
CHAT_BODY = with_one_fault(CHAT_SENSIBLE, ["model", "messages", "max_tokens", *CHAT_OPTIONAL])
TOKEN_IDS = st.lists(maybe(st.integers(0, 1999)), min_size=1, max_size=4)
EMBEDDING_OPTIONAL = {
    "encoding_format": maybe(st.sampled_from(["float", "base64"])),
    "dimensions": maybe(st.integers(1, 256)),
    "truncate": maybe(st.booleans()),
    "keep_alive": maybe(st.sampled_from(["5m", -1])),
    "pooling": LEAVES,
}
EMBEDDING_SENSIBLE = st.fixed_dictionaries(
    {
        "model": maybe(st.sampled_from([TINY_EMBED, TINY_EMBED, TINY_EMBED, "nope:1", TINY])),
        "input": st.one_of(
            st.text(min_size=1, max_size=30),
            ODD_TEXT,
            st.lists(st.one_of(st.text(min_size=1, max_size=10), ODD_TEXT), min_size=1, max_size=3),
            TOKEN_IDS,
            st.lists(TOKEN_IDS, min_size=1, max_size=3),
        ),
    },
    optional=EMBEDDING_OPTIONAL,
)
EMBEDDING_BODY = with_one_fault(EMBEDDING_SENSIBLE, ["model", "input", *EMBEDDING_OPTIONAL])


@pytest.fixture(scope="module")
def http(tiny_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.base_url, timeout=120) as client:
        yield client


def check(response: httpx.Response) -> None:
    """200 with a well-formed body, or a clean 4xx error: never a 5xx."""
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500, response.text[:1000]
    if response.status_code >= 400:
        assert_clean_error(response)
        return
    assert response.status_code == 200, response.text[:1000]
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.splitlines() if line]
        assert events and events[-1] == "data: [DONE]", events[-3:]
        for line in events[:-1]:
            assert line.startswith("data: "), line
            payload = json.loads(line[6:])
            assert "error" not in payload or set(payload["error"]) >= {"message", "type", "code"}, payload
    else:
        assert isinstance(response.json(), dict)


def send(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    # allow_nan: NaN and Infinity go out as the bare words a lenient parser would take.
    raw = json.dumps(body, allow_nan=True).encode()
    return http.post(path, content=raw, headers={"Content-Type": "application/json"})


@FUZZ
@given(body=CHAT_BODY)
def test_fuzzed_chat_requests(http: httpx.Client, body: dict[str, Any]) -> None:
    check(send(http, "/v1/chat/completions", body))


@FUZZ
@given(body=EMBEDDING_BODY)
def test_fuzzed_embedding_requests(http: httpx.Client, body: dict[str, Any]) -> None:
    check(send(http, "/v1/embeddings", body))


@FUZZ
@given(body=LEAVES)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_any_json_at_all(http: httpx.Client, path: str, body: Any) -> None:
    check(send(http, path, body))
