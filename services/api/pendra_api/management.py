"""`/api/*`: model management, the console's API. Installs are jobs on the install queue; the
store itself is read here directly (the gateway mounts the shared volume read-only)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pendra_shared.api_errors import (
    BadGateway,
    Conflict,
    Forbidden,
    InvalidRequest,
    ModelNotFoundError,
    NotFound,
    UpstreamUnavailable,
)
from pendra_shared.catalogue import Catalogue, CatalogueEntry
from pendra_shared.errors import (
    InvalidModelName,
    ModelNotFound,
    PendraError,
    SourceRefused,
    TransientDownloadError,
)
from pendra_shared.gguf_info import PURPOSES
from pendra_shared.hf import DEFAULT_ENDPOINT, parse_hf_ref
from pendra_shared.hf import resolve as resolve_hf
from pendra_shared.http_guard import Draining
from pendra_shared.jobs import Job, JobState
from pendra_shared.metrics import ServiceMetrics
from pendra_shared.sidecar import now_utc
from pendra_shared.store import ModelStore
from prometheus_client import Gauge
from pydantic import BaseModel, ConfigDict

from pendra_api.console.system import SystemProbe
from pendra_api.queue import InstallQueue

router = APIRouter(prefix="/api")

EVENT_POLL_S = 0.25
KEEPALIVE_S = 15.0
CANCEL_WAIT_S = 30.0  # an uninstall waits this long for the install it cancels to stop


@dataclass
class Management:
    catalogue: Catalogue
    store: ModelStore
    queue: InstallQueue
    system: SystemProbe | None = None  # the inference side's status and metrics, for the console
    allow_hf: bool = False  # hf.co/ installs asked through the API (PENDRA_ALLOW_HF=true)
    hf_endpoint: str = DEFAULT_ENDPOINT


class InstallRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str


def _m(request: Request) -> Management:
    management: Management = request.app.state.management
    return management


def _job_json(job: Job) -> dict[str, Any]:
    return job.model_dump(mode="json")


@router.get("/catalogue")
async def catalogue(
    request: Request,
    q: str = Query("", description="Words to find in names and descriptions."),
    purpose: str | None = Query(None, description="chat, embedding, rerank, image or transcription."),
) -> dict[str, Any]:
    m = _m(request)
    if purpose is not None and purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
    installed = {model.name for model in (await asyncio.to_thread(m.store.scan)).valid}
    return {
        "object": "list",
        "data": [{**e.facts(), "installed": e.name in installed} for e in m.catalogue.search(q, purpose)],
    }


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    """What is in the store, with status (ready, invalid), and what is being installed."""
    m = _m(request)
    scan = await asyncio.to_thread(m.store.scan)
    data = [{**model.as_dict(), "capabilities": model.capabilities} for model in scan.models]
    present = {model.name for model in scan.models}
    for job in await m.queue.jobs():
        if not job.final and job.model not in present:
            data.append({"name": job.model, "status": "installing", "job": _job_json(job)})
    return {"object": "list", "models_dir": str(m.store.root), "data": data, "problems": scan.problems}


async def resolve_install(m: Management, name: str) -> CatalogueEntry:
    """A catalogue name, or (where allowed) an hf.co/ reference resolved on the Hub."""
    ref = parse_hf_ref(name)
    if ref is None:
        return m.catalogue.resolve(name)
    if not m.allow_hf:
        raise Forbidden(
            "hf.co installs are off on this server: its operator allows them with PENDRA_ALLOW_HF=true",
            param="model",
            code="hf_not_allowed",
        )
    try:
        return await asyncio.to_thread(resolve_hf, ref, m.hf_endpoint)
    except TransientDownloadError as exc:
        raise UpstreamUnavailable(f"the Hugging Face API did not answer: {exc}") from None
    except SourceRefused as exc:
        raise Forbidden(str(exc), param="model", code="source_refused") from None
    except PendraError as exc:
        if isinstance(exc, ModelNotFound | InvalidModelName):
            raise
        raise BadGateway(f"the Hugging Face API: {exc}") from None


@router.post("/models/install", status_code=202)
async def install(body: InstallRequest, request: Request) -> JSONResponse:
    m = _m(request)
    try:
        entry = await resolve_install(m, body.model)
    except InvalidModelName as exc:
        raise InvalidRequest(str(exc), param="model", code="invalid_model_name") from None
    except ModelNotFound as exc:
        raise ModelNotFoundError(str(exc), param="model") from None
    job, _created = await m.queue.submit(entry)
    return JSONResponse(_job_json(job), status_code=202, headers={"Location": f"/api/jobs/{job.id}"})


@router.delete("/models/{name}")
async def uninstall(name: str, request: Request) -> dict[str, Any]:
    """Remove a model. One still being installed has its install cancelled first (the partial
    download goes with it), so "Uninstall" means the same whatever state the model is in."""
    m = _m(request)
    cancelled = None
    for job in await m.queue.jobs():
        if job.model == name and not job.final:
            await m.queue.cancel(job.id)
            deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_S
            while (current := await m.queue.get(job.id)) is not None and not current.final:
                if asyncio.get_running_loop().time() > deadline:
                    raise Conflict(f"the install of {name} (job {job.id}) did not stop in time; retry")
                await asyncio.sleep(0.2)
            cancelled = job.id
    result = await m.queue.uninstall(name)
    if not result["ok"]:
        if result["code"] == "model_not_found" and cancelled is not None:
            return {"id": name, "object": "model", "deleted": True, "file": None, "cancelled_job": cancelled}
        if result["code"] == "model_not_found":
            raise ModelNotFoundError(result["message"])
        raise Conflict(result["message"])
    body = {"id": result["model"], "object": "model", "deleted": True, "file": result["file"]}
    return {**body, "cancelled_job": cancelled} if cancelled else body


@router.get("/jobs")
async def jobs(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_job_json(j) for j in await _m(request).queue.jobs()]}


def _event(job: Job) -> str:
    return f"event: {job.state.value if job.final else 'progress'}\ndata: {job.model_dump_json()}\n\n"


@router.get("/jobs/events")
async def all_events(request: Request) -> StreamingResponse:
    """Server-sent events for every job on one connection (a browser holds only a few per
    server): first each job not yet ended, then each change to any job, a final event named after
    its end state (`done`, `failed`, `cancelled`) when one ends. It stays open until the client
    leaves or the server begins to shut down (the console then follows again)."""
    queue = _m(request).queue
    stopping: asyncio.Event = request.scope.get(Draining.SCOPE_KEY) or asyncio.Event()

    async def stream() -> AsyncIterator[str]:
        sent: dict[str, str] = {}
        opened = now_utc()  # jobs that ended before the client came are not news to it
        quiet = 0.0
        while not stopping.is_set():
            try:
                current = await queue.jobs()
            except UpstreamUnavailable:
                current = None  # Redis restarting: ask again
            changed = False
            for job in current or ():
                body = job.model_dump_json()
                if sent.get(job.id) == body or (job.finished_at is not None and job.finished_at < opened):
                    sent[job.id] = body
                    continue
                sent[job.id] = body
                changed = True
                yield _event(job)
            if current is not None:
                alive = {job.id for job in current}
                sent = {job_id: body for job_id, body in sent.items() if job_id in alive}
            if changed:
                quiet = 0.0
            elif quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(EVENT_POLL_S)
            quiet += EVENT_POLL_S

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _job(request: Request, job_id: str) -> Job:
    job = await _m(request).queue.get(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    return job


@router.get("/jobs/{job_id}")
async def job(job_id: str, request: Request) -> dict[str, Any]:
    return _job_json(await _job(request, job_id))


@router.post("/jobs/{job_id}/cancel")
async def cancel(job_id: str, request: Request) -> dict[str, Any]:
    await _job(request, job_id)
    job = await _m(request).queue.cancel(job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    return _job_json(job)


@router.get("/jobs/{job_id}/events")
async def events(job_id: str, request: Request) -> StreamingResponse:
    """Server-sent events: `progress` whenever the job changes, then one final event named after
    its end state (`done`, `failed`, `cancelled`), then the stream closes."""
    first = await _job(request, job_id)
    queue = _m(request).queue

    async def stream() -> AsyncIterator[str]:
        job: Job | None = first
        sent: str | None = None
        quiet = 0.0
        while job is not None:
            body = job.model_dump_json()
            if body != sent:
                sent, quiet = body, 0.0
                yield _event(job)
                if job.final:
                    return
            elif quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(EVENT_POLL_S)
            quiet += EVENT_POLL_S
            try:
                job = await queue.get(job_id)
            except UpstreamUnavailable:
                continue  # Redis restarting: keep the stream open and ask again
        gone = {"id": job_id, "state": "failed", "error": "the job record is gone", "error_code": "job_lost"}
        yield f"event: failed\ndata: {json.dumps(gone)}\n\n"

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)


def count_active_jobs(app: Any, metrics: ServiceMetrics) -> None:
    """`pendra_install_jobs_active`, counted from the queue's job records (`app.state.management`,
    once the app has started) before each scrape; all three states always present, so a dashboard
    shows 0 rather than no data."""
    gauge = Gauge(
        "pendra_install_jobs_active",
        "Install jobs not yet ended, by state (queued, running, retrying), from the job records.",
        ["state"],
        registry=metrics.registry,
    )
    for state in ACTIVE_STATES:
        gauge.labels(state.value).set(0)

    async def refresh() -> None:
        m: Management | None = getattr(app.state, "management", None)
        if m is None:
            return
        counts = Counter(job.state for job in await m.queue.jobs())
        for state in ACTIVE_STATES:
            gauge.labels(state.value).set(counts.get(state, 0))

    metrics.on_scrape(refresh)
