"""A real `pendra serve` over a store holding the real Gemma GGUF (as a chat model and, loaded with
mean pooling, as an embedding model) and the real MiniLM embedding model when it is available."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from pendra_inference.selfcheck import LlamaShape, write_llama_gguf
from pendra_shared.store import ModelStore

from tests.conftest import MINILM_FILE, SHARED_MODELS
from tests.support.server import ServerProcess, start_server

CHAT = "gemma3:270m"
# A small llama of random Q8_0 weights: its llama.cpp kernels give a sequence bit-identical logits
# whatever shares the batch and the cache, so its tests can ask for identical text. (Gemma 3 270M
# turns the last-bit differences of placement and batch shape into up to a logit: see the README.)
TINY = "tiny:q8"
TINY_SHAPE = LlamaShape(n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512, n_vocab=2000, context=4096)
GEMMA_EMBED = "gemma-embed:270m"
MINILM = "minilm:l6"


@pytest.fixture(scope="module")
def served_store(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Path:
    root = tmp_path_factory.mktemp("served") / "models"
    store = ModelStore(root)
    store.import_file(gemma_path, name=CHAT)
    store.import_file(gemma_path, name=GEMMA_EMBED, purpose="embedding")
    tiny = write_llama_gguf(root.parent / "tiny.gguf", TINY_SHAPE, name="tiny")
    store.import_file(tiny, name=TINY, purpose="chat")
    if SHARED_MODELS and (Path(SHARED_MODELS) / MINILM_FILE).is_file():
        store.import_file(Path(SHARED_MODELS) / MINILM_FILE, name=MINILM)
    return root


@pytest.fixture(scope="module")
def server(served_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    env = {
        "PENDRA_MODELS_DIR": str(served_store),
        "PENDRA_N_CTX": "2048",
        "PENDRA_KEEP_ALIVE": "-1",
        "HOME": str(served_store.parent),
    }
    proc = start_server(env, log)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def minilm_served(served_store: Path) -> str:
    if not (served_store / "minilm-l6.gguf").exists():
        pytest.skip("PENDRA_TEST_SHARED_MODELS does not point at a folder with " + MINILM_FILE)
    return MINILM
