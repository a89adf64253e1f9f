"""Install jobs: the record every queue keeps, and the code that runs one.

The API's routes, the arq fetcher and `pendra serve`'s in-process queue all speak `Job`: the state
a client reads from `GET /api/jobs/{id}` or follows as server-sent events. `run_install_job` runs
one install in a worker thread, turns the installer's progress into job updates (at most every
`flush_s`), turns a cancel request into the installer's cancel event, and ends with the job in a
final state, or `retrying` when the network gave out and the queue should try again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel

from pendra_shared.errors import (
    ChecksumMismatch,
    DiskFull,
    DownloadInterrupted,
    DownloadStalled,
    InstallCancelled,
    InsufficientSpace,
    ModelNotFound,
    PendraError,
    SourceRefused,
    StoreError,
    UnsupportedSource,
)
from pendra_shared.install import InstallResult, Progress, ProgressCallback
from pendra_shared.sidecar import now_utc
from pendra_shared.store import ModelStore

logger = logging.getLogger(__name__)

# The arq queue, its functions and the Redis keys the API and the fetcher share.
QUEUE_NAME = "pendra:queue"
INSTALL_FUNCTION = "install_model"
UNINSTALL_FUNCTION = "uninstall_model"
# Tries of one install before it fails for good; between tries the wait doubles, up to 5 minutes.
MAX_TRIES = 8


WAITING = "waiting for a free download slot"


def retry_delay_s(attempt: int, backoff_s: float) -> float:
    """How long to wait after failed try number `attempt` (1-based) before the next."""
    return float(min(max(backoff_s, 1.0) * 2.0 ** (attempt - 1), 300.0))


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"  # waiting to try again after network trouble; the partial file is kept
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


class Job(BaseModel):
    """One install of one catalogue variant, as clients see it."""

    id: str
    kind: str = "install"
    model: str
    state: JobState = JobState.QUEUED
    phase: str | None = None
    done_bytes: int = 0
    total_bytes: int | None = None
    speed_bps: float | None = None
    message: str = ""
    error: str | None = None
    error_code: str | None = None
    attempts: int = 0
    run: str = ""  # one value per request to install; a queue's stale run of this job checks it
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None

    @classmethod
    def new(cls, model: str, total_bytes: int | None = None) -> Job:
        now = now_utc()
        return cls(
            id=job_id_for(model),
            model=model,
            total_bytes=total_bytes,
            run=uuid.uuid4().hex[:12],
            created_at=now,
            updated_at=now,
        )

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def moved(self, **changes: Any) -> Job:
        """A copy with `changes` applied and `updated_at` set to now."""
        return self.model_copy(update={**changes, "updated_at": now_utc()})

    def finished(self, state: JobState, **changes: Any) -> Job:
        now = now_utc()
        return self.model_copy(
            update={**changes, "state": state, "updated_at": now, "finished_at": now, "speed_bps": None}
        )


def job_id_for(model: str) -> str:
    """One job per variant: asking to install the same model twice gives the same job."""
    return f"install:{model}"


def queue_job_id(job: Job) -> str:
    """The queue's id for one run of `job`: unique per request, so a new request never collides
    with what is left of an earlier, finished or cancelled one."""
    return f"{job.id}@{job.run}"


# A failed job's `error_code`, for scripts and the console: the first class that matches.
ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (ChecksumMismatch, "checksum_mismatch"),
    (DiskFull, "disk_full"),  # before its parent: the disk filled mid-download
    (InsufficientSpace, "insufficient_space"),
    (UnsupportedSource, "unsupported_source"),
    (SourceRefused, "source_refused"),  # a private address, a bad redirect, an encoded body
    (DownloadStalled, "download_stalled"),
    (StoreError, "store_conflict"),
    (DownloadInterrupted, "download_interrupted"),
    (PendraError, "install_failed"),
)


def error_code_for(exc: BaseException) -> str:
    return next((code for kind, code in ERROR_CODES if isinstance(exc, kind)), "internal_error")


def next_try(job: Job, backoff_s: float) -> tuple[Job, float | None]:
    """What follows a run that ended `retrying`: the job to save, and how long to wait before the
    next try; None when the tries are used up (the job is then failed)."""
    if job.attempts >= MAX_TRIES:
        return job.finished(JobState.FAILED, message=f"gave up after {MAX_TRIES} tries"), None
    delay = retry_delay_s(job.attempts, backoff_s)
    return job.moved(message=f"retrying in {delay:.0f}s (try {job.attempts + 1} of {MAX_TRIES})"), delay


def uninstall_outcome(store: ModelStore, name: str) -> dict[str, Any]:
    """Remove a model from the store, as the queues answer it: `{"ok": True, "model", "file"}` or
    `{"ok": False, "code", "message"}` (a plain dict, so it travels through arq as well)."""
    try:
        model = store.uninstall(name)
    except ModelNotFound as exc:
        return {"ok": False, "code": "model_not_found", "message": str(exc)}
    except PendraError as exc:
        return {"ok": False, "code": "store_conflict", "message": str(exc)}
    return {"ok": True, "model": model.name, "file": model.file_name}


class JobSink(Protocol):
    """Where a running job's updates go, and where cancel requests come from. `save` refuses
    (returns False) to overwrite a finished record or one that belongs to another run."""

    async def save(self, job: Job) -> bool: ...

    async def cancel_requested(self, job_id: str) -> bool: ...


InstallFn = Callable[[ProgressCallback, threading.Event, threading.Event], InstallResult]


class SpeedMeter:
    """Bytes per second over the last few seconds of progress reports."""

    def __init__(self, window_s: float = 3.0) -> None:
        self.window_s = window_s
        self.points: deque[tuple[float, int]] = deque()

    def add(self, done_bytes: int, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        if self.points and done_bytes < self.points[-1][1]:
            self.points.clear()  # the download started over
        self.points.append((now, done_bytes))
        while len(self.points) > 2 and now - self.points[0][0] > self.window_s:
            self.points.popleft()
        (t0, b0), (t1, b1) = self.points[0], self.points[-1]
        return (b1 - b0) / (t1 - t0) if t1 - t0 >= 0.2 else None


async def run_install_job(
    job: Job,
    install: InstallFn,
    sink: JobSink,
    *,
    flush_s: float = 0.25,
    interrupted: str = "interrupted by a shutdown; the download resumes from where it stopped",
) -> Job | None:
    """Run `install` (blocking; called in a thread with a progress callback, a cancel event and an
    interrupt event) as `job`, saving its progress to `sink`. Returns the job in its last state,
    or None when the record was given to a newer request (this run then has nothing to say).

    When the record stops taking this run's updates (it was cancelled, or replaced by a newer
    request), the install stops: cancelled, it deletes its partial file; replaced, it keeps it
    for the newer run. Cancelled from outside (a service shutting down), it interrupts the
    install, which keeps its partial file, saves the job as queued with `interrupted`, and
    re-raises.
    """
    cancel, interrupt = threading.Event(), threading.Event()
    latest: list[Progress | None] = [None]  # the newest report, set from the install thread

    def on_progress(progress: Progress) -> None:
        latest[0] = progress

    meter = SpeedMeter()
    job = job.moved(
        state=JobState.RUNNING, attempts=job.attempts + 1, error=None, error_code=None, message=""
    )
    if not await sink.save(job):
        return None
    worker = asyncio.ensure_future(asyncio.to_thread(install, on_progress, cancel, interrupt))
    shown: Progress | None = None
    replaced = False
    try:
        while True:
            done, _ = await asyncio.wait({worker}, timeout=flush_s)
            if done:
                break
            p = latest[0]
            if p is not None and p is not shown:
                shown = p
                speed = meter.add(p.done_bytes) if p.phase == "downloading" else None
                job = job.moved(
                    phase=p.phase,
                    done_bytes=p.done_bytes,
                    total_bytes=p.total_bytes if p.total_bytes is not None else job.total_bytes,
                    speed_bps=speed,
                    message=p.message,
                )
                # Progress is worth little next to the download: a slow save is dropped.
                saved = await _quietly(asyncio.wait_for(sink.save(job), 2.0), "saving progress of %s", job.id)
                if saved is False and not (cancel.is_set() or interrupt.is_set()):
                    replaced = not await _quietly(sink.cancel_requested(job.id), "polling %s", job.id)
                    (interrupt if replaced else cancel).set()
                    logger.info("%s: the record moved on; stopping this run", job.id)
            if not cancel.is_set() and await _quietly(sink.cancel_requested(job.id), "polling %s", job.id):
                logger.info("%s: cancel requested", job.id)
                cancel.set()
        result = worker.result()
    except asyncio.CancelledError:
        interrupt.set()
        with contextlib.suppress(BaseException):
            await asyncio.shield(worker)
        paused = job.moved(state=JobState.QUEUED, speed_bps=None, message=interrupted)
        with contextlib.suppress(BaseException):
            await asyncio.shield(_quietly(asyncio.wait_for(sink.save(paused), 5), "saving %s", job.id))
        raise
    except InstallCancelled as exc:
        job = job.finished(JobState.CANCELLED, message=str(exc), phase=None, done_bytes=0)
    except DownloadInterrupted as exc:
        job = job.moved(state=JobState.RETRYING, error=str(exc), error_code=error_code_for(exc))
    except PendraError as exc:
        job = job.finished(JobState.FAILED, error=str(exc), error_code=error_code_for(exc))
    except Exception as exc:
        logger.exception("%s: install failed unexpectedly", job.id)
        job = job.finished(
            JobState.FAILED, error=f"internal error: {type(exc).__name__}: {exc}", error_code="internal_error"
        )
    else:
        size = result.size_bytes  # the model and its projector
        message = "already installed" if result.already_installed else "installed and verified"
        job = job.finished(JobState.DONE, phase="done", done_bytes=size, total_bytes=size, message=message)
    if replaced:
        return None  # the partial file stays for the newer run
    await sink.save(job)
    return job


async def _quietly(action: Awaitable[Any], what: str, job_id: str) -> Any:
    """Progress bookkeeping must not kill a download: log a failure (Redis restarting) and go on."""
    try:
        return await action
    except Exception as exc:
        logger.warning(what + " failed: %s", job_id, exc)
        return None
