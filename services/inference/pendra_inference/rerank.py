"""`POST /v1/rerank` (and `/rerank`), in the shape Jina, Cohere and llama-server share: `query`,
`documents` (strings, or objects with `text`), `top_n`, `return_documents`; results sorted by
`relevance_score`, best first, each with the document's `index`.

Two kinds of model rank:
- a reranker (a cross-encoder GGUF with llama.cpp's rank pooling, purpose `rerank`): each
  (query, document) pair is one sequence, `[CLS] query [SEP] document [SEP]` as llama-server
  builds it for BERT-style rerankers, and its pooled output is the score;
- an embedding model: the cosine similarity of the query's and each document's embeddings (a
  bi-encoder's ranking: weaker than a cross-encoder's, but it works with the models people have).
Either way the inputs go through the model's batcher, packed into decodes with other requests.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import llama_cpp
import numpy as np
from pendra_shared.api_errors import InvalidRequest, WrongPurpose
from pydantic import Field, StrictInt

from pendra_inference.embed_batcher import EmbedBatcher
from pendra_inference.protocol import MAX_MODEL_NAME, KeepAlive, _Request
from pendra_inference.registry import Loaded, ModelRegistry

MAX_DOCUMENTS = 1000


class RerankRequest(_Request):
    model: str = Field(max_length=MAX_MODEL_NAME)
    query: str = Field(min_length=1)
    documents: list[str | dict[str, Any]] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: bool = False
    keep_alive: KeepAlive = None


def texts_of(req: RerankRequest) -> list[str]:
    texts = []
    for i, doc in enumerate(req.documents):
        text = doc if isinstance(doc, str) else doc.get("text")
        if not isinstance(text, str) or not text:
            raise InvalidRequest(
                f"documents[{i}] must be a non-empty string or an object with text", param=f"documents[{i}]"
            )
        texts.append(text)
    return texts


def pair_tokens(loaded: Loaded, query: str, documents: list[str]) -> list[list[int]]:
    """Each (query, document) pair as llama-server builds it for a reranker without a rerank
    template: `[BOS] query [EOS] [SEP, where the vocabulary adds one] document [EOS]` (BERT:
    `[CLS] q [SEP] d [SEP]`), the document cut to fit the batch."""
    engine = loaded.engine
    vocab = engine.vocab
    limit = min(engine.n_ctx, engine.llm.n_batch)
    eos = llama_cpp.llama_vocab_eos(vocab)
    if eos == llama_cpp.LLAMA_TOKEN_NULL:
        eos = llama_cpp.llama_vocab_sep(vocab)
    end = [eos] if llama_cpp.llama_vocab_get_add_eos(vocab) else []
    head = [llama_cpp.llama_vocab_bos(vocab)] if llama_cpp.llama_vocab_get_add_bos(vocab) else []
    head += engine.tokenize(query, add_bos=False, special=False) + end
    head += [llama_cpp.llama_vocab_sep(vocab)] if llama_cpp.llama_vocab_get_add_sep(vocab) else []
    if len(head) + len(end) >= limit:
        raise InvalidRequest(f"the query is longer than this model takes ({limit} tokens)", param="query")
    room = limit - len(head) - len(end)
    return [head + engine.tokenize(text, add_bos=False, special=False)[:room] + end for text in documents]


def single_tokens(loaded: Loaded, texts: list[str]) -> list[list[int]]:
    engine = loaded.engine
    limit = min(engine.n_ctx, engine.llm.n_batch)
    return [engine.tokenize(text)[:limit] for text in texts]


class RerankService:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def rerank(self, req: RerankRequest) -> dict[str, Any]:
        documents = texts_of(req)
        model = await self.registry.find(req.model)
        if model.purpose not in ("rerank", "embedding"):
            raise WrongPurpose(
                f"'{req.model}' is a {model.purpose} model; rerank takes a reranker or an embedding model",
                param="model",
            )
        async with self.registry.use(model.name, model.purpose, req.keep_alive) as loaded:
            batcher: EmbedBatcher = loaded.runner
            if model.purpose == "rerank":
                tokens = await asyncio.to_thread(pair_tokens, loaded, req.query, documents)
                scores = (await batcher.embed(tokens))[:, 0]
                method = "cross-encoder"
            else:
                tokens = await asyncio.to_thread(single_tokens, loaded, [req.query, *documents])
                vectors = await batcher.embed(tokens)  # L2-normalized: the dot product is the cosine
                scores = vectors[1:] @ vectors[0]
                method = "embedding-similarity"
        used = sum(len(t) for t in tokens)
        order = np.argsort(-scores, kind="stable")[: req.top_n]
        results = []
        for index in order.tolist():
            result: dict[str, Any] = {"index": index, "relevance_score": float(scores[index])}
            if req.return_documents:
                result["document"] = {"text": documents[index]}
            results.append(result)
        return {
            "id": f"rerank-{uuid.uuid4().hex}",
            "object": "list",
            "model": req.model,
            "results": results,
            "usage": {"prompt_tokens": used, "total_tokens": used},
            "meta": {"method": method},
        }
