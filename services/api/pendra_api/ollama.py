"""Ollama's store routes on the API service: `GET /api/tags`, `POST /api/show`, `POST /api/pull`
(a catalogue install, its progress as Ollama's NDJSON), `DELETE /api/delete` and
`GET /api/version`. Ollama's model-running routes (`/api/chat`, `/api/generate`, `/api/embed`,
`/api/embeddings`, `/api/ps`) are the inference service's (`pendra_inference.ollama`), passed on
by the gateway. Pendra's own `/api` routes (`/api/models`, `/api/catalogue`, `/api/jobs`) share
no path with these, so neither changes meaning.

`/api/pull` follows the install job the way Ollama reports a pull: `pulling manifest`, then
`pulling <digest>` with `total` and `completed` bytes, `verifying sha256 digest`,
`writing manifest`, `success`; a failure is an `{"error": ...}` line. The install is a job on the
server: a client that stops reading does not cancel it (`DELETE /api/delete` does).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pendra_shared.api_errors import APIError, ModelNotFoundError
from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.errors import InvalidModelName, ModelNotFound
from pendra_shared.gguf_header import HeaderError, read_header
from pendra_shared.jobs import Job, JobState
from pendra_shared.ollama import NDJSON, OLLAMA_VERSION, capabilities, details, error_body, parse_body, tag
from pendra_shared.store import StoredModel, by_name

from pendra_api import __version__, management
from pendra_api.management import Management

router = APIRouter(prefix="/api", include_in_schema=False)
PULL_POLL_S = 0.25


def _m(request: Request) -> Management:
    m: Management = request.app.state.management
    return m


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(message), status_code=status)


async def _name(request: Request) -> str:
    """The model a body names (the body is kept on the request for the route)."""
    try:
        body, name = parse_body(await request.body())
    except ValueError as exc:
        raise _Refused(400, str(exc)) from None
    request.state.ollama_body = body
    return name


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _stored(request: Request, name: str) -> StoredModel:
    scan = await asyncio.to_thread(_m(request).store.scan)
    model = by_name(scan.valid, name)
    if model is None:
        raise _Refused(404, f"model '{name}' not found")
    return model


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_VERSION, "pendra": __version__}


@router.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    scan = await asyncio.to_thread(_m(request).store.scan)
    return {"models": [tag(model) for model in scan.valid]}


def _model_info(model: StoredModel) -> dict[str, Any]:
    facts = model.facts
    if facts is None:
        return {}
    arch = facts.architecture
    info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": facts.parameters}
    if facts.context_length:
        info[f"{arch}.context_length"] = facts.context_length
    if facts.embedding_length:
        info[f"{arch}.embedding_length"] = facts.embedding_length
    return info


def _template(model: StoredModel) -> str:
    try:
        value = read_header(model.path).metadata.get("tokenizer.chat_template", "")
    except (HeaderError, OSError):
        return ""
    return value if isinstance(value, str) else ""


def _projector_info(projector: Path) -> dict[str, Any]:
    """What Ollama's `projector_info` holds: the projector header's `general.architecture` and its
    `clip.*` numbers and flags."""
    try:
        metadata = read_header(projector).metadata
    except (HeaderError, OSError):
        return {}
    return {
        key: value
        for key, value in metadata.items()
        if (key == "general.architecture" or key.startswith("clip."))
        and isinstance(value, str | int | float | bool)
    }


@router.post("/show")
async def show(request: Request) -> Response:
    try:
        model = await _stored(request, await _name(request))
    except _Refused as exc:
        return _error(exc.status, exc.message)
    facts = model.facts
    body = {
        "modelfile": f"# Served by Pendra from its models directory\nFROM {model.file_name}\n",
        "parameters": "",
        "template": await asyncio.to_thread(_template, model),
        "license": (facts.license if facts else None) or "",
        "details": details(model),
        "model_info": _model_info(model),
        "capabilities": capabilities(model),
        "modified_at": model.modified.isoformat(),
    }
    if model.projector is not None:
        body["projector_info"] = await asyncio.to_thread(_projector_info, model.projector)
    return JSONResponse(body)


@router.delete("/delete")
async def delete(request: Request) -> Response:
    try:
        name = await _name(request)
        await management.uninstall(name, request)
    except _Refused as exc:
        return _error(exc.status, exc.message)
    except ModelNotFoundError:
        return _error(404, f"model '{name}' not found")
    except APIError as exc:
        return _error(exc.status, exc.message)
    return Response(status_code=200)


def _progress(entry: CatalogueEntry, job: Job, said: set[str]) -> list[dict[str, Any]]:
    """The Ollama lines for a job's state that were not said yet (byte counts always are)."""
    lines: list[dict[str, Any]] = []
    total = job.total_bytes or entry.size_bytes or job.done_bytes
    pulled = job.phase == "verifying" or job.state is JobState.DONE
    if job.phase in ("downloading", "checking") or (pulled and "pulled" not in said):
        lines.append(
            {
                "status": f"pulling {entry.gguf_sha256[:12]}",
                "digest": f"sha256:{entry.gguf_sha256}",
                "total": total,
                "completed": total if pulled else job.done_bytes,
            }
        )
    if pulled and "pulled" not in said:
        said.add("pulled")
        lines.append({"status": "verifying sha256 digest"})
    return lines


@router.post("/pull")
async def pull(request: Request) -> Response:
    m = _m(request)
    try:
        name = await _name(request)
        entry = await management.resolve_install(m, name)  # catalogue names, and hf.co/ where allowed
    except _Refused as exc:
        return _error(exc.status, exc.message)
    except InvalidModelName as exc:
        return _error(400, str(exc))
    except ModelNotFound as exc:
        return _error(404, f"pull model manifest: {exc}")
    except APIError as exc:
        return _error(exc.status, exc.message)
    job, _created = await m.queue.submit(entry)
    stream = request.state.ollama_body.get("stream", True) is not False

    async def follow() -> AsyncIterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        said: set[str] = set()
        current: Job | None = job
        last = None
        while current is not None:
            for line in _progress(entry, current, said):
                if line != last:
                    last = line
                    yield line
            if current.final:
                break
            await asyncio.sleep(PULL_POLL_S)
            current = await m.queue.get(job.id)
        if current is not None and current.state is JobState.DONE:
            yield {"status": "writing manifest"}
            yield {"status": "success"}
        elif current is not None and current.state is JobState.CANCELLED:
            yield error_body("the download was cancelled")
        else:
            reason = current.error if current is not None else "the install job was lost"
            code = f" ({current.error_code})" if current is not None and current.error_code else ""
            yield error_body(f"{reason}{code}")

    if not stream:
        lines = [line async for line in follow()]
        final = lines[-1]
        return JSONResponse(final, status_code=500 if "error" in final else 200)

    async def ndjson() -> AsyncIterator[bytes]:
        async for line in follow():
            yield json.dumps(line).encode() + b"\n"

    return StreamingResponse(ndjson(), media_type=NDJSON)
