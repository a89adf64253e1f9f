"""Installs from sources that attack the installer (hardening.md F5-F7, C2-C9, C12, C13, C15,
F-1, F-9): redirects to file:// or round in a loop, private and metadata addresses, https
downgrades, gzip bombs, endless and trickling bodies, FIFOs and devices as file:// sources, a disk
that fills mid-download, a crash between the sidecar and the GGUF, a mirror that is down.

Every server here is real (loopback sockets, a real tmpfs, a real S3 server); nothing of httpx is
mocked. Where a test needs loopback to count as public (to show that a *later* hop is checked),
it says so by replacing Pendra's own address rule, never the network.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pendra_shared import sources
from pendra_shared.catalogue import Catalogue, CatalogueEntry
from pendra_shared.config import load_settings
from pendra_shared.errors import (
    CatalogueError,
    DiskFull,
    DownloadInterrupted,
    InstallCancelled,
    InstallError,
    SourceRefused,
    TransientDownloadError,
)
from pendra_shared.install import Installer, Progress
from pendra_shared.jobs import error_code_for
from pendra_shared.sidecar import sidecar_path
from pendra_shared.sources import HttpSource, Sources
from pendra_shared.store import ModelStore
from pydantic import ValidationError

from tests.conftest import gemma_entry
from tests.support.ggufs import write_gguf
from tests.support.httpserver import FileServer, HostileServer
from tests.support.server import free_port
from tests.support.tmpfs import small_tmpfs

ANY_SHA = "ab" * 32


# -- helpers -----------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    server = HostileServer().start()
    yield server
    server.stop()


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[bytes, str]:
    """A small valid GGUF: its bytes and sha256."""
    data = write_gguf(tmp_path / "tiny-src.gguf", tensors=8).read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def entry(url: str, sha: str = ANY_SHA, size: int | None = 1_000_000, **extra: Any) -> CatalogueEntry:
    return CatalogueEntry.model_validate(
        {"name": "hostile:v1", "purpose": "chat", "gguf_url": url, "gguf_sha256": sha, "size_bytes": size}
        | extra
    )


def installer(store: ModelStore, source: Sources | None = None, **settings: Any) -> Installer:
    """An installer built the way the services build theirs, from settings: no retries, quick
    backoff, short timeouts, and loopback refused unless a test allows it."""
    values: dict[str, Any] = {
        "models_dir": store.root,
        "download_retries": 0,
        "download_backoff_s": 0.01,
        "download_timeout_s": 5,
        "allow_private_sources": False,
    }
    return Installer.from_settings(store, load_settings(**(values | settings)), source)


def leftovers(store: ModelStore) -> list[str]:
    if not store.partial_dir.exists():
        return []
    return sorted(p.name for p in store.partial_dir.iterdir() if p.suffix != ".lock")


def in_thread(fn: Callable[[], Any], timeout_s: float) -> tuple[Any, BaseException | None, float]:
    """Run `fn` in a daemon thread; (result, exception, seconds). A hang fails the test instead
    of the run."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"still running after {timeout_s}s"
    return box.get("result"), box.get("error"), time.monotonic() - started


def loopback_counts_as_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat 127.0.0.1 (only) as a public address, so a first hop to a test server passes and
    the hops after it face the real rule."""
    real = sources.address_refusal
    monkeypatch.setattr(sources, "address_refusal", lambda a: None if str(a) == "127.0.0.1" else real(a))


# -- 1. redirects: Pendra's own loop, every hop checked (F5a, F5b, C3, C4, C6) -----------------------


@pytest.mark.parametrize(
    "location", ["file:///etc/passwd", "ftp://ftp.example.com/model.gguf", "gopher://127.0.0.1:6379/_INFO"]
)
def test_a_redirect_off_http_is_refused_at_once_and_not_retried(
    store: ModelStore, hostile: HostileServer, location: str
) -> None:
    hostile.redirect("/model.gguf", location)
    with pytest.raises(SourceRefused, match=r"only http\(s\) redirects") as info:
        installer(store, download_retries=3, allow_private_sources=True).install(
            entry(hostile.url("/model.gguf"))
        )
    assert not isinstance(info.value, TransientDownloadError | DownloadInterrupted)
    assert len(hostile.seen) == 1  # permanent: no retry
    assert "/etc/passwd" not in str(info.value) and "6379" not in str(info.value)
    assert leftovers(store) == []


def test_a_redirect_loop_is_a_clear_permanent_error(store: ModelStore, hostile: HostileServer) -> None:
    hostile.redirect("/a", "/a")
    with pytest.raises(SourceRefused, match="more than 10 redirects") as info:
        installer(store, download_retries=3, allow_private_sources=True).install(entry(hostile.url("/a")))
    assert isinstance(info.value, InstallError)
    assert len(hostile.seen) == 11  # the first request and ten hops, once


def test_ten_redirects_are_followed_and_the_eleventh_is_not(
    store: ModelStore, hostile: HostileServer, tiny: tuple[bytes, str]
) -> None:
    data, sha = tiny
    hostile.body("/model.gguf", data)
    for hop in range(10):  # /r0 -> /r1 -> ... -> /r9 -> /model.gguf, relative and absolute
        target = "/model.gguf" if hop == 9 else f"/r{hop + 1}"
        hostile.redirect(
            f"/r{hop}", target if hop % 2 else hostile.url(target), status=(301, 302, 307, 308)[hop % 4]
        )
    result = installer(store, allow_private_sources=True).install(entry(hostile.url("/r0"), sha, len(data)))
    assert result.model.valid and result.model.path.read_bytes() == data

    hostile.redirect("/r-1", "/r0")
    other = entry(hostile.url("/r-1"), sha, len(data), name="hostile:v2")
    with pytest.raises(SourceRefused, match="more than 10 redirects"):
        installer(store, allow_private_sources=True).install(other)


def _tls_server(tmp_path: Path) -> tuple[HostileServer, Path]:
    """An https server on 127.0.0.1 with a self-signed certificate; returns it and the cert."""
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return HostileServer(tls=context).start(), cert


def test_https_is_never_downgraded_to_http(
    store: ModelStore,
    hostile: HostileServer,
    tiny: tuple[bytes, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, sha = tiny
    secure, cert = _tls_server(tmp_path)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        hostile.body("/model.gguf", data)
        secure.body("/model.gguf", data)
        secure.redirect("/down", hostile.url("/model.gguf"))
        secure.redirect("/up", secure.url("/model.gguf"))
        with pytest.raises(SourceRefused, match="from https to plain http"):
            installer(store, allow_private_sources=True).install(entry(secure.url("/down"), sha, len(data)))
        assert hostile.seen == []  # the http server was never asked
        # https to https is followed, through the checked connection, certificate verified.
        result = installer(store, allow_private_sources=True).install(
            entry(secure.url("/up"), sha, len(data))
        )
        assert result.model.path.read_bytes() == data
    finally:
        secure.stop()


# -- 2. addresses: checked on every hop before connecting, pinned against rebinding (F5c, C5) ------


def test_a_loopback_source_is_refused_before_connecting(store: ModelStore, hostile: HostileServer) -> None:
    hostile.body("/model.gguf", b"x" * 100)
    with pytest.raises(SourceRefused, match="127.0.0.1 is a loopback address") as info:
        installer(store).install(entry(hostile.url("/model.gguf"), size=100))
    assert "PENDRA_ALLOW_PRIVATE_SOURCES" in str(info.value)
    assert hostile.seen == []


def test_a_name_that_resolves_to_loopback_is_refused_without_naming_the_address(
    store: ModelStore, hostile: HostileServer
) -> None:
    hostile.body("/model.gguf", b"x" * 100)
    with pytest.raises(SourceRefused, match="localhost resolves to a loopback address") as info:
        installer(store).install(entry(hostile.url("/model.gguf", host="localhost"), size=100))
    assert "127.0.0.1" not in str(info.value) and "::1" not in str(info.value)
    assert hostile.seen == []


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
        ("http://100.100.100.200/latest/meta-data/", "cloud metadata"),
        ("http://169.254.1.1/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://10.0.0.1/", "private"),
        ("http://172.16.0.1/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://[fc00::1]/", "private"),
        ("http://100.64.0.1/", "non-public"),
        ("http://0.0.0.0:6379/", "unspecified"),
        ("http://[::1]:6379/", "loopback"),
        ("http://[::ffff:127.0.0.2]:6379/", "loopback"),
        ("http://224.0.0.1/", "multicast"),
        ("http://240.0.0.1/", "(private|reserved)"),  # 240/4: Python files it under both
    ],
)
def test_every_redirect_hop_is_checked_before_connecting(
    store: ModelStore, hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, target: str, kind: str
) -> None:
    loopback_counts_as_public(monkeypatch)
    hostile.redirect("/model.gguf", target)
    started = time.monotonic()
    with pytest.raises(SourceRefused, match=f"is a {kind} address"):
        installer(store, download_retries=2).install(entry(hostile.url("/model.gguf")))
    assert time.monotonic() - started < 3  # refused, not a connect timeout to an unroutable address
    assert len(hostile.seen) == 1


def test_a_redirect_to_a_live_private_server_never_reaches_it(
    store: ModelStore, hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    loopback_counts_as_public(monkeypatch)
    inner = HostileServer(host="127.0.0.2").start()  # "Redis on the LAN": live, and private
    try:
        inner.body("/", b"+OK\r\n")
        hostile.redirect("/model.gguf", inner.url("/"))
        with pytest.raises(SourceRefused, match="127.0.0.2 is a loopback address"):
            installer(store).install(entry(hostile.url("/model.gguf")))
        assert inner.seen == []
    finally:
        inner.stop()


def test_a_name_with_any_private_answer_is_refused(store: ModelStore, hostile: HostileServer) -> None:
    hostile.body("/model.gguf", b"x" * 100)
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["93.184.216.34", "127.0.0.1"]  # one public answer does not launder a private one

    source = Sources(5)
    source.register("http", HttpSource(5, resolve=resolve))
    with pytest.raises(SourceRefused, match="mixed.test resolves to a loopback address"):
        installer(store, source).install(entry(hostile.url("/model.gguf", host="mixed.test"), size=100))
    assert asked == ["mixed.test"] and hostile.seen == []


def test_the_connection_goes_to_the_address_that_was_checked(
    store: ModelStore, hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, tiny: tuple[bytes, str]
) -> None:
    """DNS rebinding: the name answers a checked address, then a metadata address. Each
    connection resolves the name once, through the check, and connects to what it checked (the
    system resolver, which does not know the name, is never asked); a later connection, such as a
    redirect hop, is checked again and refused when the answer changed."""
    loopback_counts_as_public(monkeypatch)
    data, sha = tiny
    hostile.body("/model.gguf", data)
    hostile.redirect("/start", "/model.gguf")
    answers = iter([["127.0.0.1"], ["127.0.0.1"]])
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers, ["169.254.169.254"])

    source = Sources(5)
    source.register("http", HttpSource(5, resolve=resolve))
    url = hostile.url("/model.gguf", host="rebind.test")
    result = installer(store, source).install(entry(url, sha, len(data)))
    assert result.model.path.read_bytes() == data
    assert asked == ["rebind.test"]  # resolved once, by the check
    assert [s.host for s in hostile.seen] == [f"rebind.test:{hostile.port}"]  # Host as in the URL

    rebound = entry(hostile.url("/start", host="rebind.test"), sha, len(data), name="hostile:v2")
    with pytest.raises(SourceRefused, match="rebind.test resolves to a cloud metadata address"):
        installer(store, source).install(rebound)
    assert [s.path for s in hostile.seen] == ["/model.gguf", "/start"]  # the hop never connected


def test_an_entry_may_allow_private_sources(
    store: ModelStore, hostile: HostileServer, tiny: tuple[bytes, str]
) -> None:
    data, sha = tiny
    hostile.body("/model.gguf", data)
    result = installer(store).install(entry(hostile.url("/model.gguf"), sha, len(data), allow_private=True))
    assert result.model.valid
    assert result.model.sidecar is not None and result.model.sidecar.catalogue is not None
    assert result.model.sidecar.catalogue["allow_private"] is True


# -- 3. identity only: a gzip bomb is refused, never decoded (F7, C8) ------------------------------


@pytest.mark.parametrize("size", [None, 50_000_000], ids=["unpinned", "pinned"])
def test_a_gzip_bomb_is_refused_without_decoding_a_byte(
    store: ModelStore, hostile: HostileServer, size: int | None
) -> None:
    bomb = hostile.gzip_bomb("/bomb.gguf", 50_000_000)
    assert len(bomb) < 60_000
    seen: list[int] = []
    with pytest.raises(SourceRefused, match="Content-Encoding 'gzip'"):
        installer(store, download_retries=2, allow_private_sources=True).install(
            entry(hostile.url("/bomb.gguf"), size=size), lambda p: seen.append(p.done_bytes)
        )
    assert max(seen, default=0) == 0 and leftovers(store) == []
    assert [s.accept_encoding for s in hostile.seen] == ["identity"]  # asked for, and not retried


def test_identity_encoding_is_accepted(
    store: ModelStore, hostile: HostileServer, tiny: tuple[bytes, str]
) -> None:
    data, sha = tiny
    hostile.body("/model.gguf", data, {"Content-Encoding": "identity"})
    result = installer(store, allow_private_sources=True).install(
        entry(hostile.url("/model.gguf"), sha, len(data))
    )
    assert result.model.path.read_bytes() == data


# -- 4. a running size cap: an endless body is cut at the pin (F6, C7) -----------------------------


def _watch_partial(store: ModelStore, e: CatalogueEntry, sizes: list[int]) -> Callable[[Progress], None]:
    partial = Installer(store).partial_path(e)

    def on_progress(_p: Progress) -> None:
        sizes.append(partial.stat().st_size if partial.exists() else 0)

    return on_progress


@pytest.mark.parametrize("slack", [0, 4096])
def test_a_body_longer_than_the_pin_is_cut_at_the_pin(
    store: ModelStore, hostile: HostileServer, slack: int
) -> None:
    pinned = 1_000_000
    hostile.endless("/endless.gguf", limit=64 * 1024 * 1024)  # no Content-Length, chunked
    e = entry(hostile.url("/endless.gguf"), size=pinned)
    sizes: list[int] = []
    with pytest.raises(SourceRefused, match=r"more than the 1,000,000 bytes the catalogue pins"):
        installer(
            store, allow_private_sources=True, download_size_slack_bytes=slack, download_retries=2
        ).install(e, _watch_partial(store, e, sizes))
    assert sizes and max(sizes) <= pinned + slack + 1  # the disk never got more
    assert leftovers(store) == [] and not (store.root / "hostile-v1.gguf").exists()
    assert len(hostile.seen) == 1  # permanent
    time.sleep(0.2)
    assert hostile.sent["/endless.gguf"] < 16 * 1024 * 1024  # the server saw the client leave


def test_an_unpinned_download_is_cut_at_the_maximum(store: ModelStore, hostile: HostileServer) -> None:
    hostile.endless("/endless.gguf", limit=64 * 1024 * 1024)
    e = entry(hostile.url("/endless.gguf"), size=None)
    sizes: list[int] = []
    with pytest.raises(SourceRefused, match="PENDRA_DOWNLOAD_MAX_BYTES"):
        installer(store, allow_private_sources=True, download_max_bytes=2_000_000).install(
            e, _watch_partial(store, e, sizes)
        )
    assert max(sizes) <= 2_000_000 and leftovers(store) == []


def test_an_unpinned_download_announced_too_big_is_refused_before_reading(
    store: ModelStore, hostile: HostileServer
) -> None:
    hostile.body("/big.gguf", b"\0" * 3_000_000)
    seen: list[int] = []
    with pytest.raises(SourceRefused, match="PENDRA_DOWNLOAD_MAX_BYTES"):
        installer(store, allow_private_sources=True, download_max_bytes=2_000_000).install(
            entry(hostile.url("/big.gguf"), size=None), lambda p: seen.append(p.done_bytes)
        )
    assert max(seen, default=0) == 0 and leftovers(store) == []


# -- 5. stall deadline: a trickle is a stall, retried with resume, then a clear failure (C9) -----


def test_a_trickling_source_stalls_resumes_and_runs_out_of_retries(
    store: ModelStore, hostile: HostileServer
) -> None:
    hostile.trickle("/slow.gguf", length=100_000, every_s=0.05)  # about 20 bytes a second
    slow = installer(
        store, allow_private_sources=True, download_retries=2, download_stall_s=1, download_stall_bytes=1024
    )
    _, error, took = in_thread(lambda: slow.install(entry(hostile.url("/slow.gguf"), size=100_000)), 20)
    assert isinstance(error, DownloadInterrupted), error
    assert "stalled" in str(error) and "after 2 retries" in str(error)
    assert len(hostile.seen) == 3 and took < 12
    assert hostile.seen[0].range is None
    assert all(s.range is not None and s.range != "bytes=0-" for s in hostile.seen[1:])  # resumed
    assert [p for p in leftovers(store) if p.endswith(".part")]  # kept for the next try


def test_a_silent_source_is_a_stall_after_the_stall_window(store: ModelStore, hostile: HostileServer) -> None:
    hostile.trickle("/silent.gguf", length=100_000, every_s=60)  # headers, then nothing
    silent = installer(
        store, allow_private_sources=True, download_timeout_s=60, download_stall_s=1, download_retries=1
    )
    _, error, took = in_thread(lambda: silent.install(entry(hostile.url("/silent.gguf"), size=100_000)), 20)
    assert isinstance(error, DownloadInterrupted), error
    assert took < 8 and len(hostile.seen) == 2  # one stall window per try, not the 60 s timeout


def test_cancel_stops_a_trickling_download_within_a_chunk(store: ModelStore, hostile: HostileServer) -> None:
    hostile.trickle("/slow.gguf", length=100_000, every_s=0.05)
    cancel = threading.Event()
    cancelled_at: list[float] = []

    def on_progress(p: Progress) -> None:
        if p.done_bytes >= 5 and not cancel.is_set():
            cancel.set()
            cancelled_at.append(time.monotonic())

    slow = installer(store, allow_private_sources=True)
    _, error, _took = in_thread(
        lambda: slow.install(entry(hostile.url("/slow.gguf"), size=100_000), on_progress, cancel), 20
    )
    assert isinstance(error, InstallCancelled), error
    assert time.monotonic() - cancelled_at[0] < 1.5
    assert leftovers(store) == []


# -- 6. file:// reads regular files only (C13, CVE-2024-39721 class) -------------------------------


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory"])
def test_a_file_source_that_is_not_a_regular_file_fails_at_once(
    store: ModelStore, tmp_path: Path, kind: str
) -> None:
    if kind == "dev-zero":
        path = Path("/dev/zero")
    elif kind == "fifo":
        path = tmp_path / "model.gguf"
        os.mkfifo(path)
    else:
        path = tmp_path / "folder.gguf"
        path.mkdir()
    e = entry(path.as_uri(), size=1_000_000)
    try:
        _, error, took = in_thread(lambda: installer(store).install(e), 10)
    finally:
        if kind == "fifo":  # wake a reader the old code left blocked in open()
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    assert isinstance(error, SourceRefused), error
    assert "not a regular file" in str(error) and took < 5
    assert str(path) not in str(error)
    assert leftovers(store) == []


def test_file_sources_still_install_regular_files(
    store: ModelStore, tmp_path: Path, tiny: tuple[bytes, str]
) -> None:
    data, sha = tiny
    source = tmp_path / "copy.gguf"
    source.write_bytes(data)
    result = installer(store).install(entry(source.as_uri(), sha, len(data)))  # no address check for files
    assert result.model.path.read_bytes() == data


def test_install_requests_carry_no_url() -> None:
    """file:// (and every URL) reaches an install only from the operator's catalogue: the API's
    install body is the model name and nothing else."""
    from pendra_api.management import InstallRequest

    with pytest.raises(ValidationError):
        InstallRequest.model_validate({"model": "gemma3:270m", "gguf_url": "file:///etc/passwd"})
    assert set(InstallRequest.model_fields) == {"model"}


# -- 7. digests are checked at the parse boundary; mirror keys come from them (C2, C15) -------------


@pytest.mark.parametrize(
    "sha",
    [
        "A5FD3B62230AA5EC60212297DC9D20EAA70578AC519E00D93A17E44C087A6818",  # uppercase
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a681",  # 63
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a68188",  # 65
        "../../../../etc/ld.so.preload/a5fd3b62230aa5ec60212297dc9d20eaa7057",  # traversal
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a68/8",  # a slash
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6..",  # dots
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a\x0018",  # NUL
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818\n",  # a newline ($ quirk)
        " a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # padding
    ],
    ids=["uppercase", "short", "long", "traversal", "slash", "dots", "nul", "newline", "space"],
)
def test_a_catalogue_digest_that_is_not_64_lowercase_hex_is_refused_at_load(
    write_catalogue: Callable[..., Path], sha: str
) -> None:
    path = write_catalogue(
        [gemma_entry("https://a.test/g.gguf", gguf_sha256=sha)], suffix=".json", activate=False
    )
    with pytest.raises(
        CatalogueError, match=r"entry #1 \(gemma3:270m\): gguf_sha256: .*64 hexadecimal"
    ) as info:
        Catalogue.load([str(path)])
    assert str(path) in str(info.value)
    # The fetcher validates the entry a job carries the same way.
    with pytest.raises(ValidationError):
        CatalogueEntry.model_validate(gemma_entry("https://a.test/g.gguf", gguf_sha256=sha))


def test_mirror_keys_are_built_from_checked_digests_only() -> None:
    from pendra_fetcher.mirror import S3Mirror

    mirror = S3Mirror("http://127.0.0.1:9/models/cache", "", "")
    assert mirror.key_for("ab" * 32) == f"cache/sha256/{'ab' * 32}"
    for bad in ("../x", "AB" * 32, "ab" * 31 + "/.", "ab" * 32 + "\n"):
        with pytest.raises(ValueError, match="64 lowercase hex"):
            mirror.key_for(bad)


# -- 8. the disk fills mid-download (C12) --------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 80 MiB tmpfs: room for the install's 64 MiB margin plus a little, so the pre-check
    passes and ENOSPC comes from the kernel mid-download."""
    with small_tmpfs(tmp_path / "disk", "80m") as mount:
        yield mount


def test_a_disk_that_fills_mid_download_fails_clearly_and_keeps_the_rest(
    small_disk: Path, file_server: FileServer, tmp_path: Path
) -> None:
    store = ModelStore(small_disk / "models")
    store.ensure()
    other = write_gguf(store.root / "other-v1.gguf")
    before = other.read_bytes()
    payload = os.urandom(12 * 1024 * 1024)
    (file_server.root / "big.gguf").write_bytes(payload)
    e = entry(file_server.url("big.gguf"), hashlib.sha256(payload).hexdigest(), len(payload))
    filler = small_disk / "filler"

    def fill_the_disk(p: Progress) -> None:  # someone else takes the space, mid-download
        if p.done_bytes > 0 and not filler.exists():
            with filler.open("wb") as fh, pytest.raises(OSError):
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()

    with pytest.raises(DiskFull, match="disk full") as info:
        installer(store, allow_private_sources=True).install(e, fill_the_disk)
    assert error_code_for(info.value) == "disk_full"
    assert not (store.root / "hostile-v1.gguf").exists()
    assert not sidecar_path(store.root / "hostile-v1.gguf").exists()
    assert leftovers(store) == []  # the partial gave its space back
    assert other.read_bytes() == before and filler.exists()
    assert str(small_disk) not in str(info.value)


# -- 9. a crash between the sidecar and the GGUF (F-1) -----------------------------------------------

CRASHING_INSTALL = """
import os, signal, sys
from pathlib import Path
from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.install import Installer
from pendra_shared.store import ModelStore

root, url, sha, size, kill_after = sys.argv[1:6]
real_replace = os.replace

def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    if str(dst).endswith(kill_after):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9, right after this rename

os.replace = replace
entry = CatalogueEntry.model_validate(
    {"name": "tiny:v1", "purpose": "chat", "gguf_url": url, "gguf_sha256": sha, "size_bytes": int(size)}
)
Installer(ModelStore(Path(root))).install(entry)
"""


def _install_killed_after(store: ModelStore, source: Path, sha: str, kill_after: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_INSTALL, str(store.root), source.as_uri(), sha,
         str(source.stat().st_size), kill_after],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_killed_right_after_the_gguf_lands_its_sidecar_is_already_there(
    store: ModelStore, tmp_path: Path, tiny: tuple[bytes, str]
) -> None:
    data, sha = tiny
    source = tmp_path / "tiny.gguf"
    source.write_bytes(data)
    _install_killed_after(store, source, sha, "/tiny-v1.gguf")
    target = store.root / "tiny-v1.gguf"
    assert target.read_bytes() == data
    assert sidecar_path(target).is_file()  # never a GGUF at its name without its verified sha
    (model,) = store.scan().models
    listed = model.as_dict()
    assert listed["sha256"] == sha and listed["origin"] == "sidecar"
    assert listed.get("verified", True) is True


def test_killed_after_the_sidecar_leaves_no_gguf_and_the_next_install_finishes(
    store: ModelStore, tmp_path: Path, tiny: tuple[bytes, str]
) -> None:
    data, sha = tiny
    source = tmp_path / "tiny.gguf"
    source.write_bytes(data)
    _install_killed_after(store, source, sha, ".gguf.meta.json")
    target = store.root / "tiny-v1.gguf"
    assert not target.exists()  # the GGUF is placed last
    assert store.scan().models == []  # an orphaned sidecar serves nothing
    source.unlink()  # the next install needs no source: the partial was complete and verified
    e = entry("file:///nonexistent/tiny.gguf", sha, len(data), name="tiny:v1")
    result = installer(store).install(e)
    assert result.downloaded_bytes == 0 and result.model.path.read_bytes() == data
    assert result.model.sidecar is not None and result.model.sidecar.sha256 == sha
    assert leftovers(store) == []


def test_an_orphan_gguf_without_a_sidecar_is_listed_as_unverified(
    store: ModelStore, tiny: tuple[bytes, str]
) -> None:
    """What a crash of the old order (GGUF first, sidecar after) left behind, as the store shows
    it today: a hand-dropped file with no sha256 that vouches for it."""
    data, _sha = tiny
    store.ensure()
    (store.root / "tiny-v1.gguf").write_bytes(data)
    (model,) = store.scan().models
    listed = model.as_dict()
    assert model.sidecar is None and listed["sha256"] is None and listed["origin"] == "hand-dropped"
    assert listed.get("verified", False) is False and listed.get("trusted", False) is False


# -- 10. error messages carry no body, local path or resolved address -------------------------------


def test_install_errors_echo_no_body_path_or_resolved_address(
    store: ModelStore, hostile: HostileServer, tmp_path: Path
) -> None:
    secret = "SECRET-BODY root:x:0:0"

    def answer(status: int) -> Callable[[Any], None]:
        def route(h: Any) -> None:
            body = secret.encode()
            h.send_response(status)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

        return route

    hostile.routes["/404"] = answer(404)
    hostile.routes["/403"] = answer(403)
    hostile.redirect("/signed", hostile.url("/404?X-Amz-Signature=SECRET-SIG"))
    hostile.redirect("/file", "file:///etc/shadow")
    missing = tmp_path / "private-dir" / "model.gguf"
    messages = []
    allowed = installer(store, allow_private_sources=True)
    for url in (hostile.url("/404"), hostile.url("/403"), hostile.url("/file"), hostile.url("/signed")):
        with pytest.raises(InstallError) as info:
            allowed.install(entry(url))
        messages.append(str(info.value))
    for url in (hostile.url("/x", host="localhost"), missing.as_uri()):
        with pytest.raises(InstallError) as info:
            installer(store).install(entry(url))
        messages.append(str(info.value))
    for message in messages:
        assert "SECRET" not in message and "root:x" not in message, message
        assert "/etc/shadow" not in message and "private-dir" not in message, message
    assert "HTTP 404" in messages[0] and "HTTP 403" in messages[1] and "HTTP 404" in messages[3]
    assert "localhost" in messages[4] and "127.0.0.1" not in messages[4]  # the name given, not its IP
    assert "cannot be read" in messages[5]


# -- 11. the mirror down or refusing the credentials: upstream, with a warning (F-9, C15) ----------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.support.engines import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


def _fetch(store: ModelStore, mirror_url: str, key: str, secret: str) -> Any:
    from pendra_fetcher.fetch import Fetch
    from pendra_fetcher.mirror import S3Mirror

    mirror = S3Mirror(mirror_url, key, secret, timeout_s=3)
    source = Sources(5)
    source.register("s3", mirror)
    return Fetch(installer(store, source, download_retries=1), mirror)


def _install(fetch: Any, e: CatalogueEntry, progress: Callable[[Progress], None] = lambda _p: None) -> Any:
    return fetch.install(e, progress, threading.Event(), threading.Event())


@pytest.mark.parametrize("trouble", ["wrong credentials", "down"])
def test_a_mirror_in_trouble_falls_back_upstream_with_a_warning(
    store: ModelStore,
    hostile: HostileServer,
    tiny: tuple[bytes, str],
    s3: Any,
    caplog: pytest.LogCaptureFixture,
    trouble: str,
) -> None:
    from tests.support.engines import S3_ACCESS_KEY, S3_BUCKET

    data, sha = tiny
    hostile.body("/model.gguf", data)
    if trouble == "down":
        fetch = _fetch(store, f"http://127.0.0.1:{free_port()}/{S3_BUCKET}", S3_ACCESS_KEY, "whatever")
    else:
        fetch = _fetch(store, s3.mirror_url, S3_ACCESS_KEY, "not-the-secret")
    upstream = entry(hostile.url("/model.gguf"), sha, len(data), allow_private=True)
    with caplog.at_level(logging.WARNING, logger="pendra_fetcher"):
        result = _install(fetch, upstream)
    assert result.model.path.read_bytes() == data and len(hostile.seen) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("going upstream" in w for w in warnings), warnings
    assert any("uploading it to the" in w for w in warnings), warnings  # the fill failed, loudly


def test_the_mirror_is_not_held_to_the_address_check(
    store: ModelStore, s3: Any, tiny: tuple[bytes, str]
) -> None:
    from tests.support.engines import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY

    data, sha = tiny
    s3.client().put_object(S3_BUCKET, "models/tiny.gguf", io.BytesIO(data), len(data))
    fetch = _fetch(store, s3.mirror_url, S3_ACCESS_KEY, S3_SECRET_KEY)
    result = _install(fetch, entry(f"s3://{S3_BUCKET}/models/tiny.gguf", sha, len(data)))
    assert result.model.path.read_bytes() == data  # loopback S3, no allow_private anywhere


def test_a_mirror_that_dies_mid_download_hands_over_to_upstream(
    store: ModelStore,
    file_server: FileServer,
    served_gemma: str,
    gemma_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.conftest import GEMMA_SHA256, GEMMA_SIZE
    from tests.support.engines import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, S3Server

    dying = S3Server(tmp_path / "s3").start()
    try:
        dying.client().fput_object(S3_BUCKET, f"sha256/{GEMMA_SHA256}", str(gemma_path))
        fetch = _fetch(store, dying.mirror_url, S3_ACCESS_KEY, S3_SECRET_KEY)
        from_mirror: list[bool] = []

        def kill_the_mirror(p: Progress) -> None:
            if "mirror" in p.message:
                from_mirror.append(True)
            elif from_mirror and p.done_bytes > 0 and dying.proc is not None and dying.proc.poll() is None:
                dying.proc.kill()  # mid-download, while the install waits on this report
                dying.proc.wait(10)

        e = entry(served_gemma, GEMMA_SHA256, GEMMA_SIZE, allow_private=True)
        with caplog.at_level(logging.WARNING, logger="pendra_fetcher"):
            result = _install(fetch, e, kill_the_mirror)
        assert result.model.size_bytes == GEMMA_SIZE and result.resumed_from > 0
        assert [r.range is not None for r in file_server.requests] == [True]  # upstream resumed
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("the mirror stopped answering" in w for w in warnings), warnings
    finally:
        dying.stop()


def test_a_projector_travels_through_the_mirror_too(tmp_path: Path, file_server: FileServer, s3: Any) -> None:
    """A vision model installed upstream fills the mirror with both files; the next store takes
    both from the mirror, upstream down."""
    from tests.support.engines import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY

    model = write_gguf(file_server.root / "seer.gguf", tensors=8)
    projector = write_gguf(file_server.root / "mmproj-F16.gguf", arch="clip")
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (model, projector)]
    pinned = entry(
        file_server.url(model.name),
        shas[0],
        model.stat().st_size,
        allow_private=True,
        mmproj_url=file_server.url(projector.name),
        mmproj_sha256=shas[1],
    )
    first = ModelStore(tmp_path / "first")
    _install(_fetch(first, s3.mirror_url, S3_ACCESS_KEY, S3_SECRET_KEY), pinned)
    for sha, path in zip(shas, (model, projector), strict=True):
        assert s3.client().stat_object(S3_BUCKET, f"sha256/{sha}").size == path.stat().st_size

    file_server.faults.errors_503 = 1000  # upstream down from here on
    second = ModelStore(tmp_path / "second")
    result = _install(_fetch(second, s3.mirror_url, S3_ACCESS_KEY, S3_SECRET_KEY), pinned)
    assert result.model.projector is not None
    assert result.model.projector.read_bytes() == projector.read_bytes()
    assert result.model.path.read_bytes() == model.read_bytes()
    assert [r.status for r in file_server.requests] == [200, 200]  # the first install's only
