"""Where install bytes come from: one `Source` per `gguf_url` scheme, and what a source may reach.

A source opens a stream at a byte offset and says where the stream really starts: at the offset
when it honoured the request (an HTTP 206), or at 0 when it did not (a server that ignores Range),
so the caller can resume or restart cleanly. Network failures and server errors are raised as
`TransientDownloadError`; anything a retry cannot cure (a 404, a missing file) as `InstallError`.
`s3://` is a seam: the fetcher registers its S3 mirror source there.

A catalogue URL is only where a download starts, so http(s) sources guard every step after it:
- redirects are followed by Pendra, at most `MAX_REDIRECTS` hops, each to http or https only and
  never from https down to http;
- every connection goes through `CheckedBackend`, which resolves the host once, refuses it when any
  of its addresses is not public (loopback, private, link-local, CGNAT, multicast, reserved,
  unspecified, cloud metadata) unless `Guard.allow_private`, and then connects to exactly the
  addresses it checked, so a second DNS answer (rebinding) is never used;
- bytes arrive as sent: `Accept-Encoding: identity`, read raw, and a response with any other
  Content-Encoding is refused, so a small compressed body cannot expand on disk.
file:// reads regular files only (a FIFO or a device would block or never end). The refusals are
`SourceRefused`, a permanent error; its messages name no resolved address, local path or body.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import httpcore
import httpx

from pendra_shared.errors import (
    DownloadStalled,
    InstallError,
    SourceRefused,
    TransientDownloadError,
    UnsupportedSource,
)
from pendra_shared.fsutil import CHUNK

_CONTENT_RANGE_RE = re.compile(r"^bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)$")
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_REDIRECTS = 10
HINT = "set PENDRA_ALLOW_PRIVATE_SOURCES=true, or allow_private: true on the catalogue entry, to allow it"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Named for the message; the ranges below hold them too (link-local, CGNAT, fc00::/7).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass
class Stream:
    """An open download: bytes from `start`, of a file `total` bytes long (None: unknown).

    A `start` of 0 for a non-zero offset means "start over": the source ignored or refused the
    range, and `chunks` may be empty, in which case the caller asks again from 0.
    """

    start: int
    total: int | None
    chunks: Iterator[bytes]


@dataclass(frozen=True)
class Guard:
    """What one open may do. `allow_private`: connect to addresses that are not public.
    `read_timeout_s`: the longest wait for the next bytes (None: the source's own timeout)."""

    allow_private: bool = False
    read_timeout_s: float | None = None


class Source(Protocol):
    def open(self, url: str, offset: int, guard: Guard) -> contextlib.AbstractContextManager[Stream]: ...


# -- addresses -------------------------------------------------------------------------------------


def address_refusal(address: IPAddress) -> str | None:
    """Why an install may not connect to `address`, as a kind ("loopback", "private", ...); None
    when it is a public address. IPv6 forms that carry an IPv4 address are judged by that."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return address_refusal(embedded)
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    for kind, flag in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if flag:
            return kind
    return None if address.is_global else "non-public"  # CGNAT 100.64/10 and the like


Resolver = Callable[[str, int], list[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, each once, in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class CheckedBackend(httpcore.NetworkBackend):
    """httpcore's network backend with the address check in `connect_tcp`: the host is resolved
    here, once; every address is checked before any connection is tried; and the connection goes
    to one of those same addresses (TLS still verifies and sends SNI for the URL's host, which
    httpcore handles above this layer)."""

    def __init__(self, allow_private: bool, resolve: Resolver = resolve_host) -> None:
        self.allow_private = allow_private
        self.resolve = resolve
        self._tcp = httpcore.SyncBackend()

    def checked_addresses(self, host: str, port: int) -> list[str]:
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        try:
            addresses = [host] if literal is not None else self.resolve(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve {host}: no addresses")
        if self.allow_private:
            return addresses
        for address in addresses:
            kind = address_refusal(ipaddress.ip_address(address))
            if kind is not None:
                what = f"{host} is a {kind} address" if literal else f"{host} resolves to a {kind} address"
                raise SourceRefused(f"not connecting: {what}; installs reach public addresses only; {HINT}")
        return addresses

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        failure: Exception | None = None
        for address in self.checked_addresses(host, port):
            try:
                return self._tcp.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise SourceRefused("downloads do not use unix sockets")

    def sleep(self, seconds: float) -> None:
        self._tcp.sleep(seconds)


class CheckedTransport(httpx.HTTPTransport):
    """httpx's transport with its connection pool on a `CheckedBackend`. No proxy from the
    environment: a proxy would resolve the host itself, out of the check's reach."""

    def __init__(self, backend: CheckedBackend, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, trust_env=False)
        self._pool = httpcore.ConnectionPool(ssl_context=ssl_context, network_backend=backend)


# -- sources -----------------------------------------------------------------------------------------


class HttpSource:
    """http:// and https:// with Range resume; one short-lived client per attempt, so nothing
    stays open between downloads."""

    def __init__(self, timeout_s: float = 30.0, resolve: Resolver = resolve_host) -> None:
        self.timeout_s = timeout_s
        self.resolve = resolve
        self._ssl_context: ssl.SSLContext | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS settings httpx would use (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), made once."""
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context(trust_env=True)
        return self._ssl_context

    @contextlib.contextmanager
    def open(self, url: str, offset: int, guard: Guard) -> Iterator[Stream]:
        headers = {"User-Agent": "pendra", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        read_s = min(self.timeout_s, guard.read_timeout_s or self.timeout_s)
        transport = CheckedTransport(CheckedBackend(guard.allow_private, self.resolve), self.ssl_context())
        try:
            with (
                httpx.Client(
                    transport=transport,
                    timeout=httpx.Timeout(self.timeout_s, read=read_s),
                    follow_redirects=False,
                    trust_env=False,
                    headers=headers,
                ) as client,
                self._final_response(client, url) as response,
            ):
                yield self._stream(url, offset, response)
        except httpx.UnsupportedProtocol:  # a TransportError, but no retry makes it work
            raise SourceRefused(f"{url}: not an http(s) URL") from None
        except httpx.ReadTimeout as exc:  # nothing at all for the read timeout: a stall
            raise DownloadStalled(f"stalled: nothing received in {read_s:g}s") from exc
        except httpx.TransportError as exc:  # connect, read, timeouts, cut connections
            raise TransientDownloadError(f"{type(exc).__name__}: {exc or 'connection lost'}") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise InstallError(f"{url}: {type(exc).__name__}") from None

    @contextlib.contextmanager
    def _final_response(self, client: httpx.Client, url: str) -> Iterator[httpx.Response]:
        """The response at the end of the redirects, each hop checked before it is requested."""
        current = httpx.URL(url)
        for _hop in range(MAX_REDIRECTS + 1):
            response = client.send(client.build_request("GET", current), stream=True)
            if not response.has_redirect_location:
                try:
                    yield response
                finally:
                    response.close()
                return
            response.close()
            current = _next_hop(url, current, response.headers["location"])
        raise SourceRefused(f"{url}: more than {MAX_REDIRECTS} redirects (a redirect loop?); not following")

    def _stream(self, url: str, offset: int, response: httpx.Response) -> Stream:
        status = response.status_code
        if status in TRANSIENT_STATUS:
            raise TransientDownloadError(f"HTTP {status} from {url}")
        if status == 416 and offset:
            # Our partial is at or past the end; let the caller restart from zero.
            return Stream(start=0, total=None, chunks=iter(()))
        if status not in (200, 206):
            raise InstallError(f"HTTP {status} from {url}")
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise SourceRefused(
                f"{url}: the server sent the file with Content-Encoding {encoding[:32]!r}; "
                "downloads take the bytes as stored (identity) only"
            )
        chunks = response.iter_raw()  # each network read as it arrives, never decoded
        if status == 206:
            match = _CONTENT_RANGE_RE.match(response.headers.get("content-range", ""))
            if match is None or match.group(1) is None or int(match.group(1)) != offset:
                return Stream(start=0, total=None, chunks=iter(()))  # an odd range: restart
            total = None if match.group(3) == "*" else int(match.group(3))
            return Stream(start=offset, total=total, chunks=chunks)
        length = response.headers.get("content-length")
        return Stream(start=0, total=int(length) if length and length.isdigit() else None, chunks=chunks)


def _next_hop(url: str, current: httpx.URL, location: str) -> httpx.URL:
    """Where a redirect from `current` leads, when Pendra may follow it (`url`: the catalogue's)."""
    try:
        target = current.join(location)
    except httpx.InvalidURL:
        raise SourceRefused(f"{url}: redirected to an unusable location; not following") from None
    if target.scheme not in ("http", "https"):
        scheme = target.scheme[:16]
        raise SourceRefused(f"{url}: redirected to a {scheme}: URL; only http(s) redirects are followed")
    if current.scheme == "https" and target.scheme == "http":
        raise SourceRefused(f"{url}: redirected from https to plain http; not following the downgrade")
    return target


class FileSource:
    """file:// URLs, for air-gapped copies on a local or mounted disk. Regular files only: the
    open does not block (O_NONBLOCK: a FIFO with no writer would wait forever), and what it
    opened is checked before a byte is read."""

    @contextlib.contextmanager
    def open(self, url: str, offset: int, guard: Guard) -> Iterator[Stream]:
        path = Path(unquote(urlparse(url).path))
        flags = os.O_RDONLY
        for extra in ("O_NONBLOCK", "O_NOCTTY", "O_BINARY"):  # those this OS has
            flags |= getattr(os, extra, 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise InstallError(f"the file:// source cannot be read ({exc.strerror or 'error'})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SourceRefused("the file:// source is not a regular file (a directory, device or pipe)")
            fh = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with fh:
            total = info.st_size
            start = offset if offset <= total else 0
            fh.seek(start)
            yield Stream(start=start, total=total, chunks=iter(lambda: fh.read(CHUNK), b""))


class UnconfiguredS3Source:
    """s3:// before a mirror is configured: a clear error instead of a guess."""

    @contextlib.contextmanager
    def open(self, url: str, offset: int, guard: Guard) -> Iterator[Stream]:
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
