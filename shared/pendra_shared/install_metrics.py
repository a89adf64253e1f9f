"""Install metrics: jobs that ended (wherever their final record is written: the fetcher, the API
cancelling a queued job, `pendra serve`'s queue), and what the installer did (bytes from upstream
or the mirror, seconds downloading and verifying, retries, lease takeovers).

`JobMetrics` is what every queue's owner needs; `InstallMetrics` adds what the process that runs
installs measures. Both are registered on a `ServiceMetrics` registry (see metrics.py).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pendra_shared.jobs import ERROR_CODES, Job, JobState
from pendra_shared.metrics import DURATION_BUCKETS


class JobMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "pendra_install_jobs",
            "Install jobs that ended: done, failed (with its error code), cancelled.",
            ["state", "error_code"],
            registry=registry,
        )
        # Present from the start, so that the first of each shows as an increase, not as a new
        # series (the error codes are a fixed set).
        for state in ("done", "cancelled"):
            self.jobs.labels(state, "")
        for code in {code for _kind, code in ERROR_CODES} | {"internal_error", "job_lost"}:
            self.jobs.labels("failed", code)

    def ended(self, job: Job) -> None:
        """`job`'s final record was written (call once per job run)."""
        code = (job.error_code or "internal_error") if job.state == JobState.FAILED else ""
        self.jobs.labels(job.state.value, code).inc()


class InstallMetrics(JobMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.running = Gauge(
            "pendra_install_downloads_running", "Installs this fetcher runs now.", registry=registry
        )
        self.bytes = Counter(
            "pendra_install_download_bytes",
            "Bytes downloaded, from `upstream` or from the `mirror`.",
            ["source"],
            registry=registry,
        )
        self.seconds = Counter(
            "pendra_install_download_seconds",
            "Seconds spent downloading; bytes over seconds is the throughput while downloading.",
            ["source"],
            registry=registry,
        )
        for source in ("upstream", "mirror"):
            self.bytes.labels(source)
            self.seconds.labels(source)
        self.verify = Histogram(
            "pendra_install_verify_seconds",
            "Time spent verifying beyond the download: hashing bytes already on disk (a resumed or "
            "adopted file) and checking the GGUF header.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "pendra_install_retries",
            "Install tries that failed with network trouble and are tried again.",
            ["error_code"],
            registry=registry,
        )
        self.takeovers = Counter(
            "pendra_install_lease_takeovers",
            "Jobs taken over from a fetcher that stopped renewing its lease.",
            registry=registry,
        )

    def downloaded(self, url: str, nbytes: int, seconds: float) -> None:
        source = "mirror" if url.startswith("s3://") else "upstream"
        self.bytes.labels(source).inc(nbytes)
        self.seconds.labels(source).inc(seconds)

    def retried(self, job: Job) -> None:
        self.retries.labels(job.error_code or "download_interrupted").inc()
