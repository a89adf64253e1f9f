"""Tokens longer than 32 bytes (the real Qwen vocabulary has 240, up to 128 bytes: runs of spaces
for code indentation) come out whole from `/detokenize`, `/tokenize` pieces and generated text;
llama-cpp-python's own `Llama.detokenize` reads each into 32 bytes and drops the longer ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import llama_cpp
import pytest
from pendra_inference.detokenize import token_bytes
from pendra_shared.store import ModelStore

from tests.support.hybrids import write_qwen35
from tests.support.server import ServerProcess, start_server

MODEL = "qwen35:tiny"
CODE = (
    "def f():\n"
    + "".join(" " * (4 * depth) + f"if x{depth}:\n" for depth in range(1, 24))
    + " " * 96
    + "pass\n"
)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen35(tmp_path_factory.mktemp("qwen") / "qwen35.gguf")


@pytest.fixture(scope="module")
def server(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("long-tokens")
    ModelStore(base / "models").import_file(qwen, name=MODEL, purpose="chat")
    env = {"PENDRA_MODELS_DIR": str(base / "models"), "PENDRA_N_CTX": "512", "HOME": str(base)}
    proc = start_server(env, base / "serve.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def pieces(qwen: Path) -> list[bytes]:
    """Every token's piece as llama.cpp's own `llama_token_to_piece` gives it, from the same file."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(qwen).encode(), params)
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return [token_bytes(vocab, t) for t in range(llama_cpp.llama_vocab_n_tokens(vocab))]
    finally:
        llama_cpp.llama_model_free(model)


def test_the_vocabulary_has_long_tokens(pieces: list[bytes]) -> None:
    long = [p for p in pieces if len(p) > 32]
    assert len(long) >= 200 and max(map(len, long)) >= 100


def test_every_token_detokenizes_byte_for_byte(server: ServerProcess, pieces: list[bytes]) -> None:
    url = f"{server.base_url}/detokenize"
    for token, piece in enumerate(pieces):
        if len(piece) > 32:  # each long one alone: nothing around it to hide a loss
            answer = httpx.post(url, json={"model": MODEL, "tokens": [token]}, timeout=30)
            assert answer.json()["content"] == piece.decode("utf-8", errors="replace"), token
    for start in range(0, len(pieces), 20_000):  # and the whole vocabulary, in a few requests
        ids = list(range(start, min(start + 20_000, len(pieces))))
        answer = httpx.post(url, json={"model": MODEL, "tokens": ids}, timeout=60)
        assert answer.status_code == 200, answer.text
        want = b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")
        assert answer.json()["content"] == want


def test_tokenize_pieces_rebuild_long_indentation_exactly(server: ServerProcess, pieces: list[bytes]) -> None:
    body = {"model": MODEL, "content": CODE, "with_pieces": True}
    tokens = httpx.post(f"{server.base_url}/tokenize", json=body, timeout=30).json()["tokens"]
    assert any(len(pieces[t["id"]]) > 32 for t in tokens)  # the long runs of spaces are single tokens
    rebuilt = b"".join(
        p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in tokens
    )
    assert rebuilt == CODE.encode()
    back = httpx.post(
        f"{server.base_url}/detokenize", json={"model": MODEL, "tokens": [t["id"] for t in tokens]}
    )
    assert back.json()["content"] == CODE


def test_a_generated_long_token_is_whole_in_the_text_and_its_logprobs(
    server: ServerProcess, pieces: list[bytes]
) -> None:
    token = max(range(len(pieces)), key=lambda t: len(pieces[t]) if pieces[t].strip() == b"" else 0)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Indent."}],
        "max_tokens": 2,
        "logit_bias": {str(token): 100},  # this token, whatever the random weights say
        "logprobs": True,
        "reasoning_format": "none",  # the text as generated (the template opened <think>)
    }
    answer = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60).json()
    choice = answer["choices"][0]
    assert choice["message"]["content"] == "<think>\n" + pieces[token].decode() * 2
    first = choice["logprobs"]["content"][0]
    assert len(pieces[token]) > 32 and first["bytes"] == list(pieces[token])
    assert first["token"] == pieces[token].decode()
