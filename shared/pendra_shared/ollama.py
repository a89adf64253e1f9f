"""What Ollama's API says about a model, from Pendra's store: the shapes both services answer
Ollama's clients with (the API service's `/api/tags` and `/api/show`, the inference service's
`/api/ps`), and its error body.

Ollama's names and Pendra's are the same (`family:tag`); a model's `digest` is its file's SHA-256
where a sidecar records one. Durations on Ollama's routes are nanoseconds.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pendra_shared import jsonbody
from pendra_shared.store import StoredModel

# The Ollama API level Pendra answers as (`GET /api/version`): clients that compare versions see
# one that has every route Pendra serves; `pendra` in the same answer is Pendra's own version.
OLLAMA_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
MAX_DEPTH = 64  # tools' JSON schemas nest; nothing an Ollama client sends goes deeper


def parse_body(raw: bytes) -> tuple[dict[str, Any], str]:
    """A request body as Ollama's routes take it, and the model it names (`model`, or `name` as
    older clients send it); ValueError says what is wrong with it."""
    try:
        body = jsonbody.loads(raw or b"{}", MAX_DEPTH)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("model is required")
    return body, name


def error_body(message: str) -> dict[str, str]:
    """Ollama's error shape: `{"error": "..."}`, with the HTTP status saying what kind."""
    return {"error": message}


def parameter_size(model: StoredModel) -> str:
    """ "270M", "4.0B": the catalogue's label where a sidecar has one, else from the header."""
    if model.sidecar and model.sidecar.catalogue and model.sidecar.catalogue.get("parameters"):
        return str(model.sidecar.catalogue["parameters"])
    count = model.facts.parameters if model.facts else 0
    if not count:
        return ""
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


def details(model: StoredModel) -> dict[str, Any]:
    """Ollama's `details`; a model with a vision projector lists `clip` among its families, as
    Ollama lists a vision model's."""
    arch = model.facts.architecture if model.facts else ""
    families = ([arch] if arch else []) + (["clip"] if model.projector is not None else [])
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": families or None,
        "parameter_size": parameter_size(model),
        "quantization_level": (model.facts.quantization if model.facts else None) or "",
    }


def digest(model: StoredModel) -> str:
    return model.sidecar.sha256 if model.sidecar else ""


def capabilities(model: StoredModel) -> list[str]:
    """Ollama's capability words: `embedding` for embedding models (and rerankers, which Ollama
    has no word for); for chat models `completion`, and `tools` and `thinking` where the chat
    template they are served with knows them, `vision` where a projector is paired with them
    (`StoredModel.capabilities`)."""
    if model.purpose in ("embedding", "rerank"):
        return ["embedding"]
    return model.capabilities


def tag(model: StoredModel) -> dict[str, Any]:
    """One model as `/api/tags` lists it."""
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": model.modified.isoformat(),
        "size": model.size_bytes,
        "digest": digest(model),
        "details": details(model),
    }


def running(
    model: StoredModel, memory_bytes: int, expires_at: datetime, on_gpu: bool, n_ctx: int
) -> dict[str, Any]:
    """One loaded model as `/api/ps` lists it."""
    return {
        "name": model.name,
        "model": model.name,
        "size": memory_bytes,
        "digest": digest(model),
        "details": details(model),
        "expires_at": expires_at.isoformat(),
        "size_vram": memory_bytes if on_gpu else 0,
        "context_length": n_ctx,
    }
