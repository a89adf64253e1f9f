"""`/v1/embeddings` without the HTTP glue: normalize inputs, check them, embed in batches, shape.

Inputs are tokenized first and checked against the model (empty inputs, token ids outside the
vocabulary, sequences longer than the context) so llama.cpp never sees anything it would abort on.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from pendra_shared.api_errors import ContextLengthExceeded, InvalidRequest

from pendra_inference.metrics import InferenceMetrics
from pendra_inference.protocol import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from pendra_inference.registry import Loaded, ModelRegistry


def _inputs(raw: Any, max_inputs: int) -> list[str | list[int]]:
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [list(raw)]
    else:
        items = list(raw)
    if not items:
        raise InvalidRequest("input must not be empty", param="input")
    if len(items) > max_inputs:
        raise InvalidRequest(f"input has {len(items)} items; at most {max_inputs} per request", param="input")
    return items


def tokenize_inputs(loaded: Loaded, req: EmbeddingRequest, max_inputs: int) -> list[list[int]]:
    engine = loaded.engine
    limit = min(engine.n_ctx, engine.llm.n_batch)
    n_vocab = engine.n_vocab
    out = []
    for i, item in enumerate(_inputs(req.input, max_inputs)):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"input[{i}] is an empty string", param=f"input[{i}]")
            tokens = engine.tokenize(item)
        else:
            if not item:
                raise InvalidRequest(f"input[{i}] is an empty token list", param=f"input[{i}]")
            bad = next((t for t in item if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise InvalidRequest(
                    f"input[{i}] has token id {bad}, outside the vocabulary (0..{n_vocab - 1})",
                    param=f"input[{i}]",
                )
            tokens = list(item)
        if len(tokens) > limit:
            if not req.truncate:
                raise ContextLengthExceeded(
                    f"input[{i}] has {len(tokens)} tokens; this model takes at most {limit} "
                    '(send "truncate": true to cut longer inputs)',
                    param=f"input[{i}]",
                )
            tokens = tokens[:limit]
        out.append(tokens)
    return out


def _shape(vector: list[float], dimensions: int | None, encoding: str) -> list[float] | str:
    array = np.asarray(vector, dtype=np.float32)
    if dimensions is not None:
        array = array[:dimensions]
        norm = float(np.linalg.norm(array))
        if norm > 0:
            array = array / norm
    if encoding == "base64":
        return base64.b64encode(array.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in array]


class EmbeddingService:
    def __init__(
        self, registry: ModelRegistry, max_inputs: int, metrics: InferenceMetrics | None = None
    ) -> None:
        self.registry = registry
        self.max_inputs = max_inputs
        self.metrics = metrics or InferenceMetrics()

    async def embed(self, req: EmbeddingRequest) -> EmbeddingList:
        async with self.registry.use(req.model, "embedding", req.keep_alive) as loaded:
            n_embd = loaded.engine.n_embd
            if req.dimensions is not None and req.dimensions > n_embd:
                raise InvalidRequest(
                    f"dimensions must be at most {n_embd} for this model", param="dimensions"
                )
            tokens = await asyncio.to_thread(tokenize_inputs, loaded, req, self.max_inputs)

            def run() -> list[list[float]]:
                with loaded.lock:
                    return loaded.engine.embed(tokens)

            vectors = await asyncio.to_thread(run)
        used = sum(len(t) for t in tokens)
        self.metrics.embeddings_done(req.model, used)
        return EmbeddingList(
            data=[
                Embedding(embedding=_shape(v, req.dimensions, req.encoding_format), index=i)
                for i, v in enumerate(vectors)
            ],
            model=req.model,
            usage=EmbeddingUsage(prompt_tokens=used, total_tokens=used),
        )
