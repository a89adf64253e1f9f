"""`POST /tokenize` and `/detokenize` (llama-server's shape, with `model`) on a real `pendra serve`
with the real Gemma model: ids and pieces as the model's own tokenizer gives them, a round trip
back to the text, and clear errors for what cannot be."""

from __future__ import annotations

import httpx
import pytest
from llama_cpp import Llama

from tests.inference.conftest import CHAT, GEMMA_EMBED
from tests.support.server import ServerProcess

TEXT = "Héllo, wörld! 🌊 The sea."


def post(url: str, **kwargs: object) -> httpx.Response:
    return httpx.post(url, timeout=120, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(gemma_path: object) -> Llama:
    """llama.cpp's own tokenizer of the same file, loaded vocabulary-only."""
    return Llama(str(gemma_path), vocab_only=True, verbose=False)


def test_tokenize_gives_the_models_own_ids(server: ServerProcess, reference: Llama) -> None:
    answer = post(f"{server.base_url}/tokenize", json={"model": CHAT, "content": TEXT})
    assert answer.status_code == 200, answer.text
    tokens = answer.json()["tokens"]
    assert tokens == reference.tokenize(TEXT.encode(), add_bos=False, special=True)
    with_bos = post(f"{server.base_url}/tokenize", json={"model": CHAT, "content": TEXT, "add_special": True})
    assert with_bos.json()["tokens"] == [reference.token_bos(), *tokens]


def test_pieces_are_text_or_the_bytes_of_a_partial_character(server: ServerProcess) -> None:
    answer = post(f"{server.base_url}/tokenize", json={"model": CHAT, "content": TEXT, "with_pieces": True})
    pieces = answer.json()["tokens"]
    assert all(set(p) == {"id", "piece"} for p in pieces)
    joined = b"".join(
        p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces
    )
    assert joined.decode() == TEXT
    assert any(isinstance(p["piece"], str) and "sea" in p["piece"] for p in pieces)


def test_detokenize_round_trips_on_any_purpose(server: ServerProcess) -> None:
    for model in (CHAT, GEMMA_EMBED):  # the embedding model has the same tokenizer
        tokens = post(f"{server.base_url}/tokenize", json={"model": model, "content": TEXT}).json()["tokens"]
        back = post(f"{server.base_url}/detokenize", json={"model": model, "tokens": tokens})
        assert back.status_code == 200 and back.json() == {"content": TEXT}


def test_bad_requests_are_clear(server: ServerProcess) -> None:
    url = server.base_url
    out_of_range = post(f"{url}/detokenize", json={"model": CHAT, "tokens": [2, 10**9]})
    assert out_of_range.status_code == 400
    assert out_of_range.json()["error"]["param"] == "tokens[1]"
    assert post(f"{url}/detokenize", json={"model": CHAT, "tokens": ["a"]}).status_code == 400
    assert post(f"{url}/tokenize", json={"model": "nope:1", "content": "x"}).status_code == 404
    assert post(f"{url}/tokenize", json={"model": CHAT}).status_code == 400
    assert post(f"{url}/tokenize", json={"model": CHAT, "content": "x", "surprise": 1}).status_code == 400
