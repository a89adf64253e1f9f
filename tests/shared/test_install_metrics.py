"""Install metrics as an operator reads them off `/metrics`: the installer's bytes, seconds and
verifies over a real HTTP source, and the jobs `pendra serve`'s queue (`LocalQueue`, the same job
code as the fetcher) counts when they end, retry or wait."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pendra_api.local_queue import LocalQueue
from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.config import Settings
from pendra_shared.install import DownloadLimits, Installer
from pendra_shared.install_metrics import InstallMetrics
from pendra_shared.jobs import Job
from pendra_shared.metrics import ServiceMetrics
from pendra_shared.sources import Sources
from pendra_shared.store import ModelStore
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GEMMA_SIZE, gemma_entry
from tests.support.ggufs import write_gguf
from tests.support.httpserver import FileServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(metrics: ServiceMetrics) -> Samples:
    """What `/metrics` would show, parsed as Prometheus parses it."""
    text = (await metrics.render()).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def tiny_entry(file_server: FileServer, name: str, **overrides: Any) -> CatalogueEntry:
    path = write_gguf(file_server.root / f"{name.replace(':', '-')}.gguf", name=name)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    fields = {"name": name, "gguf_sha256": sha, "size_bytes": path.stat().st_size, **overrides}
    return CatalogueEntry.model_validate(gemma_entry(file_server.url(path.name), **fields))


def test_bytes_are_counted_once_across_a_resume_and_the_file_verified_once(
    tmp_path: Path, served_gemma: str, file_server: FileServer
) -> None:
    metrics = ServiceMetrics()
    installer = Installer(
        ModelStore(tmp_path / "models"),
        Sources(timeout_s=10),
        retries=3,
        backoff_s=0.01,
        limits=DownloadLimits(allow_private_sources=True),
        metrics=InstallMetrics(metrics.registry),
    )
    before = asyncio.run(scrape(metrics))  # every source present from the start, at 0
    assert value(before, "pendra_install_download_bytes_total", source="upstream") == 0
    assert value(before, "pendra_install_download_bytes_total", source="mirror") == 0
    assert value(before, "pendra_install_verify_seconds_count") == 0

    file_server.faults.cut_after, file_server.faults.cuts = 100_000_000, 1  # resumed from 100 MB
    entry = CatalogueEntry.model_validate(gemma_entry(served_gemma))
    assert installer.install(entry).attempts == 2
    after = asyncio.run(scrape(metrics))
    assert value(after, "pendra_install_download_bytes_total", source="upstream") == GEMMA_SIZE
    assert value(after, "pendra_install_download_seconds_total", source="upstream") > 0
    assert value(after, "pendra_install_download_bytes_total", source="mirror") == 0
    assert value(after, "pendra_install_verify_seconds_count") == 1
    assert value(after, "pendra_install_verify_seconds_sum") > 0

    # Installed already: nothing downloaded, nothing verified again.
    assert installer.install(entry).already_installed
    assert asyncio.run(scrape(metrics)) == after


Scenario = Callable[[LocalQueue, ServiceMetrics], Awaitable[None]]


def run_queue(tmp_path: Path, scenario: Scenario, **settings: Any) -> Samples:
    """Run `scenario` on a LocalQueue as `pendra serve` builds it; what /metrics shows after."""
    metrics = ServiceMetrics()
    config = Settings(models_dir=tmp_path / "models", download_backoff_s=0.01, **settings)
    queue = LocalQueue(config, ModelStore.from_settings(config), InstallMetrics(metrics.registry))

    async def main() -> Samples:
        await queue.start()
        try:
            await asyncio.wait_for(scenario(queue, metrics), 120)
        finally:
            await queue.close()
        return await scrape(metrics)

    return asyncio.run(main())


async def wait_for(queue: LocalQueue, job_id: str, until: Callable[[Job], bool] | None = None) -> Job:
    until = until or (lambda j: j.final)
    while True:
        job = await queue.get(job_id)
        if job is not None and until(job):
            return job
        await asyncio.sleep(0.02)


def test_the_queue_counts_each_ended_job_once_with_its_error_code(
    tmp_path: Path, file_server: FileServer
) -> None:
    good = tiny_entry(file_server, "good:1")
    bad = tiny_entry(file_server, "bad:1", gguf_sha256="0" * 64)

    async def scenario(queue: LocalQueue, _metrics: ServiceMetrics) -> None:
        for entry in (good, bad):
            job, _new = await queue.submit(entry)
            await wait_for(queue, job.id)
        job, _new = await queue.submit(good)  # already installed: done again, counted again
        assert (await wait_for(queue, job.id)).state == "done"

    samples = run_queue(tmp_path, scenario)
    assert value(samples, "pendra_install_jobs_total", state="done", error_code="") == 2
    assert value(samples, "pendra_install_jobs_total", state="failed", error_code="checksum_mismatch") == 1
    assert value(samples, "pendra_install_jobs_total", state="cancelled", error_code="") == 0
    assert value(samples, "pendra_install_downloads_running") == 0
    # The bad one was downloaded too: both files' bytes, once each.
    sizes = (good.size_bytes or 0) + (bad.size_bytes or 0)
    assert value(samples, "pendra_install_download_bytes_total", source="upstream") == sizes
    assert value(samples, "pendra_install_verify_seconds_count") == 1  # the bad one never got that far


def test_the_queue_counts_retries_running_downloads_and_cancels(
    tmp_path: Path, file_server: FileServer, served_gemma: str
) -> None:
    slow = CatalogueEntry.model_validate(gemma_entry(served_gemma))
    flaky = tiny_entry(file_server, "flaky:1")

    async def scenario(queue: LocalQueue, metrics: ServiceMetrics) -> None:
        file_server.faults.throttle_s = 0.01  # the big download holds the one slot
        running, _new = await queue.submit(slow)
        await wait_for(queue, running.id, lambda j: j.done_bytes > 0)
        assert value(await scrape(metrics), "pendra_install_downloads_running") == 1
        waiting, _new = await queue.submit(flaky)  # queued behind it
        cancelled = await queue.cancel(waiting.id)  # ended here and now, counted by the queue
        assert cancelled is not None and cancelled.state == "cancelled"
        await queue.cancel(running.id)  # ended by its run, which sees the request
        assert (await wait_for(queue, running.id)).state == "cancelled"

        # Network trouble past the installer's retries (PENDRA_DOWNLOAD_RETRIES=1: two 503s end a
        # try) makes the job wait and try again: one retry, then done.
        file_server.faults.throttle_s = 0
        file_server.faults.errors_503 = 2
        again, _new = await queue.submit(flaky)
        done = await wait_for(queue, again.id)
        assert done.state == "done" and done.attempts == 2, done

    samples = run_queue(tmp_path, scenario, install_concurrency=1, download_retries=1)
    assert value(samples, "pendra_install_downloads_running") == 0
    assert value(samples, "pendra_install_jobs_total", state="cancelled", error_code="") == 2
    assert value(samples, "pendra_install_jobs_total", state="done", error_code="") == 1
    assert value(samples, "pendra_install_retries_total", error_code="download_interrupted") == 1
