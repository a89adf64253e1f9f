"""`/v1/embeddings` without the HTTP glue: normalize inputs, check them, embed, shape, render.

Inputs are tokenized first and checked against the model (empty inputs, token ids outside the
vocabulary, sequences longer than the context) so llama.cpp never sees anything it would abort on.
The model's `EmbedBatcher` (`embed_batcher.py`) embeds them, sharing decodes with other requests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np
from pendra_shared.api_errors import APIError, ContextLengthExceeded, InvalidRequest

from pendra_inference.embed_batcher import EmbedBatcher
from pendra_inference.limits import surely_longer
from pendra_inference.metrics import InferenceMetrics, counted
from pendra_inference.protocol import EmbeddingRequest
from pendra_inference.registry import Loaded, ModelRegistry


def _is_token(x: Any) -> bool:
    return type(x) is int  # not bool, not float


def _inputs(raw: Any, max_inputs: int) -> list[str | list[int]]:
    """The request's inputs as strings and token lists, each of the right type (else a 400 naming
    input[i]), and not too many."""
    if isinstance(raw, str):
        return [raw]
    if not raw:
        raise InvalidRequest("input must not be empty", param="input")
    if all(_is_token(x) for x in raw):
        return [list(raw)]
    if isinstance(raw[0], int | float):  # meant as one list of token ids
        i, bad = next((i, x) for i, x in enumerate(raw) if not _is_token(x))
        raise InvalidRequest(f"input[{i}] is {_shown(bad)}, not an integer token id", param=f"input[{i}]")
    if len(raw) > max_inputs:
        raise InvalidRequest(f"input has {len(raw)} items; at most {max_inputs} per request", param="input")
    items: list[str | list[int]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str) or (isinstance(item, list) and all(_is_token(t) for t in item)):
            items.append(item)
            continue
        what = _shown(item)
        if isinstance(item, list):
            what = f"a list holding {_shown(next(t for t in item if not _is_token(t)))}"
        raise InvalidRequest(
            f"input[{i}] must be a string or a list of integer token ids, not {what}", param=f"input[{i}]"
        )
    return items


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def tokenize_inputs(loaded: Loaded, req: EmbeddingRequest, max_inputs: int) -> list[list[int]]:
    engine = loaded.engine
    limit = min(engine.n_ctx, engine.llm.n_batch)
    n_vocab = engine.n_vocab
    out = []
    for i, item in enumerate(_inputs(req.input, max_inputs)):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"input[{i}] is an empty string", param=f"input[{i}]")
            if not req.truncate and surely_longer(loaded, item, limit):
                raise ContextLengthExceeded(
                    f"input[{i}] has more than {limit} tokens, the most this model takes "
                    '(send "truncate": true to cut longer inputs)',
                    param=f"input[{i}]",
                )
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


def shape(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """OpenAI's `dimensions`: the first `dimensions` numbers of each vector, renormalized."""
    if dimensions is None:
        return vectors
    cut = vectors[:, :dimensions].astype(np.float64)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    np.divide(cut, norms, out=cut, where=norms > 0)
    return cut.astype(np.float32)


def render(vectors: np.ndarray, encoding: str, model: str, tokens: int) -> bytes:
    """The response body, OpenAI's `CreateEmbeddingResponse`, written directly: a pydantic object
    per vector and a float per number cost more than the decode of short inputs. `float` numbers
    get 9 significant digits, which give back each float32 exactly; `base64` is little-endian
    float32, as the openai client expects."""
    if encoding == "base64":
        items = [f'"{base64.b64encode(row.tobytes()).decode("ascii")}"' for row in vectors.astype("<f4")]
    else:
        if not np.isfinite(vectors).all():
            raise APIError(f"'{model}' produced an embedding that is not a finite number")
        row_format = "[" + ",".join(["%.9g"] * vectors.shape[1]) + "]"
        items = [row_format % tuple(row) for row in vectors.tolist()]
    data = ",".join(
        f'{{"object":"embedding","embedding":{item},"index":{i}}}' for i, item in enumerate(items)
    )
    usage = f'{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}'
    return f'{{"object":"list","data":[{data}],"model":{json.dumps(model)},"usage":{usage}}}'.encode()


# Bodies of up to this many numbers are written on the event loop; bigger ones in a thread.
_INLINE_NUMBERS = 16_384


class EmbeddingService:
    def __init__(
        self, registry: ModelRegistry, max_inputs: int, metrics: InferenceMetrics | None = None
    ) -> None:
        self.registry = registry
        self.max_inputs = max_inputs
        self.metrics = metrics or registry.metrics

    async def embed(self, req: EmbeddingRequest) -> bytes:
        """The JSON response body for `req`. The model's `EmbedBatcher` packs these inputs into
        decodes together with those of other requests."""
        _inputs(req.input, self.max_inputs)  # a malformed request loads no model
        async with self.registry.use(req.model, "embedding", req.keep_alive) as loaded:
            n_embd = loaded.engine.n_embd
            if req.dimensions is not None and req.dimensions > n_embd:
                raise InvalidRequest(
                    f"dimensions must be at most {n_embd} for this model", param="dimensions"
                )
            with counted(self.metrics, req.model, "embeddings"):
                tokens = await asyncio.to_thread(tokenize_inputs, loaded, req, self.max_inputs)
                started = time.monotonic()  # it arrives at the model's batcher
                batcher: EmbedBatcher = loaded.runner
                vectors = await batcher.embed(tokens)
        used = sum(len(t) for t in tokens)
        self.metrics.embedded(req.model, used, time.monotonic() - started)
        vectors = shape(vectors, req.dimensions)
        if vectors.size <= _INLINE_NUMBERS:
            return render(vectors, req.encoding_format, req.model, used)
        return await asyncio.to_thread(render, vectors, req.encoding_format, req.model, used)
