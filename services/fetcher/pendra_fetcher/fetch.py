"""One verified install as the fetcher does it: the mirror first, then upstream, then the mirror
is filled with what was verified upstream. The foundation's `Installer` does the real work.

A vision model's projector travels the same way, as a blob of its own: taken from the mirror when
the mirror holds it, uploaded after a verified install when it does not.

The mirror never stops an install: down, refusing the credentials, holding a corrupt copy or
going away mid-download, it is logged as a warning and the install goes upstream (resuming from
the bytes the mirror gave, which share the partial file and are verified with the rest)."""

from __future__ import annotations

import logging
import threading

from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.errors import ChecksumMismatch, DownloadInterrupted, InstallCancelled, InstallError
from pendra_shared.install import Installer, InstallResult, Progress, ProgressCallback

from pendra_fetcher.mirror import S3Mirror

logger = logging.getLogger(__name__)


class Fetch:
    def __init__(self, installer: Installer, mirror: S3Mirror | None) -> None:
        self.installer = installer
        self.mirror = mirror

    def install(
        self,
        entry: CatalogueEntry,
        progress: ProgressCallback,
        cancel: threading.Event,
        interrupt: threading.Event,
    ) -> InstallResult:
        mirror = self.mirror
        if mirror is None or entry.gguf_url.startswith("s3://"):
            return self.installer.install(entry, progress, cancel, interrupt)
        if self._in_mirror(mirror, entry, entry.gguf_sha256):
            progress(Progress("checking", 0, entry.total_size_bytes, f"installing from the {mirror}"))
            update = {"gguf_url": mirror.url_for(entry.gguf_sha256)}
            if entry.mmproj_sha256 and self._in_mirror(mirror, entry, entry.mmproj_sha256):
                update["mmproj_url"] = mirror.url_for(entry.mmproj_sha256)
            mirrored = entry.model_copy(update=update)
            try:
                return self.installer.install(mirrored, progress, cancel, interrupt)
            except InstallCancelled:
                raise
            except DownloadInterrupted as exc:
                if cancel.is_set() or interrupt.is_set():
                    raise  # stopped from outside, not by the mirror
                logger.warning("%s: the mirror stopped answering (%s); going upstream", entry.name, exc)
            except ChecksumMismatch as exc:  # a bad copy: drop it, so the upstream bytes replace it
                logger.warning("%s: the mirror's copy is corrupt (%s); going upstream", entry.name, exc)
                self._drop(mirror, entry, exc.expected)
            except InstallError as exc:
                logger.warning("%s: the mirror copy failed (%s); going upstream", entry.name, exc)
        result = self.installer.install(entry, progress, cancel, interrupt)
        self._fill_mirror(mirror, entry, result)
        return result

    @staticmethod
    def _in_mirror(mirror: S3Mirror, entry: CatalogueEntry, sha256: str) -> bool:
        try:
            return mirror.has(sha256)
        except Exception as exc:  # a mirror that is down must not stop an install
            logger.warning("%s: cannot reach the %s (%s); going upstream", entry.name, mirror, exc)
            return False

    @staticmethod
    def _drop(mirror: S3Mirror, entry: CatalogueEntry, sha256: str) -> None:
        try:
            mirror.remove(sha256)
        except Exception as exc:
            logger.warning("%s: could not remove the corrupt mirror copy: %s", entry.name, exc)

    @staticmethod
    def _fill_mirror(mirror: S3Mirror, entry: CatalogueEntry, result: InstallResult) -> None:
        """Upload the verified files (the model's, its projector's) unless the mirror holds a copy
        of the same size (a corrupt copy of the same size was dropped when its checksum failed)."""
        model = result.model
        blobs = [("it", model.path, entry.gguf_sha256, model.size_bytes)]
        record = model.sidecar.projector if model.sidecar else None
        if model.projector is not None and record is not None and record.sha256 == entry.mmproj_sha256:
            blobs.append(("its vision projector", model.projector, record.sha256, record.size_bytes))
        for what, path, sha256, size in blobs:
            try:
                if mirror.size_of(mirror.bucket, mirror.key_for(sha256)) != size:
                    mirror.upload(path, sha256)
            except Exception as exc:
                logger.warning(
                    "%s: installed, but uploading %s to the %s failed: %s", entry.name, what, mirror, exc
                )
