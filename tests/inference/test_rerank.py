"""`/v1/rerank` and `/rerank` on a real `pendra serve`: with an embedding model (MiniLM where the
test models sit beside the repo, Gemma with mean pooling in any clone) the relevant document
comes first; the shape is Jina's and Cohere's (results best first with their `index`, `top_n`,
`return_documents`); a chat model is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import pytest
from pendra_inference.engine import EngineConfig, LlamaEngine
from pendra_shared.store import ModelStore

from tests.inference.conftest import CHAT, GEMMA_EMBED
from tests.support.rerankers import rank_pooling_copy
from tests.support.server import ServerProcess

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Bananas are a good source of potassium.",
    "Paris is the capital and largest city of France.",
    "The stock market fell sharply on Monday.",
    "Berlin is the capital of Germany.",
]


def rerank(server: ServerProcess, path: str = "/v1/rerank", **body: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=120)


def test_minilm_puts_the_relevant_document_first(server: ServerProcess, minilm_served: str) -> None:
    answer = rerank(server, model=minilm_served, query=QUERY, documents=DOCUMENTS, return_documents=True)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    results = body["results"]
    assert [r["index"] for r in results][0] == 1
    assert results[0]["document"] == {"text": DOCUMENTS[1]}
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert results[-1]["index"] in (0, 2)  # bananas or stocks: the least related
    assert body["model"] == minilm_served and body["usage"]["total_tokens"] > 0
    assert body["meta"] == {"method": "embedding-similarity"}


def test_the_shape_top_n_and_the_cohere_path(server: ServerProcess) -> None:
    documents = [*DOCUMENTS, QUERY]  # the query itself: the most similar document there can be
    first = rerank(server, model=GEMMA_EMBED, query=QUERY, documents=documents, top_n=2).json()
    assert len(first["results"]) == 2 and first["results"][0]["index"] == 4
    assert first["results"][0]["relevance_score"] > 0.999
    assert "document" not in first["results"][0]
    objects = [{"text": d} for d in documents]
    same = rerank(server, "/rerank", model=GEMMA_EMBED, query=QUERY, documents=objects, top_n=2).json()
    assert [r["index"] for r in same["results"]] == [r["index"] for r in first["results"]]


def test_bad_requests_are_refused(server: ServerProcess) -> None:
    chat = rerank(server, model=CHAT, query=QUERY, documents=DOCUMENTS)
    assert chat.status_code == 400 and "chat model" in chat.json()["error"]["message"]
    assert rerank(server, model=GEMMA_EMBED, query=QUERY, documents=[]).status_code == 400
    assert rerank(server, model=GEMMA_EMBED, query="", documents=DOCUMENTS).status_code == 400
    empty = rerank(server, model=GEMMA_EMBED, query=QUERY, documents=["fine", {"text": ""}])
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "documents[1]"
    assert rerank(server, model="nope:1", query=QUERY, documents=DOCUMENTS).status_code == 404


def test_a_rank_pooling_model_scores_pairs_as_llama_server_builds_them(
    server: ServerProcess, served_store: Path, minilm_path: Path, tmp_path: Path
) -> None:
    """llama.cpp's rerank path: the pairs, the pooled score of each, batched equal to one at a
    time (computed here, in this process, by llama.cpp itself), sorted, cut to top_n."""
    derived = rank_pooling_copy(minilm_path, tmp_path / "rank-minilm.gguf")
    ModelStore(served_store).import_file(derived, name="rank-minilm:test")
    answer = rerank(server, model="rank-minilm:test", query=QUERY, documents=DOCUMENTS)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["meta"] == {"method": "cross-encoder"}
    served = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert [r["index"] for r in body["results"]] == sorted(served, key=lambda i: -served[i])

    engine = LlamaEngine(
        derived,
        EngineConfig(n_ctx=512, n_batch=512, n_ubatch=512, n_threads=None, n_gpu_layers=0, embedding=True),
    )
    try:
        assert engine.ranks and engine.output_width == 1
        vocab = engine.vocab
        cls, sep = llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)

        def pair(doc: str) -> list[int]:
            q = engine.tokenize(QUERY, add_bos=False, special=False)
            d = engine.tokenize(doc, add_bos=False, special=False)
            return [cls, *q, sep, *d, sep]  # MiniLM's vocabulary adds no extra separator

        alone = [float(engine.embed([pair(doc)])[0, 0]) for doc in DOCUMENTS]
    finally:
        engine.close()
    # The same pairs and head: equal up to the batched decode's float16 rounding, in the same order.
    assert [served[i] for i in range(len(DOCUMENTS))] == pytest.approx(alone, abs=2e-3)
    assert [r["index"] for r in body["results"]] == sorted(range(len(DOCUMENTS)), key=lambda i: -alone[i])
    assert len({round(s, 4) for s in alone}) == len(DOCUMENTS)  # scores, not a constant
    top = rerank(server, model="rank-minilm:test", query=QUERY, documents=DOCUMENTS, top_n=1).json()
    assert [r["index"] for r in top["results"]] == [body["results"][0]["index"]]
