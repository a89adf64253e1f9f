"""Embeddings through the official `openai` client against a real `pendra serve`."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from tests.inference.conftest import CHAT, GEMMA_EMBED
from tests.support.openai_schemas import validate
from tests.support.server import ServerProcess

CAT, KITTEN, STOCKS = (
    "A cat sits on the mat.",
    "A kitten is resting on a rug.",
    "The stock market fell sharply today.",
)


def vectors(client: openai.OpenAI, model: str, inputs: list[str], **kw: object) -> np.ndarray:
    result = client.embeddings.create(model=model, input=inputs, encoding_format="float", **kw)  # type: ignore[arg-type]
    validate(result.model_dump(exclude_unset=True), "CreateEmbeddingResponse")
    assert [d.index for d in result.data] == list(range(len(inputs)))
    return np.array([d.embedding for d in result.data])


def test_gemma_with_mean_pooling_gives_real_embeddings(client: openai.OpenAI) -> None:
    v = vectors(client, GEMMA_EMBED, [CAT, KITTEN, STOCKS])
    assert v.shape == (3, 640)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2]


def test_minilm_similarity(client: openai.OpenAI, minilm_served: str) -> None:
    v = vectors(client, minilm_served, [CAT, KITTEN, STOCKS])
    assert v.shape == (3, 384)
    assert v[0] @ v[1] == pytest.approx(0.66, abs=0.03)
    assert v[0] @ v[2] == pytest.approx(0.09, abs=0.03)


def test_float_and_base64_are_the_same_vectors(server: ServerProcess, client: openai.OpenAI) -> None:
    floats = vectors(client, GEMMA_EMBED, [CAT, STOCKS])
    raw = httpx.post(
        f"{server.base_url}/v1/embeddings",
        timeout=60,
        json={"model": GEMMA_EMBED, "input": [CAT, STOCKS], "encoding_format": "base64"},
    ).json()
    # OpenAI's schema describes only float arrays; the base64 form is a string of little-endian
    # float32, as the openai client expects.
    assert all(isinstance(d["embedding"], str) for d in raw["data"])
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    assert np.allclose(decoded, floats, atol=1e-6)
    # The openai client asks for base64 by default and decodes it itself.
    assert np.allclose(
        np.array(client.embeddings.create(model=GEMMA_EMBED, input=CAT).data[0].embedding),
        floats[0],
        atol=1e-6,
    )


def test_dimensions_truncate_and_renormalize(client: openai.OpenAI) -> None:
    full = vectors(client, GEMMA_EMBED, [CAT])[0]
    short = vectors(client, GEMMA_EMBED, [CAT], dimensions=64)[0]
    assert short.shape == (64,) and np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)


def test_token_inputs_and_usage(client: openai.OpenAI, server: ServerProcess) -> None:
    text_result = client.embeddings.create(model=GEMMA_EMBED, input=[CAT, KITTEN])
    assert text_result.usage.prompt_tokens > 10
    assert text_result.usage.total_tokens == text_result.usage.prompt_tokens
    one = client.embeddings.create(model=GEMMA_EMBED, input=[2, 818, 5866, 28481])
    many = client.embeddings.create(model=GEMMA_EMBED, input=[[2, 818, 5866], [2, 107]])
    assert len(one.data) == 1 and len(many.data) == 2
    assert one.usage.prompt_tokens == 4 and many.usage.prompt_tokens == 5


def test_long_inputs_are_refused_or_truncated_on_request(server: ServerProcess) -> None:
    long_text = "word " * 5000
    url = f"{server.base_url}/v1/embeddings"
    refused = httpx.post(url, json={"model": GEMMA_EMBED, "input": ["short", long_text]}, timeout=60)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "input[1]"
    cut = httpx.post(
        url, json={"model": GEMMA_EMBED, "input": ["short", long_text], "truncate": True}, timeout=120
    )
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] <= 2048 + 10


@pytest.mark.parametrize(
    ("body", "status", "code", "text"),
    [
        ({"model": GEMMA_EMBED, "input": ""}, 400, "invalid_request", "input[0] is an empty string"),
        ({"model": GEMMA_EMBED, "input": []}, 400, "invalid_request", "input must not be empty"),
        ({"model": GEMMA_EMBED, "input": [[]]}, 400, "invalid_request", "empty token list"),
        ({"model": GEMMA_EMBED, "input": [5, 99999999]}, 400, "invalid_request", "outside the vocabulary"),
        ({"model": GEMMA_EMBED, "input": [-1]}, 400, "invalid_request", "outside the vocabulary"),
        ({"model": GEMMA_EMBED, "input": ["x"] * 3000}, 400, "invalid_request", "at most 2048"),
        ({"model": GEMMA_EMBED, "input": "x", "dimensions": 100000}, 400, "invalid_request", "dimensions"),
        (
            {"model": GEMMA_EMBED, "input": "x", "encoding_format": "hex"},
            400,
            "invalid_request",
            "encoding_format",
        ),
        ({"model": CHAT, "input": "x"}, 400, "model_wrong_purpose", "/v1/chat/completions"),
        ({"model": "ghost", "input": "x"}, 404, "model_not_found", "ghost"),
        ({"model": GEMMA_EMBED, "input": {"a": 1}}, 400, "invalid_request", "input"),
    ],
)
def test_bad_inputs_get_clear_errors(
    server: ServerProcess, body: dict[str, object], status: int, code: str, text: str
) -> None:
    response = httpx.post(f"{server.base_url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == status, response.text
    validate(response.json(), "ErrorResponse")
    assert response.json()["error"]["code"] == code and text in response.json()["error"]["message"]
    ok = httpx.post(
        f"{server.base_url}/v1/embeddings", json={"model": GEMMA_EMBED, "input": "ok"}, timeout=60
    )
    assert ok.status_code == 200
