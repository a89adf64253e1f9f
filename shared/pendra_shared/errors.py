"""The exceptions Pendra's core raises, one tree, each with a message fit to show a user.

PendraError
├── ConfigError                 a setting or the config file is unusable
├── CatalogueError              a catalogue file or entry is malformed
├── InvalidModelName            a name that is not `family[:tag]` of safe characters
├── ModelNotFound               no such model in the store or the catalogue
├── StoreError                  the store cannot do what was asked (conflict, unsafe path)
└── InstallError                an install failed
    ├── ChecksumMismatch        the bytes did not hash to the pinned SHA-256 (permanent)
    ├── InsufficientSpace       not enough free disk for the download
    │   └── DiskFull            the disk filled up during the download; the partial file is gone
    ├── UnsupportedSource       a `gguf_url` scheme this process cannot fetch
    ├── SourceRefused           the source did what no install accepts (permanent; partial gone)
    ├── InstallCancelled        the install was cancelled; its partial file is gone
    ├── DownloadInterrupted     retries ran out on network trouble; the partial file is kept
    └── TransientDownloadError  network trouble that a retry may cure
        └── DownloadStalled     too few bytes arrived in the stall window
"""

from __future__ import annotations


class PendraError(Exception):
    """Base of every error Pendra reports to a user."""


class ConfigError(PendraError):
    """A setting or the config file is unusable."""


class CatalogueError(PendraError):
    """A catalogue file or one of its entries is malformed."""


class InvalidModelName(PendraError, ValueError):
    """A model name is not `family[:tag]` made of safe characters (a ValueError too, so pydantic
    validators report it as a field error)."""


class ModelNotFound(PendraError):
    """No model of that name is in the store (or in the catalogue)."""


class StoreError(PendraError):
    """The store cannot do what was asked without losing or escaping something."""


class InstallError(PendraError):
    """An install did not complete."""


class ChecksumMismatch(InstallError):
    """The downloaded bytes do not hash to the pinned SHA-256."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{name}: checksum mismatch: expected sha256 {expected}, got {actual}; the download was deleted"
        )
        self.expected = expected
        self.actual = actual


class InsufficientSpace(InstallError):
    """The store's disk has less free space than the download needs."""


class UnsupportedSource(InstallError):
    """The `gguf_url` uses a scheme this process cannot fetch."""


class InstallCancelled(InstallError):
    """The install was cancelled and its partial file removed."""


class DownloadInterrupted(InstallError):
    """The download kept failing on network trouble; its partial file stays for a later resume."""


class TransientDownloadError(InstallError):
    """A network failure or server error that a later attempt may get past."""


class DiskFull(InsufficientSpace):
    """The store's disk filled up while the download was written; the partial file was removed to
    give the space back."""


class SourceRefused(InstallError):
    """The source did something an install never accepts: a redirect off http(s), to plain http
    from https or round in a loop; an address that is not public; a compressed body; more bytes
    than the catalogue pins; a file:// path that is not a regular file. Permanent: no retry."""


class DownloadStalled(TransientDownloadError):
    """Fewer than PENDRA_DOWNLOAD_STALL_BYTES arrived in PENDRA_DOWNLOAD_STALL_S: dropped and
    retried (resuming); a stall counts against the retries even when some bytes came."""
