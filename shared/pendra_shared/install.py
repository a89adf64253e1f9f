"""Verified installs of catalogue variants into the store: the code the CLI and the fetcher run.

One install: take the per-file lock (a second install of the same variant waits, then finds it
done), return at once if the verified file is already there, check free space, stream the bytes
into `.partial/<file>.<sha256>.part` while hashing them (resuming with HTTP Range from the bytes already
on disk, retrying transient failures with exponential backoff), verify size and SHA-256 (a mismatch
deletes the partial file), write the sidecar, and `os.replace` the GGUF into place last: a crash
at any point leaves no GGUF at its final name without the sidecar that records its verified hash.

An entry with a vision projector (`mmproj_url`) downloads it the same way, into its own partial
file, after the model and before anything is placed; a projector that fails (its checksum, its
header, a refused source) fails the whole install and leaves the store as it was. The sidecar names
the pair, and the projector is in place before the model, so a model never sits at its final name
without the projector its sidecar promises. A model already installed without the projector its
entry now names gets just the projector.

While bytes arrive, `DownloadLimits` bound them: more than the pinned size (plus slack) or, for an
entry that pins none, than `max_bytes` aborts the download at once; fewer than `stall_bytes` in
`stall_s` is a stall, retried like a cut connection. A source that misbehaves (`SourceRefused`),
a full disk (`DiskFull`) and a cancel each remove the partial file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.config import Settings
from pendra_shared.errors import (
    ChecksumMismatch,
    DiskFull,
    DownloadInterrupted,
    DownloadStalled,
    InstallCancelled,
    InstallError,
    InsufficientSpace,
    SourceRefused,
    StoreError,
    TransientDownloadError,
)
from pendra_shared.fsutil import CHUNK, atomic_write_bytes, exclusive_lock, fsync_dir, sha256_file
from pendra_shared.gguf_info import InvalidGGUF, check_projector, read_gguf_facts
from pendra_shared.names import file_name_for
from pendra_shared.sidecar import (
    FileStamp,
    ProjectorRecord,
    Sidecar,
    now_utc,
    projector_file_for,
    read_sidecar,
    read_verified_sidecar,
    sidecar_path,
    write_sidecar,
)
from pendra_shared.sources import Guard, Sources
from pendra_shared.store import ModelStore, StoredModel

if TYPE_CHECKING:
    from pendra_shared.install_metrics import InstallMetrics

logger = logging.getLogger(__name__)

# Room left on the disk beyond the download itself, so the store never fills it to the last byte.
SPACE_MARGIN = 64 * 1024 * 1024
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class DownloadLimits:
    """What a download may do; the PENDRA_DOWNLOAD_* settings and PENDRA_ALLOW_PRIVATE_SOURCES."""

    size_slack_bytes: int = 0
    max_bytes: int = 1024**4
    stall_s: float = 120.0
    stall_bytes: int = 64 * 1024
    allow_private_sources: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> DownloadLimits:
        return cls(
            size_slack_bytes=settings.download_size_slack_bytes,
            max_bytes=settings.download_max_bytes,
            stall_s=settings.download_stall_s,
            stall_bytes=settings.download_stall_bytes,
            allow_private_sources=settings.allow_private_sources,
        )

    def cap_for(self, entry: CatalogueEntry) -> int:
        """The most bytes `entry`'s download may hold."""
        if entry.size_bytes is None:
            return self.max_bytes
        return entry.size_bytes + self.size_slack_bytes

    def guard_for(self, entry: CatalogueEntry) -> Guard:
        return Guard(
            allow_private=self.allow_private_sources or entry.allow_private, read_timeout_s=self.stall_s
        )


class StallWatch:
    """Counts the bytes of one attempt in windows of `window_s`; a window that ends with fewer
    than `min_bytes` is a stall. (A source that sends nothing at all hits the read timeout, which
    `Guard.read_timeout_s` keeps at or under the window.)"""

    def __init__(self, window_s: float, min_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.min_bytes = min_bytes
        self.clock = clock
        self.started = clock()
        self.bytes = 0

    def add(self, count: int) -> None:
        self.bytes += count
        now = self.clock()
        if now - self.started < self.window_s:
            return
        if self.bytes < self.min_bytes:
            raise DownloadStalled(
                f"stalled: {self.bytes:,} bytes in {now - self.started:.0f}s "
                f"(less than {self.min_bytes:,} in {self.window_s:g}s)"
            )
        self.started, self.bytes = now, 0


@dataclass(frozen=True)
class Progress:
    """A progress report. `phase`: waiting, checking, downloading, verifying or done."""

    phase: str
    done_bytes: int = 0
    total_bytes: int | None = None
    message: str = ""


ProgressCallback = Callable[[Progress], None]


def _shifted(report: ProgressCallback, before: int, after: int) -> ProgressCallback:
    """The progress of one file of a pair as the pair's: `before` bytes done ahead of it, `after`
    to come behind it (0 where unknown)."""

    def shifted(p: Progress) -> None:
        total = None if p.total_bytes is None else before + p.total_bytes + after
        report(Progress(p.phase, before + p.done_bytes, total, p.message))

    return shifted


@dataclass(frozen=True)
class InstallResult:
    model: StoredModel
    already_installed: bool
    downloaded_bytes: int
    resumed_from: int
    attempts: int

    @property
    def size_bytes(self) -> int:
        """What is installed: the model's file and its projector's."""
        record = self.model.sidecar.projector if self.model.sidecar else None
        return self.model.size_bytes + (record.size_bytes if record and self.model.projector else 0)


class Installer:
    """Installs catalogue entries into one store. Safe across threads and processes."""

    def __init__(
        self,
        store: ModelStore,
        sources: Sources | None = None,
        *,
        retries: int = 5,
        backoff_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        limits: DownloadLimits | None = None,
        metrics: InstallMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._hashing_s: dict[Path, float] = {}  # time spent hashing a resumed partial file
        self.sources = sources or Sources()
        self.retries = retries
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.limits = limits or DownloadLimits()

    @classmethod
    def from_settings(
        cls,
        store: ModelStore,
        settings: Settings,
        sources: Sources | None = None,
        metrics: InstallMetrics | None = None,
    ) -> Installer:
        """The installer the settings describe (retries, backoff, network timeout, limits)."""
        return cls(
            store,
            sources or Sources(settings.download_timeout_s),
            retries=settings.download_retries,
            backoff_s=settings.download_backoff_s,
            limits=DownloadLimits.from_settings(settings),
            metrics=metrics,
        )

    def partial_path(self, entry: CatalogueEntry) -> Path:
        """Where `entry` downloads to: one file per target and pin, guarded by the target's lock
        (two names for the same bytes never share a partial file)."""
        return self.store.partial_dir / f"{file_name_for(entry.ref)}.{entry.gguf_sha256}.part"

    def projector_partial_path(self, entry: CatalogueEntry) -> Path:
        """Where `entry`'s projector downloads to, beside the model's partial file."""
        name = projector_file_for(file_name_for(entry.ref))
        return self.store.partial_dir / f"{name}.{entry.mmproj_sha256}.part"

    def discard_partial(self, entry: CatalogueEntry, wait: bool = True) -> bool:
        """Remove what a stopped install of `entry` left behind (its job was cancelled). With
        `wait` False, leave it when an install holds the lock: that install owns the file now.
        Returns whether it looked."""
        try:
            with exclusive_lock(
                self.store.lock_for(file_name_for(entry.ref)), should_stop=None if wait else (lambda: True)
            ):
                self._discard(entry)
                return True
        except TimeoutError:
            return False

    def install(
        self,
        entry: CatalogueEntry,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        interrupt: threading.Event | None = None,
    ) -> InstallResult:
        """Install `entry`. Setting `cancel` stops it and deletes the partial file; setting
        `interrupt` (a service shutting down) stops it and keeps the partial file to resume."""
        report = progress or (lambda _p: None)
        file_name = file_name_for(entry.ref)
        target = self.store.child(file_name)
        self.store.ensure()

        def waiting() -> None:
            report(Progress("waiting", message=f"another install of {entry.name} is running"))

        events = [e for e in (cancel, interrupt) if e is not None]
        stop = (lambda: any(e.is_set() for e in events)) if events else None
        try:
            with exclusive_lock(self.store.lock_for(file_name), on_wait=waiting, should_stop=stop):
                present = self._already_installed(entry, target, report)
                if present is not None and not self._lacks_projector(entry, present):
                    done = InstallResult(present, True, 0, 0, 0)
                    report(Progress("done", done.size_bytes, done.size_bytes, "already installed"))
                    return done
                if present is not None:
                    return self._add_projector(entry, target, report, cancel, interrupt)
                return self._download_and_place(entry, target, report, cancel, interrupt)
        except TimeoutError:
            if interrupt is not None and interrupt.is_set():
                raise DownloadInterrupted(
                    f"{entry.name}: stopped while waiting for another install"
                ) from None
            raise InstallCancelled(f"{entry.name}: install cancelled while waiting") from None

    # -- steps -------------------------------------------------------------------------------

    def _discard(self, entry: CatalogueEntry) -> None:
        """Remove the partial files of `entry` (its projector's too) and their notes."""
        partials = [self.partial_path(entry)]
        if entry.projector is not None:
            partials.append(self.projector_partial_path(entry))
        for partial in partials:
            partial.unlink(missing_ok=True)
            partial.with_suffix(".json").unlink(missing_ok=True)

    @staticmethod
    def _lacks_projector(entry: CatalogueEntry, present: StoredModel) -> bool:
        """The entry names a projector the installed model does not have (usable, of that pin)."""
        if entry.mmproj_sha256 is None:
            return False
        record = present.sidecar.projector if present.sidecar else None
        return present.projector is None or record is None or record.sha256 != entry.mmproj_sha256

    def _already_installed(
        self, entry: CatalogueEntry, target: Path, report: ProgressCallback
    ) -> StoredModel | None:
        """The installed model when the verified file is in place; None when it must download."""
        if not target.exists():
            return None
        before = target.stat()
        size = before.st_size
        sidecar, _problem = read_verified_sidecar(target)  # None if the file changed since
        if sidecar is not None and sidecar.sha256 == entry.gguf_sha256:
            return self.store.find(entry.name, include_invalid=True)
        if sidecar is not None:
            raise StoreError(
                f"{entry.name}: a different file is installed as {target.name} "
                f"(sha256 {sidecar.sha256}); uninstall it first"
            )
        # A file without a (trusted) sidecar: adopt it only if its bytes are the pinned ones.
        report(Progress("verifying", 0, size, f"checking existing {target.name}"))
        started = time.monotonic()
        digest = sha256_file(target)
        self._verified(time.monotonic() - started)
        if digest != entry.gguf_sha256:
            raise StoreError(
                f"{entry.name}: {target.name} already exists with other contents "
                f"(sha256 {digest}); move it away or uninstall it first"
            )
        old, _problem = read_sidecar(target, size)  # its projector, if any, stays paired
        projector = old.projector if old is not None and old.sha256 == digest else None
        self._write_sidecar(entry, target, digest, before, projector)  # changed while hashed: not trusted
        return self.store.find(entry.name, include_invalid=True)

    def _check_space(self, entry: CatalogueEntry, needed: int) -> None:
        free = shutil.disk_usage(self.store.root).free
        if needed + SPACE_MARGIN > free:
            raise InsufficientSpace(
                f"{entry.name}: not enough disk space in {self.store.root}: "
                f"{needed:,} bytes to download, {free:,} free"
            )

    def _download_and_place(
        self,
        entry: CatalogueEntry,
        target: Path,
        report: ProgressCallback,
        cancel: threading.Event | None,
        interrupt: threading.Event | None,
    ) -> InstallResult:
        partial = self.partial_path(entry)
        info = partial.with_suffix(".json")
        projector = entry.projector
        after = (projector.size_bytes or 0) if projector is not None else 0
        disk_full = (
            f"{entry.name}: disk full: the store's disk filled up during the install; "
            "the partial download was removed; free some space and install again"
        )
        with self._failing_for_good(entry, disk_full):
            atomic_write_bytes(
                info,
                json.dumps(
                    {
                        "name": entry.name,
                        "file": target.name,
                        "source_url": entry.gguf_url,
                        "size_bytes": entry.size_bytes,
                        "pid": os.getpid(),
                    }
                ).encode(),
            )
            model_report = _shifted(report, 0, after)
            resumed_from, downloaded, attempts = self._download(
                entry, partial, model_report, cancel, interrupt
            )
            verified = partial.stat()
            model_report(Progress("verifying", verified.st_size, verified.st_size))
            started = time.monotonic()
            try:
                facts = read_gguf_facts(partial)
            except InvalidGGUF as exc:
                self._discard(entry)
                raise InstallError(
                    f"{entry.name}: the verified download is not a usable GGUF: {exc}"
                ) from None
            self._verified(time.monotonic() - started + self._hashing_s.pop(partial, 0.0))
            if entry.purpose_from_header:  # an hf.co file: no catalogue says what it is for
                entry = entry.model_copy(update={"purpose": facts.purpose})
            paired = None
            if projector is not None:
                paired = self._fetch_projector(entry, report, cancel, interrupt, verified.st_size)
                downloaded += paired[2]
            self._place(entry, partial, target, verified, paired)
        self._discard(entry)
        result = InstallResult(
            self.store.find(entry.name, include_invalid=True), False, downloaded, resumed_from, attempts
        )
        report(Progress("done", result.size_bytes, result.size_bytes, "installed"))
        logger.info("installed %s as %s (%d bytes)", entry.name, target.name, result.size_bytes)
        return result

    @contextlib.contextmanager
    def _failing_for_good(self, entry: CatalogueEntry, disk_full: str) -> Iterator[None]:
        """An install step whose failure leaves nothing of the install behind: a cancel, a refused
        source, a checksum mismatch (of either file) or a full disk (raised as `disk_full`)."""
        try:
            yield
        except (InstallCancelled, SourceRefused, ChecksumMismatch):
            self._discard(entry)
            raise
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            self._discard(entry)
            raise DiskFull(disk_full) from None

    def _fetch_projector(
        self,
        entry: CatalogueEntry,
        report: ProgressCallback,
        cancel: threading.Event | None,
        interrupt: threading.Event | None,
        before: int,
    ) -> tuple[Path, os.stat_result, int]:
        """Download and verify `entry`'s projector into its partial file, checked to be a
        projector by its header. Returns the partial file, its stat and the bytes downloaded."""
        projector = entry.projector
        assert projector is not None
        partial = self.projector_partial_path(entry)
        shifted = _shifted(report, before, 0)
        try:
            _resumed, downloaded, _attempts = self._download(projector, partial, shifted, cancel, interrupt)
        except ChecksumMismatch as exc:
            raise ChecksumMismatch(f"{entry.name} (vision projector)", exc.expected, exc.actual) from None
        except (DownloadInterrupted, InsufficientSpace):
            raise  # both partial files stay, for the next try to resume
        except InstallError:
            self._discard(entry)  # the install failed for good: nothing of it stays
            raise
        verified = partial.stat()
        shifted(Progress("verifying", verified.st_size, verified.st_size, "checking the vision projector"))
        try:
            check_projector(partial)
        except InvalidGGUF as exc:
            self._discard(entry)
            raise InstallError(
                f"{entry.name}: the verified download of {entry.mmproj_url} is not a vision projector: {exc}"
            ) from None
        return partial, verified, downloaded

    def _add_projector(
        self,
        entry: CatalogueEntry,
        target: Path,
        report: ProgressCallback,
        cancel: threading.Event | None,
        interrupt: threading.Event | None,
    ) -> InstallResult:
        """Give an installed model the projector its entry names (installed before it had one,
        or its projector is missing or changed)."""
        with self._failing_for_good(entry, f"{entry.name}: disk full while the projector downloaded"):
            partial, verified, downloaded = self._fetch_projector(
                entry, report, cancel, interrupt, target.stat().st_size
            )
            sidecar, problem = read_verified_sidecar(target)
            if sidecar is None:
                raise StoreError(f"{entry.name}: {target.name} changed meanwhile ({problem}); try again")
            placed = self.store.child(projector_file_for(target.name))
            os.replace(partial, placed)
            record = self._projector_record(entry, placed.name, verified)
            write_sidecar(target, sidecar.model_copy(update={"projector": record}), stamp=False)
        self._discard(entry)
        result = InstallResult(self.store.find(entry.name, include_invalid=True), False, downloaded, 0, 1)
        report(Progress("done", result.size_bytes, result.size_bytes, "installed the vision projector"))
        logger.info("installed the vision projector of %s as %s", entry.name, placed.name)
        return result

    @staticmethod
    def _projector_record(entry: CatalogueEntry, file: str, verified: os.stat_result) -> ProjectorRecord:
        assert entry.mmproj_url is not None and entry.mmproj_sha256 is not None
        return ProjectorRecord(
            file=file,
            sha256=entry.mmproj_sha256,
            size_bytes=verified.st_size,
            source_url=entry.mmproj_url,
            verified_file=FileStamp.of(verified),
        )

    def _place(
        self,
        entry: CatalogueEntry,
        partial: Path,
        target: Path,
        verified: os.stat_result,
        projector: tuple[Path, os.stat_result, int] | None = None,
    ) -> None:
        """Sidecar first, then the projector, then the GGUF: whatever the moment a crash hits,
        the GGUF never sits at its final name without the record of its verified hash, nor
        without the projector that record names (a sidecar with no GGUF beside it is reported as
        orphaned and ignored, and so is a projector no model names; the next install replaces
        them). The renames keep the inodes and mtimes the stamps in the sidecar record."""
        record = None
        placed = None
        if projector is not None:
            placed = self.store.child(projector_file_for(target.name))
            record = self._projector_record(entry, placed.name, projector[1])
        self._write_sidecar(entry, target, entry.gguf_sha256, verified, record)
        try:
            if projector is not None and placed is not None:
                os.replace(projector[0], placed)
            os.replace(partial, target)
        except OSError:
            sidecar_path(target).unlink(missing_ok=True)
            if projector is not None and placed is not None and not projector[0].exists():
                placed.unlink(missing_ok=True)  # placed, but its model is not
            raise
        fsync_dir(self.store.root)

    def _download(
        self,
        entry: CatalogueEntry,
        partial: Path,
        report: ProgressCallback,
        cancel: threading.Event | None,
        interrupt: threading.Event | None,
    ) -> tuple[int, int, int]:
        """Fill `partial` with the verified bytes. Returns (resumed_from, downloaded, attempts)."""
        source = self.sources.for_url(entry.gguf_url)
        guard = self.limits.guard_for(entry)
        cap = self.limits.cap_for(entry)
        digest = hashlib.sha256()
        have = 0
        if partial.exists():  # resume: hash what is there once, then only new bytes
            have = partial.stat().st_size
            if have > cap or (entry.size_bytes is not None and have > entry.size_bytes):
                partial.unlink()
                have = 0
            else:
                started = time.monotonic()
                with partial.open("rb") as fh:
                    while chunk := fh.read(CHUNK):
                        digest.update(chunk)
                self._hashing_s[partial] = time.monotonic() - started
        resumed_from = have
        if have and entry.size_bytes in (None, have) and digest.hexdigest() == entry.gguf_sha256:
            # Verified and complete before a crash (or before its projector failed): place it.
            return resumed_from, 0, 0
        if entry.size_bytes is not None:
            self._check_space(entry, entry.size_bytes - have)
        downloaded = 0
        attempts = 0
        failures = 0
        total = entry.size_bytes
        while True:
            attempts += 1
            progressed = restarted = False
            try:
                with source.open(entry.gguf_url, have, guard) as stream:
                    if stream.start != have:  # the source starts over; so do we
                        logger.info("%s: source restarted the download from 0", entry.name)
                        digest, have, restarted = hashlib.sha256(), 0, True
                        partial.write_bytes(b"")
                    if stream.total is not None:
                        if entry.size_bytes is not None and stream.total != entry.size_bytes:
                            raise InstallError(
                                f"{entry.name}: the source has {stream.total:,} bytes but the "
                                f"catalogue pins {entry.size_bytes:,}; not downloading"
                            )
                        if stream.total > cap:
                            raise SourceRefused(self._too_big(entry, cap))
                        if total is None:
                            self._check_space(entry, stream.total - have)
                        total = stream.total
                    stall = StallWatch(self.limits.stall_s, self.limits.stall_bytes)
                    last = time.monotonic()
                    with partial.open("ab") as out:
                        report(Progress("downloading", have, total))
                        for chunk in stream.chunks:
                            if self.metrics is not None:
                                now = time.monotonic()
                                self.metrics.downloaded(entry.gguf_url, len(chunk), now - last)
                                last = now
                            if cancel is not None and cancel.is_set():
                                raise InstallCancelled(f"{entry.name}: install cancelled")
                            if interrupt is not None and interrupt.is_set():
                                raise DownloadInterrupted(
                                    f"{entry.name}: stopped at {have:,} bytes; the next try resumes there"
                                )
                            if have + len(chunk) > cap:  # checked before the write: disk never fills
                                raise SourceRefused(self._too_big(entry, cap))
                            out.write(chunk)
                            digest.update(chunk)
                            have += len(chunk)
                            downloaded += len(chunk)
                            progressed = True
                            report(Progress("downloading", have, total))
                            stall.add(len(chunk))
                        out.flush()
                        os.fsync(out.fileno())
                if restarted and not progressed:
                    continue  # the source refused our range without a body: ask again from 0
                if total is not None and have < total:
                    raise TransientDownloadError(f"connection closed at {have:,} of {total:,} bytes")
                break
            except TransientDownloadError as exc:
                # Progress earns a fresh set of retries, but a stall does not: a source that
                # trickles a few bytes per try must still run out of them.
                stalled = isinstance(exc, DownloadStalled)
                failures = 0 if progressed and not stalled else failures + 1
                if failures > self.retries:
                    raise DownloadInterrupted(
                        f"{entry.name}: download failed after {self.retries} retries: {exc}; "
                        "run the install again to resume"
                    ) from exc
                delay = self.backoff_s * (2 ** max(failures - 1, 0))
                logger.warning(
                    "%s: %s; retrying in %.1fs (resuming at %d bytes)", entry.name, exc, delay, have
                )
                report(Progress("downloading", have, total, f"retrying: {exc}"))
                if self.sleep is time.sleep and cancel is not None:
                    if cancel.wait(delay):  # a cancel ends the wait at once
                        raise InstallCancelled(f"{entry.name}: install cancelled") from None
                else:
                    self.sleep(delay)
        actual = digest.hexdigest()
        if actual != entry.gguf_sha256 or (entry.size_bytes is not None and have != entry.size_bytes):
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(entry.name, entry.gguf_sha256, actual)
        return resumed_from, downloaded, attempts

    def _verified(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.verify.observe(seconds)

    def _too_big(self, entry: CatalogueEntry, cap: int) -> str:
        if entry.size_bytes is None:
            limit = f"{cap:,} bytes (PENDRA_DOWNLOAD_MAX_BYTES, for entries that pin no size)"
        else:
            limit = f"the {entry.size_bytes:,} bytes the catalogue pins"
            if cap > entry.size_bytes:
                limit += f" (+{cap - entry.size_bytes:,} slack)"
        return f"{entry.name}: the source sends more than {limit}; download aborted and removed"

    def _write_sidecar(
        self,
        entry: CatalogueEntry,
        target: Path,
        sha256: str,
        verified: os.stat_result,
        projector: ProjectorRecord | None = None,
    ) -> None:
        """The sidecar of `target`, for the file `verified` describes (which may not be at
        `target` yet)."""
        write_sidecar(
            target,
            Sidecar(
                name=entry.name,
                purpose=entry.purpose,
                sha256=sha256,
                source_url=entry.gguf_url,
                size_bytes=verified.st_size,
                installed_at=now_utc(),
                catalogue=entry.facts(),
                projector=projector,
            ),
            verified=verified,
        )
