from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.errors import (
    ChecksumMismatch,
    DownloadInterrupted,
    InstallCancelled,
    InstallError,
    InsufficientSpace,
    StoreError,
    UnsupportedSource,
)
from pendra_shared.fsutil import sha256_file
from pendra_shared.install import DownloadLimits, Installer, Progress
from pendra_shared.sources import Sources
from pendra_shared.store import ModelStore

from tests.conftest import GEMMA_SHA256, GEMMA_SIZE, gemma_entry
from tests.support.ggufs import write_gguf
from tests.support.httpserver import FileServer


def entry(url: str, **overrides: Any) -> CatalogueEntry:
    return CatalogueEntry.model_validate(gemma_entry(url, **overrides))


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def installer(store: ModelStore, retries: int = 3) -> Installer:
    # The file server is on loopback, which installs reach only when allowed.
    limits = DownloadLimits(allow_private_sources=True)
    return Installer(store, Sources(timeout_s=10), retries=retries, backoff_s=0.01, limits=limits)


def leftovers(store: ModelStore) -> list[str]:
    """Partial downloads still in the store (lock files are expected)."""
    return sorted(p.name for p in store.partial_dir.iterdir() if p.suffix != ".lock")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_verified_install_of_a_real_model(
    store: ModelStore, served_gemma: str, file_server: FileServer
) -> None:
    events: list[Progress] = []
    result = installer(store).install(entry(served_gemma), events.append)
    target = store.root / "gemma3-270m.gguf"
    assert result.model.path == target and not result.already_installed
    assert sha256_of(target) == GEMMA_SHA256
    assert result.downloaded_bytes == GEMMA_SIZE and result.attempts == 1
    sidecar = json.loads((store.root / "gemma3-270m.gguf.meta.json").read_text())
    assert sidecar["format_version"] == 1
    assert (sidecar["name"], sidecar["purpose"], sidecar["sha256"], sidecar["size_bytes"]) == (
        "gemma3:270m",
        "chat",
        GEMMA_SHA256,
        GEMMA_SIZE,
    )
    assert sidecar["source_url"] == served_gemma and sidecar["installed_at"]
    assert sidecar["catalogue"]["quantization"] == "Q4_K_M"
    (model,) = store.scan().models
    assert (model.name, model.status, model.purpose) == ("gemma3:270m", "ready", "chat")
    assert leftovers(store) == []
    done = [e.done_bytes for e in events if e.phase == "downloading"]
    assert done == sorted(done) and done[-1] == GEMMA_SIZE
    assert events[-1].phase == "done"

    # Installing again is a no-op: nothing is fetched, nothing changes.
    requests = len(file_server.requests)
    mtime = target.stat().st_mtime_ns
    again = installer(store).install(entry(served_gemma))
    assert again.already_installed and again.downloaded_bytes == 0
    assert len(file_server.requests) == requests and target.stat().st_mtime_ns == mtime


def test_checksum_mismatch_deletes_the_download(store: ModelStore, served_gemma: str) -> None:
    wrong = "ab" * 32
    with pytest.raises(ChecksumMismatch) as info:
        installer(store).install(entry(served_gemma, gguf_sha256=wrong))
    assert wrong in str(info.value) and GEMMA_SHA256 in str(info.value)
    assert store.scan().models == [] and leftovers(store) == []


def test_resume_after_a_cut_connection(store: ModelStore, served_gemma: str, file_server: FileServer) -> None:
    file_server.faults.cut_after = 100_000_000
    file_server.faults.cuts = 1
    result = installer(store).install(entry(served_gemma))
    assert sha256_of(result.model.path) == GEMMA_SHA256
    assert result.attempts == 2
    assert result.downloaded_bytes == GEMMA_SIZE  # nothing fetched twice
    first, second = file_server.requests
    assert (first.range, first.status) == (None, 200)
    assert second.status == 206 and second.range is not None
    assert int(second.range.removeprefix("bytes=").rstrip("-")) > 0


def test_a_later_install_resumes_what_an_earlier_one_left(
    store: ModelStore, served_gemma: str, file_server: FileServer
) -> None:
    file_server.faults.cut_after = 60_000_000
    file_server.faults.cuts = 1
    file_server.faults.down_after_cut = True
    with pytest.raises(InstallError, match="after 1 retries: HTTP 503.*run the install again"):
        installer(store, retries=1).install(entry(served_gemma))
    file_server.faults.down_after_cut = False
    (partial,) = leftovers(store)[:1]
    have = (store.partial_dir / f"gemma3-270m.gguf.{GEMMA_SHA256}.part").stat().st_size
    assert 0 < have <= 60_000_000 and partial.startswith("gemma3-270m.gguf.")
    assert store.scan().models == []  # a partial file is never a model

    result = installer(store).install(entry(served_gemma))
    assert result.resumed_from == have and result.downloaded_bytes == GEMMA_SIZE - have
    assert file_server.requests[-1].range == f"bytes={have}-"
    assert sha256_of(result.model.path) == GEMMA_SHA256 and leftovers(store) == []


def test_a_server_that_ignores_range_restarts_cleanly(
    store: ModelStore, served_gemma: str, file_server: FileServer
) -> None:
    file_server.faults.cut_after = 30_000_000
    file_server.faults.cuts = 1
    file_server.faults.down_after_cut = True
    with pytest.raises(InstallError):
        installer(store, retries=0).install(entry(served_gemma))
    file_server.faults.down_after_cut = False
    file_server.faults.ignore_range = True
    result = installer(store).install(entry(served_gemma))
    assert result.resumed_from > 0 and result.downloaded_bytes == GEMMA_SIZE
    assert file_server.requests[-1].status == 200
    assert sha256_of(result.model.path) == GEMMA_SHA256


def small_model(file_server: FileServer, name: str = "tiny.gguf") -> tuple[str, str, int]:
    path = write_gguf(file_server.root / name, tensors=8)
    return file_server.url(name), sha256_of(path), path.stat().st_size


def test_transient_server_errors_are_retried(store: ModelStore, file_server: FileServer) -> None:
    url, sha, size = small_model(file_server)
    file_server.faults.errors_503 = 2
    result = installer(store).install(entry(url, gguf_sha256=sha, size_bytes=size, name="tiny:v1"))
    assert result.attempts == 3 and result.model.valid
    assert [r.status for r in file_server.requests] == [503, 503, 200]


def test_retries_give_up_with_a_clear_error(store: ModelStore, file_server: FileServer) -> None:
    url, sha, size = small_model(file_server)
    file_server.faults.errors_503 = 10
    with pytest.raises(InstallError, match=r"after 2 retries: HTTP 503"):
        installer(store, retries=2).install(entry(url, gguf_sha256=sha, size_bytes=size))
    assert len(file_server.requests) == 3


def test_missing_file_fails_at_once(store: ModelStore, file_server: FileServer) -> None:
    with pytest.raises(InstallError, match="HTTP 404"):
        installer(store).install(entry(file_server.url("nope.gguf")))
    assert len(file_server.requests) == 1


def test_unknown_size_is_taken_from_the_server(store: ModelStore, file_server: FileServer) -> None:
    url, sha, _size = small_model(file_server)
    result = installer(store).install(entry(url, gguf_sha256=sha, size_bytes=None, name="tiny:v1"))
    assert result.model.valid and result.model.sidecar is not None
    assert result.model.sidecar.size_bytes == result.model.size_bytes


def test_size_disagreement_with_the_catalogue_stops(store: ModelStore, served_gemma: str) -> None:
    with pytest.raises(InstallError, match="catalogue pins"):
        installer(store).install(entry(served_gemma, size_bytes=GEMMA_SIZE + 1))
    assert store.scan().models == []


def test_not_enough_disk_space(store: ModelStore, file_server: FileServer) -> None:
    with pytest.raises(InsufficientSpace, match="not enough disk space"):
        installer(store).install(entry(file_server.url("big.gguf"), size_bytes=10**16))
    assert file_server.requests == []


def test_verified_bytes_that_are_not_a_gguf(store: ModelStore, file_server: FileServer) -> None:
    page = file_server.root / "page.gguf"
    page.write_bytes(b"<html>" * 1000)
    with pytest.raises(InstallError, match="not a usable GGUF"):
        installer(store).install(
            entry(file_server.url("page.gguf"), gguf_sha256=sha256_of(page), size_bytes=6000)
        )
    assert store.scan().models == [] and leftovers(store) == []


def test_file_urls_install_air_gapped_copies(store: ModelStore, gemma_path: Path) -> None:
    result = installer(store).install(entry(gemma_path.as_uri()))
    assert result.model.valid and sha256_of(result.model.path) == GEMMA_SHA256


def test_s3_urls_need_the_mirror(store: ModelStore) -> None:
    with pytest.raises(UnsupportedSource, match="PENDRA_MIRROR_URL"):
        installer(store).install(entry("s3://models/gemma.gguf"))


def test_cancel_removes_the_partial_file(
    store: ModelStore, served_gemma: str, file_server: FileServer
) -> None:
    file_server.faults.throttle_s = 0.001
    cancel = threading.Event()

    def progress(p: Progress) -> None:
        if p.done_bytes > 5_000_000:
            cancel.set()

    with pytest.raises(InstallCancelled):
        installer(store).install(entry(served_gemma), progress, cancel)
    assert leftovers(store) == [] and store.scan().models == []


def test_two_installs_at_once_download_once(
    store: ModelStore, served_gemma: str, file_server: FileServer
) -> None:
    file_server.faults.throttle_s = 0.0005
    started = threading.Event()
    results: dict[str, Any] = {}
    waited: list[str] = []

    def first_progress(p: Progress) -> None:
        if p.phase == "downloading":
            started.set()

    def run(label: str, progress: Any) -> None:
        try:
            results[label] = installer(store).install(entry(served_gemma), progress)
        except Exception as exc:  # surfaced by the assertions below
            results[label] = exc

    first = threading.Thread(target=run, args=("first", first_progress))
    first.start()
    assert started.wait(30)
    second = threading.Thread(
        target=run, args=("second", lambda p: waited.append(p.phase) if p.phase == "waiting" else None)
    )
    second.start()
    first.join(120)
    second.join(120)
    assert not results["first"].already_installed and results["second"].already_installed
    assert waited == ["waiting"]
    assert [r.status for r in file_server.requests] == [200]
    assert [m.file_name for m in store.scan().models] == ["gemma3-270m.gguf"]
    assert sha256_of(store.root / "gemma3-270m.gguf") == GEMMA_SHA256


def test_a_present_identical_file_is_adopted(
    store: ModelStore, gemma_path: Path, file_server: FileServer
) -> None:
    store.ensure()
    (store.root / "gemma3-270m.gguf").hardlink_to(gemma_path)
    result = installer(store).install(entry(file_server.url("unused.gguf")))
    assert result.already_installed and file_server.requests == []
    assert result.model.sidecar is not None and result.model.sidecar.sha256 == GEMMA_SHA256


def test_a_different_file_in_the_way_is_kept(store: ModelStore, served_gemma: str) -> None:
    store.ensure()
    other = write_gguf(store.root / "gemma3-270m.gguf")
    before = other.read_bytes()
    with pytest.raises(StoreError, match="already exists with other contents"):
        installer(store).install(entry(served_gemma))
    assert other.read_bytes() == before


def test_two_names_for_the_same_bytes_install_at_once_without_sharing_a_partial(
    store: ModelStore, served_gemma: str, file_server: FileServer
) -> None:

    file_server.faults.throttle_s = 0.0005
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            results[name] = installer(store).install(entry(served_gemma, name=name))
        except Exception as exc:  # reported below
            results[name] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in ("gemma3:270m", "gemma-copy:270m")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not isinstance(r, Exception) for r in results.values()), results
    for file_name in ("gemma3-270m.gguf", "gemma-copy-270m.gguf"):
        assert sha256_file(store.root / file_name) == GEMMA_SHA256
    assert leftovers(store) == []
    discarded = installer(store).discard_partial(entry(served_gemma, name="gemma-copy:270m"), wait=False)
    assert discarded


# -- vision projectors ---------------------------------------------------------------------------


def vision_entry(file_server: FileServer, **overrides: Any) -> CatalogueEntry:
    """A small chat model and its projector (a clip GGUF) on the file server, pinned."""
    model = write_gguf(file_server.root / "vision.gguf", tensors=8)
    projector = write_gguf(file_server.root / "mmproj-F16.gguf", arch="clip", tensors=600)  # 150 kB
    fields: dict[str, Any] = {
        "name": "vision:1b",
        "gguf_sha256": sha256_of(model),
        "size_bytes": model.stat().st_size,
        "mmproj_url": file_server.url("mmproj-F16.gguf"),
        "mmproj_sha256": sha256_of(projector),
        "mmproj_size_bytes": projector.stat().st_size,
    }
    return entry(file_server.url("vision.gguf"), **{**fields, **overrides})


def store_files(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.is_file())


def test_an_entry_with_a_projector_installs_both(store: ModelStore, file_server: FileServer) -> None:
    pinned = vision_entry(file_server)
    events: list[Progress] = []
    result = installer(store).install(pinned, events.append)
    assert store_files(store) == ["vision-1b.gguf", "vision-1b.gguf.meta.json", "vision-1b.mmproj.gguf"]
    sidecar = json.loads((store.root / "vision-1b.gguf.meta.json").read_text())
    projector = store.root / "vision-1b.mmproj.gguf"
    assert sidecar["projector"]["file"] == "vision-1b.mmproj.gguf"
    assert sidecar["projector"]["sha256"] == pinned.mmproj_sha256 == sha256_of(projector)
    assert sidecar["projector"]["size_bytes"] == projector.stat().st_size
    assert sidecar["projector"]["source_url"] == pinned.mmproj_url
    assert sidecar["projector"]["verified_file"]["inode"] == projector.stat().st_ino
    scan = store.scan()
    (model,) = scan.models
    assert scan.problems == [] and scan.projectors == ("vision-1b.mmproj.gguf",)
    assert model.valid and model.projector == projector and model.projector_problem is None
    assert "vision" in model.capabilities and model.as_dict()["projector"] == "vision-1b.mmproj.gguf"
    assert result.model.projector == projector and leftovers(store) == []
    # Progress counts the pair: the projector's bytes follow the model's.
    both = model.size_bytes + projector.stat().st_size
    assert result.size_bytes == both and result.downloaded_bytes == both
    done = [e.done_bytes for e in events if e.phase == "downloading"]
    assert done == sorted(done) and done[-1] == both
    assert {e.total_bytes for e in events if e.phase == "downloading"} == {both}
    assert (events[-1].phase, events[-1].done_bytes) == ("done", both)

    requests = len(file_server.requests)
    again = installer(store).install(pinned)
    assert again.already_installed and len(file_server.requests) == requests


def test_a_wrong_projector_pin_fails_the_install_and_leaves_nothing(
    store: ModelStore, file_server: FileServer
) -> None:
    wrong = "cd" * 32
    with pytest.raises(ChecksumMismatch, match=f"vision:1b \\(vision projector\\).*expected sha256 {wrong}"):
        installer(store).install(vision_entry(file_server, mmproj_sha256=wrong, mmproj_size_bytes=None))
    assert store.scan().models == [] and store_files(store) == [] and leftovers(store) == []


@pytest.mark.parametrize(
    ("served", "message"),
    [("model", "is not a vision projector.*architecture is 'llama'"), ("missing", "HTTP 404")],
)
def test_a_projector_that_is_no_projector_fails_the_install(
    store: ModelStore, file_server: FileServer, served: str, message: str
) -> None:
    changes = {"mmproj_url": file_server.url("nowhere.gguf")}
    if served == "model":  # verified bytes, but a model's, not a projector's
        fake = write_gguf(file_server.root / "fake-mmproj.gguf", name="not a projector")
        changes = {"mmproj_url": file_server.url(fake.name), "mmproj_sha256": sha256_of(fake)}
    with pytest.raises(InstallError, match=message):
        installer(store).install(vision_entry(file_server, mmproj_size_bytes=None, **changes))
    assert store_files(store) == [] and leftovers(store) == []


def test_an_installed_model_gets_the_projector_its_entry_names_later(
    store: ModelStore, file_server: FileServer
) -> None:
    pinned = vision_entry(file_server)
    text_only = pinned.model_copy(
        update={"mmproj_url": None, "mmproj_sha256": None, "mmproj_size_bytes": None}
    )
    installer(store).install(text_only)
    target = store.root / "vision-1b.gguf"
    before = target.stat()
    (model,) = store.scan().models
    assert model.projector is None and "vision" not in model.capabilities

    # A bad projector pin fails, and the model installed before is untouched.
    sidecar_before = (store.root / "vision-1b.gguf.meta.json").read_bytes()
    with pytest.raises(ChecksumMismatch):
        installer(store).install(pinned.model_copy(update={"mmproj_sha256": "ef" * 32}))
    assert (store.root / "vision-1b.gguf.meta.json").read_bytes() == sidecar_before
    assert store_files(store) == ["vision-1b.gguf", "vision-1b.gguf.meta.json"] and leftovers(store) == []

    requests = len(file_server.requests)
    result = installer(store).install(pinned)
    assert [r.path for r in file_server.requests[requests:]] == ["/mmproj-F16.gguf"]  # just the projector
    assert not result.already_installed and result.model.projector == store.root / "vision-1b.mmproj.gguf"
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    (model,) = store.scan().models
    assert model.verified and model.trusted and "vision" in model.capabilities

    # Its projector removed by hand: installing again brings it back.
    (store.root / "vision-1b.mmproj.gguf").unlink()
    assert "missing" in (store.find("vision:1b").projector_problem or "")
    installer(store).install(pinned)
    assert store.find("vision:1b").projector is not None


def test_a_cancelled_projector_download_leaves_nothing(store: ModelStore, file_server: FileServer) -> None:
    pinned = vision_entry(file_server)
    cancel = threading.Event()
    model_size = pinned.size_bytes or 0

    def progress(p: Progress) -> None:
        if p.phase == "downloading" and p.done_bytes > model_size:
            cancel.set()  # the model is verified, the projector half-way

    file_server.faults.throttle_s = 0.001
    with pytest.raises(InstallCancelled):
        installer(store).install(pinned, progress, cancel)
    assert store_files(store) == [] and leftovers(store) == []


def test_an_interrupted_projector_download_resumes_without_fetching_the_model_again(
    store: ModelStore, file_server: FileServer
) -> None:
    pinned = vision_entry(file_server, size_bytes=None)  # a resumed model of unknown size is reused too
    interrupt = threading.Event()
    model_size = (file_server.root / "vision.gguf").stat().st_size

    def progress(p: Progress) -> None:
        if p.phase == "downloading" and p.done_bytes > model_size:
            interrupt.set()  # a shutdown, the projector half-way

    file_server.faults.throttle_s = 0.001
    with pytest.raises(DownloadInterrupted):
        installer(store).install(pinned, progress, interrupt=interrupt)
    assert store_files(store) == [] and len(leftovers(store)) == 3  # both partials, the model's note
    file_server.faults.throttle_s = 0
    requests = len(file_server.requests)
    result = installer(store).install(pinned)
    (resumed,) = file_server.requests[requests:]
    assert resumed.path == "/mmproj-F16.gguf" and resumed.status == 206
    assert result.model.projector is not None and leftovers(store) == []
    assert sha256_of(result.model.projector) == pinned.mmproj_sha256


def test_a_touched_model_is_adopted_again_with_its_projector(
    store: ModelStore, file_server: FileServer
) -> None:
    pinned = vision_entry(file_server)
    installer(store).install(pinned)
    target = store.root / "vision-1b.gguf"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 1_000_000_000))
    assert not store.find("vision:1b").verified  # the model changed since it was verified
    requests = len(file_server.requests)
    again = installer(store).install(pinned)
    assert again.already_installed and len(file_server.requests) == requests  # re-hashed, nothing fetched
    model = store.find("vision:1b")
    assert model.verified and model.projector == store.root / "vision-1b.mmproj.gguf"
