"""The inference service's HTTP routes: thin glue between FastAPI and the services."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pendra_shared import jsonbody
from pendra_shared.api_errors import NotSupported, Unavailable
from pendra_shared.metrics import MEDIA_TYPE
from pendra_shared.store import StoredModel
from starlette.background import BackgroundTask

from pendra_inference import __version__, ollama
from pendra_inference.chat import EventStream
from pendra_inference.completions import CompletionRequest
from pendra_inference.limits import RequestLimits
from pendra_inference.protocol import (
    ChatCompletionRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
)
from pendra_inference.rerank import RerankRequest
from pendra_inference.responses import ResponseRequest
from pendra_inference.scheduler import Scheduler
from pendra_inference.state import AppState
from pendra_inference.tokens import DetokenizeRequest, TokenizeRequest

router = APIRouter()
# The nesting a body may have beyond a JSON schema's own (tools[i].function.parameters sits 5 deep).
_BODY_DEPTH_BEYOND_SCHEMA = 16


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.pendra
    return state


class _StrictJSONRequest(Request):
    """A request whose JSON body is parsed by `jsonbody.loads` (strict UTF-8 JSON, bounded depth)."""

    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            state: AppState | None = getattr(self.app.state, "pendra", None)
            limits = state.chat.limits if state else RequestLimits()
            self._strict_json = jsonbody.loads(
                await self.body(), limits.max_schema_depth + _BODY_DEPTH_BEYOND_SCHEMA
            )
        return self._strict_json


class StrictJSONRoute(APIRoute):
    """A route that reads its body with `_StrictJSONRequest` (FastAPI's custom request pattern)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


# The routes that take a JSON body; included into `router` below, after their definitions.
strict_json = APIRouter(route_class=StrictJSONRoute)


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness, and what the models run on: the backend ("cuda", "vulkan", "metal", "cpu"),
    its devices and the CPU variant of llama.cpp in use."""
    report = _state(request).registry.backends
    return {
        "status": "ok",
        "backend": report.backend,
        "devices": [
            {"name": d.name, "description": d.description, "type": d.type, "memory_total": d.memory_total}
            for d in (report.gpu_devices or report.devices)
        ],
        "cpu_variant": report.cpu_variant,
    }


def status_report(state: AppState) -> dict[str, Any]:
    """What the console's overview shows: the build, what it runs on, the memory budget models
    are loaded within, and the models loaded now with the memory each holds."""
    registry = state.registry
    report = registry.backends
    now = time.monotonic()
    load = registry.load()
    return {
        "version": __version__,
        "llama_cpp_python": report.llama_cpp_python,
        "ggml_version": report.ggml_version,
        "backend": report.backend,
        "cpu_variant": report.cpu_variant,
        "gpu_offload": registry.gpu,
        "devices": [
            {
                "name": d.name,
                "description": d.description,
                "type": d.type,
                "memory_total": d.memory_total,
                "memory_free": d.memory_free,
            }
            for d in (report.gpu_devices or report.devices)
        ],
        "memory_budget_bytes": registry.budget,
        "max_loaded_models": registry.settings.max_loaded_models,
        # The whole server's load, as pendra_server_* on /metrics: what the API's router reads.
        "requests_waiting": load.waiting,
        "requests_running": load.running,
        "kv_cache_usage": round(load.kv_cache_usage, 4),
        "loading": load.loading,
        "loaded": [
            {
                "name": m.name,
                "purpose": m.model.purpose,
                "memory_bytes": m.memory_bytes,
                "in_flight": m.in_flight,
                "idle_s": 0.0 if m.in_flight else round(now - m.last_used, 1),
                **_memory_facts(m.runner),
            }
            for m in registry.loaded_models()
        ],
    }


def _memory_facts(runner: Any) -> dict[str, Any]:
    """A chat model's memory kind, sequence ids and checkpoints (see model_memory.py)."""
    if not isinstance(runner, Scheduler):
        return {}
    stats = runner.stats()
    return {
        "waiting": stats.waiting,
        "running": stats.running,
        "parallel": stats.parallel,
        "memory_kind": stats.memory_kind,
        "sequences": stats.sequences,
        "checkpoints": stats.checkpoints,
        "checkpoint_bytes": stats.checkpoint_bytes,
    }


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    return status_report(_state(request))


@router.get("/ready")
async def ready(request: Request) -> dict[str, Any]:
    state = _state(request)
    if not state.ready:
        raise Unavailable("the model store has not been scanned yet")
    return {"status": "ready", "models": len(await state.registry.valid_models())}


def _card(state: AppState, m: StoredModel) -> ModelCard:
    return ModelCard(
        id=m.name,
        created=int(m.modified.timestamp()),
        purpose=m.purpose,
        size_bytes=m.size_bytes,
        quantization=m.facts.quantization if m.facts else None,
        context_length=m.facts.context_length if m.facts else None,
        loaded=state.registry.is_loaded(m.name),
        capabilities=m.capabilities,
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(await _state(request).metrics.service.render(), media_type=MEDIA_TYPE)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    return ModelList(data=[_card(state, m) for m in await state.registry.valid_models()])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    state = _state(request)
    return _card(state, await state.registry.find(model_id))


def _event_stream(events: EventStream) -> StreamingResponse:
    """Server-sent events; `close` ends the request after the stream, or instead of it when the
    client left before the first byte."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(events.close),
    )


@strict_json.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    service = _state(request).chat
    if body.stream:
        events = await service.stream(body, request.is_disconnected)
        return _event_stream(events)
    result = await service.complete(body, request.is_disconnected)
    return JSONResponse(result.to_json())


@strict_json.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    service = _state(request).completions
    if body.stream:
        events = await service.stream(body, request.is_disconnected)
        return _event_stream(events)
    return JSONResponse(await service.complete(body, request.is_disconnected))


@strict_json.post("/v1/responses", response_model=None)
async def responses(body: ResponseRequest, request: Request) -> Response:
    service = _state(request).responses
    if body.stream:
        events = await service.stream(body, request.is_disconnected)
        return _event_stream(events)
    return JSONResponse(await service.create(body, request.is_disconnected))


@strict_json.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    return Response(await _state(request).embeddings.embed(body), media_type="application/json")


@strict_json.post("/v1/rerank")
@strict_json.post("/rerank")
async def rerank(body: RerankRequest, request: Request) -> dict[str, Any]:
    return await _state(request).rerank.rerank(body)


@strict_json.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    return await _state(request).tokens.tokenize(body)


@strict_json.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    return await _state(request).tokens.detokenize(body)


router.include_router(strict_json)
router.include_router(ollama.router)

UNSUPPORTED = {
    "/v1/images/generations": "Image generation",
    "/v1/images/edits": "Image editing",
    "/v1/images/variations": "Image variation",
    "/v1/audio/transcriptions": "Audio transcription",
    "/v1/audio/translations": "Audio translation",
    "/v1/audio/speech": "Text to speech",
}


def _refuser(what: str) -> Callable[[], Awaitable[None]]:
    async def refuse() -> None:
        raise NotSupported(
            f"{what} is not supported by the Pendra backend (llama.cpp serves chat and embeddings only)"
        )

    return refuse


for _path, _what in UNSUPPORTED.items():
    router.add_api_route(_path, _refuser(_what), methods=["POST"], include_in_schema=False)
