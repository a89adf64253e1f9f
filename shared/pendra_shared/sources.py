"""Where install bytes come from: one `Source` per `gguf_url` scheme.

A source opens a stream at a byte offset and says where the stream really starts: at the offset
when it honoured the request (an HTTP 206), or at 0 when it did not (a server that ignores Range),
so the caller can resume or restart cleanly. Network failures and server errors are raised as
`TransientDownloadError`; anything a retry cannot cure (a 404, a missing file) as `InstallError`.
`s3://` is a seam: the fetcher registers its S3 mirror source there.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

import httpx

from pendra_shared.errors import InstallError, TransientDownloadError, UnsupportedSource
from pendra_shared.fsutil import CHUNK

_CONTENT_RANGE_RE = re.compile(r"^bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)$")
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass
class Stream:
    """An open download: bytes from `start`, of a file `total` bytes long (None: unknown).

    A `start` of 0 for a non-zero offset means "start over": the source ignored or refused the
    range, and `chunks` may be empty, in which case the caller asks again from 0.
    """

    start: int
    total: int | None
    chunks: Iterator[bytes]


class Source(Protocol):
    def open(self, url: str, offset: int) -> contextlib.AbstractContextManager[Stream]: ...


class HttpSource:
    """http:// and https:// with Range resume; one short-lived client per attempt, so nothing
    stays open between downloads."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s

    @contextlib.contextmanager
    def open(self, url: str, offset: int) -> Iterator[Stream]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            with (
                httpx.Client(
                    timeout=httpx.Timeout(self.timeout_s),
                    follow_redirects=True,
                    headers={"User-Agent": "pendra", "Accept-Encoding": "identity"},
                ) as client,
                client.stream("GET", url, headers=headers) as response,
            ):
                yield self._stream(url, offset, response)
        except httpx.TransportError as exc:  # connect, read, timeouts, cut connections
            raise TransientDownloadError(f"{type(exc).__name__}: {exc or 'connection lost'}") from exc

    def _stream(self, url: str, offset: int, response: httpx.Response) -> Stream:
        status = response.status_code
        if status in TRANSIENT_STATUS:
            raise TransientDownloadError(f"HTTP {status} from {url}")
        if status == 416 and offset:
            # Our partial is at or past the end; let the caller restart from zero.
            return Stream(start=0, total=None, chunks=iter(()))
        if status not in (200, 206):
            raise InstallError(f"HTTP {status} from {url}")
        chunks = response.iter_bytes(CHUNK)
        if status == 206:
            match = _CONTENT_RANGE_RE.match(response.headers.get("content-range", ""))
            if match is None or match.group(1) is None or int(match.group(1)) != offset:
                return Stream(start=0, total=None, chunks=iter(()))  # an odd range: restart
            total = None if match.group(3) == "*" else int(match.group(3))
            return Stream(start=offset, total=total, chunks=chunks)
        length = response.headers.get("content-length")
        return Stream(start=0, total=int(length) if length and length.isdigit() else None, chunks=chunks)


class FileSource:
    """file:// URLs, for air-gapped copies on a local or mounted disk."""

    @contextlib.contextmanager
    def open(self, url: str, offset: int) -> Iterator[Stream]:
        path = Path(unquote(urlparse(url).path))
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise InstallError(f"cannot read {path}: {exc.strerror or exc}") from None
        with fh:
            total = path.stat().st_size
            start = offset if offset <= total else 0
            fh.seek(start)
            yield Stream(start=start, total=total, chunks=iter(lambda: fh.read(CHUNK), b""))


class UnconfiguredS3Source:
    """s3:// before a mirror is configured: a clear error instead of a guess."""

    @contextlib.contextmanager
    def open(self, url: str, offset: int) -> Iterator[Stream]:
        raise UnsupportedSource(
            f"{url}: s3:// sources are served by the fetcher's S3/MinIO mirror; "
            "set PENDRA_MIRROR_URL and install through the fetcher"
        )
        yield  # pragma: no cover


class Sources:
    """Sources by URL scheme; services register more (the fetcher's S3 mirror)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        http = HttpSource(timeout_s)
        self._by_scheme: dict[str, Source] = {
            "http": http,
            "https": http,
            "file": FileSource(),
            "s3": UnconfiguredS3Source(),
        }

    def register(self, scheme: str, source: Source) -> None:
        self._by_scheme[scheme] = source

    def for_url(self, url: str) -> Source:
        scheme = urlparse(url).scheme
        source = self._by_scheme.get(scheme)
        if source is None:
            raise UnsupportedSource(f"{url}: unsupported scheme {scheme!r}")
        return source
