"""A real `pendra serve` over a store holding the real Gemma GGUF (as a chat model and, loaded with
mean pooling, as an embedding model) and the real MiniLM embedding model when it is available."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from pendra_inference.gguf_writer import LlamaShape, write_llama_gguf
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


# -- a store of small llamas for hostile-request tests: TINY, TINY as an embedding model, and TINY
# carrying hostile chat templates (checklist A and B7) ------------------------------------------

TINY_EMBED = "tiny-embed:q8"
TINY_N_CTX = 256
TEMPLATE_TIMEOUT_S = 1.0  # so a template time bomb ends within the checklist's 2 s


def write_with_chat_template(source: Path, target: Path, chat_template: str) -> Path:
    """A copy of the GGUF `source` whose `tokenizer.chat_template` is `chat_template` (the way
    gguf's own gguf-new-metadata script rewrites metadata)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch="llama", endianess=reader.endianess)
    template = MetadataDetails(gguf.GGUFValueType.STRING, chat_template)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: template}, [])
    return target


@dataclass(frozen=True)
class TinyStore:
    root: Path
    marker: Path  # a file only a template escaping the sandbox would create
    templated: dict[str, str]  # model name -> its chat template


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> TinyStore:
    base = tmp_path_factory.mktemp("tiny-served")
    root = base / "models"
    store = ModelStore(root)
    tiny = write_llama_gguf(base / "tiny.gguf", TINY_SHAPE, name="tiny")
    store.import_file(tiny, name=TINY, purpose="chat")
    store.import_file(tiny, name=TINY_EMBED, purpose="embedding")
    marker = base / "escaped-the-sandbox"
    templated = {
        "ssti-lipsum:1": f"{{{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}}}",
        "ssti-cycler:1": (
            f"{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}"
            "{% for m in messages %}{{ m.content }}{% endfor %}"
        ),
        "bomb-mul:1": "{{ 'a' * 200000000 }}",
        "bomb-pow:1": "{{ 'a' * 10**9 }}",
        "bomb-loops:1": (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
            "{% endfor %}{% endfor %}{% endfor %}"
        ),
        "bomb-output:1": (
            "{% for a in range(100000) %}{% for b in range(100000) %}xyz{% endfor %}{% endfor %}"
        ),
    }
    for i, (name, source) in enumerate(templated.items()):
        path = write_with_chat_template(tiny, base / f"templated-{i}.gguf", source)
        store.import_file(path, name=name, purpose="chat")
    return TinyStore(root, marker, templated)


@pytest.fixture(scope="session")
def tiny_server(tiny_store: TinyStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`pendra serve` over `tiny_store`, with a small context and a 1 s template budget."""
    log = tmp_path_factory.mktemp("tiny-logs") / "serve.log"
    env = {
        "PENDRA_MODELS_DIR": str(tiny_store.root),
        "PENDRA_N_CTX": str(TINY_N_CTX),
        "PENDRA_KEEP_ALIVE": "-1",
        "PENDRA_TEMPLATE_TIMEOUT_S": str(TEMPLATE_TIMEOUT_S),
        "HOME": str(tiny_store.root.parent),
    }
    proc = start_server(env, log)
    yield proc
    proc.stop()
