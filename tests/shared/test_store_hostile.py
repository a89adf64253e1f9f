"""The store against hostile directory entries and sidecars (checklist B8-B11, F13): links out of
the store or in loops, FIFOs, devices, directories, unreadable files, tampered or huge sidecars,
and GGUFs swapped or rewritten under a valid sidecar. Nothing may hang, nothing outside the store
may be read, and a sidecar vouches only for the file it verified."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pendra_shared.sidecar import (
    MAX_SIDECAR_BYTES,
    read_sidecar,
    read_verified_sidecar,
    sidecar_path,
)
from pendra_shared.store import ModelStore, StoredModel, identity_of, open_regular

from tests.support.ggufs import install_like, write_gguf

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    root = tmp_path / "models"
    root.mkdir()
    return ModelStore(root)


def within(seconds: float, work: Callable[[], Any]) -> Any:
    """`work()`'s result; fails (instead of hanging the test run) when it takes longer."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (blocked?)"
    if failure:
        raise failure[0]
    return result[0]


def by_file(store: ModelStore) -> dict[str, StoredModel]:
    return {m.file_name: m for m in within(10, store.scan).models}


# -- B8: links ---------------------------------------------------------------------------------


def test_links_out_of_the_store_or_in_loops_are_invalid_and_never_read(
    store: ModelStore, tmp_path: Path
) -> None:
    outside = write_gguf(tmp_path / "outside.gguf")
    (store.root / "passwd.gguf").symlink_to("/etc/passwd")
    (store.root / "escape.gguf").symlink_to(outside)
    (store.root / "self.gguf").symlink_to(store.root / "self.gguf")
    (store.root / "ping.gguf").symlink_to(store.root / "pong.gguf")
    (store.root / "pong.gguf").symlink_to(store.root / "ping.gguf")
    (store.root / "dangling.gguf").symlink_to(store.root / "nothing-here.gguf")
    write_gguf(store.root / "inner.gguf")
    (store.root / "alias.gguf").symlink_to("inner.gguf")
    models = by_file(store)
    for name in ("passwd.gguf", "escape.gguf"):
        assert models[name].error == "symbolic link points outside the store; not used"
        assert models[name].facts is None and models[name].sidecar is None
    for name in ("self.gguf", "ping.gguf", "pong.gguf"):
        assert models[name].error == "symbolic link loops; not used"
    assert models["dangling.gguf"].error == "symbolic link points at nothing; not used"
    assert models["alias.gguf"].valid and models["inner.gguf"].valid
    assert sorted(m.file_name for m in store.scan().valid) == ["alias.gguf", "inner.gguf"]


def test_a_hard_link_is_an_ordinary_file_whose_bytes_are_checked(store: ModelStore, tmp_path: Path) -> None:
    # A hard link cannot be told from the file it links to: it is listed for what its bytes are.
    # It confers no trust: with no sidecar it is hand-dropped, loaded only after the probe.
    outside = write_gguf(tmp_path / "elsewhere.gguf")
    os.link(outside, store.root / "linked.gguf")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model at all")
    os.link(junk, store.root / "junk.gguf")
    models = by_file(store)
    assert models["linked.gguf"].valid and not models["linked.gguf"].trusted
    assert models["linked.gguf"].origin == "hand-dropped"
    assert not models["junk.gguf"].valid and "invalid GGUF" in (models["junk.gguf"].error or "")


# -- B9: things that are not regular files -----------------------------------------------------


def test_directories_fifos_and_devices_are_skipped_with_a_reason_without_blocking(store: ModelStore) -> None:
    (store.root / "x.gguf").mkdir()
    os.mkfifo(store.root / "y.gguf")
    if ROOT:
        os.mknod(store.root / "null.gguf", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    else:  # mknod needs root; a link to a device is the same entry to the scan
        (store.root / "null.gguf").symlink_to("/dev/null")
    (store.root / "fifo-link.gguf").symlink_to(store.root / "y.gguf")
    write_gguf(store.root / "good.gguf")
    scan = within(10, store.scan)
    assert [m.file_name for m in scan.models] == ["good.gguf"]
    assert sorted(scan.problems) == [
        "fifo-link.gguf is a FIFO, not a model file; skipped",
        "null.gguf is a device node, not a model file; skipped",
        "x.gguf is a directory, not a model file; skipped",
        "y.gguf is a FIFO, not a model file; skipped",
    ]


def test_opening_never_blocks_on_a_fifo_swapped_in_after_the_stat(store: ModelStore) -> None:
    fifo = store.root / "late.gguf"
    os.mkfifo(fifo)
    with pytest.raises(IsADirectoryError, match="a FIFO"):
        within(5, lambda: open_regular(fifo))


def test_a_file_without_read_permission(store: ModelStore) -> None:
    locked = write_gguf(store.root / "locked.gguf")
    locked.chmod(0)
    try:
        model = by_file(store)["locked.gguf"]
    finally:
        locked.chmod(0o644)
    if ROOT:
        # root reads it anyway (CAP_DAC_OVERRIDE), so in the containers it is served like any other.
        assert model.valid
    else:
        assert model.error == "unreadable: Permission denied"


# -- B10: tampered sidecars --------------------------------------------------------------------


def sidecar_fields(gguf: Path, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "format_version": 1,
        "name": "claimed:v1",
        "purpose": "embedding",
        "sha256": "0" * 64,
        "source_url": "https://example.test/x.gguf",
        "size_bytes": gguf.stat().st_size,
        "installed_at": "2026-01-01T00:00:00Z",
    }
    fields.update(overrides)
    return fields


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "is corrupt"),
        (b"\xff\xfe\x00binary", "is corrupt"),
        ("sha", "sha256: String should match pattern"),
        ("purpose", "purpose: Input should be"),
        ("size", "is stale (it records 1 bytes"),
        ("name", "name: Value error"),
        ("version", "format_version: Input should be 1"),
        ("list", "is corrupt"),
    ],
)
def test_tampered_sidecars_are_ignored_with_a_problem(store: ModelStore, content: Any, problem: str) -> None:
    gguf = write_gguf(store.root / "model.gguf")  # metadata: a llama, so chat
    overrides: dict[str, Any] = {
        "sha": {"sha256": "Z" * 64},
        "purpose": {"purpose": "video"},
        "size": {"size_bytes": 1},
        "name": {"name": "../../etc/passwd"},
        "version": {"format_version": 2},
    }
    if isinstance(content, bytes):
        raw = content
    elif content == "list":
        raw = b"[1, 2, 3]"
    else:
        raw = json.dumps(sidecar_fields(gguf, **overrides[content])).encode()
    sidecar_path(gguf).write_bytes(raw)
    (model,) = within(10, store.scan).models
    assert model.valid and model.sidecar is None and not model.verified and not model.trusted
    assert (model.name, model.purpose, model.origin) == ("model", "chat", "hand-dropped")
    assert len(model.problems) == 1 and problem in model.problems[0], model.problems


def test_a_huge_sidecar_is_refused_without_being_read(store: ModelStore) -> None:
    gguf = write_gguf(store.root / "model.gguf")
    with sidecar_path(gguf).open("wb") as fh:
        fh.truncate(100 * 1024 * 1024)  # 100 MB, sparse
    started = time.monotonic()
    (model,) = within(10, store.scan).models
    assert time.monotonic() - started < 2
    assert model.sidecar is None and model.valid
    assert "more than the 65,536 expected" in model.problems[0]
    assert MAX_SIDECAR_BYTES == 65_536


def test_sidecars_that_are_fifos_or_links_are_refused_without_blocking(
    store: ModelStore, tmp_path: Path
) -> None:
    fifo_model = write_gguf(store.root / "fifo.gguf")
    os.mkfifo(sidecar_path(fifo_model))
    linked_model = write_gguf(store.root / "linked.gguf")
    good_elsewhere = tmp_path / "elsewhere.json"
    good_elsewhere.write_text(json.dumps(sidecar_fields(linked_model)))
    sidecar_path(linked_model).symlink_to(good_elsewhere)
    models = by_file(store)
    assert models["fifo.gguf"].sidecar is None
    assert "refused (it is not a regular file)" in models["fifo.gguf"].problems[0]
    assert models["linked.gguf"].sidecar is None and models["linked.gguf"].name == "linked"
    assert "it is a symbolic link" in models["linked.gguf"].problems[0]


def test_a_sidecar_without_its_gguf_is_reported(store: ModelStore) -> None:
    (store.root / "gone.gguf.meta.json").write_text(json.dumps({"name": "x:1"}))
    scan = within(10, store.scan)
    assert scan.models == []
    assert scan.problems == ["orphaned sidecar gone.gguf.meta.json (no GGUF beside it); ignored"]


# -- B11 / F13: the sidecar vouches only for the file it verified ------------------------------


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_size_twin(path: Path, tmp_path: Path) -> Path:
    """Another valid GGUF of exactly the same size (other tensor values)."""
    twin = tmp_path / "twin.gguf"
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last f32 of the last tensor becomes +inf
    twin.write_bytes(bytes(data))
    assert twin.stat().st_size == path.stat().st_size and _sha(twin) != _sha(path)
    return twin


def test_a_verified_catalogue_install_is_trusted_and_an_import_is_not(
    store: ModelStore, tmp_path: Path
) -> None:
    source = write_gguf(tmp_path / "src.gguf")
    install_like(store, source, "pinned:v1")
    store.import_file(source, name="imported:v1")
    models = {m.name: m for m in store.scan().models}
    assert models["pinned:v1"].verified and models["pinned:v1"].trusted
    assert models["imported:v1"].verified and not models["imported:v1"].trusted
    shown = models["pinned:v1"].as_dict()
    assert shown["verified"] is True and shown["trusted"] is True and shown["problems"] == []
    stamp = json.loads(sidecar_path(models["pinned:v1"].path).read_text())["verified_file"]
    st = models["pinned:v1"].path.stat()
    assert stamp == {"size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def test_a_same_size_swap_by_rename_is_unverified_and_verify_flags_the_mismatch(
    store: ModelStore, tmp_path: Path
) -> None:
    source = write_gguf(tmp_path / "src.gguf")
    target = install_like(store, source)
    twin = same_size_twin(source, tmp_path)
    shutil.copy2(twin, tmp_path / "staged.gguf")
    os.utime(tmp_path / "staged.gguf", ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns))
    os.replace(tmp_path / "staged.gguf", target)  # same size, same mtime, another inode
    (model,) = store.scan().models
    assert model.valid and model.sidecar is not None and model.name == "model:v1"
    assert not model.verified and not model.trusted
    assert "replaced since it was verified" in model.problems[0]
    assert read_sidecar(target, target.stat().st_size)[0] is not None  # size-only: still believed
    assert read_verified_sidecar(target)[0] is None  # what an install must use

    result = store.verify("model:v1")
    assert result.matches is False and result.sha256 == _sha(twin)
    assert "sha256 mismatch" in result.message
    (model,) = store.scan().models
    assert not model.verified and "sha256 mismatch" in model.problems[0]

    os.replace(shutil.copy2(source, tmp_path / "back.gguf"), target)  # the right bytes again
    result = store.verify("model:v1")
    assert result.matches is True
    (model,) = store.scan().models
    assert model.verified and model.trusted and model.problems == []


def test_an_in_place_rewrite_or_a_touch_makes_the_file_unverified_until_verified(
    store: ModelStore, tmp_path: Path
) -> None:
    source = write_gguf(tmp_path / "src.gguf")
    target = install_like(store, source)
    inode = target.stat().st_ino
    with target.open("r+b") as fh:  # in place: same inode, same size
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x7f")
    assert target.stat().st_ino == inode
    (model,) = store.scan().models
    assert not model.trusted and "rewritten since it was verified" in model.problems[0]
    assert store.verify("model:v1").matches is False

    target.write_bytes(source.read_bytes())  # content restored, the mismatch is still on record
    (model,) = store.scan().models
    assert "sha256 mismatch" in model.problems[0]
    assert store.verify("model:v1").matches is True
    os.utime(target)  # a touch: the bytes are unchanged, but that is no longer known
    (model,) = store.scan().models
    assert not model.trusted and "rewritten since it was verified" in model.problems[0]
    assert store.verify("model:v1").matches is True and store.scan().models[0].trusted


def test_a_sidecar_from_an_older_pendra_is_not_trusted(store: ModelStore, tmp_path: Path) -> None:
    target = write_gguf(store.root / "old-v1.gguf")
    fields = sidecar_fields(target, name="old:v1", purpose="chat", sha256=_sha(target), catalogue={})
    sidecar_path(target).write_text(json.dumps(fields))
    (model,) = store.scan().models
    assert model.valid and model.sidecar is not None and not model.trusted
    assert "records only the size" in model.problems[0]
    assert store.verify("old:v1").matches is True
    assert store.scan().models[0].trusted


# -- probe verdicts ----------------------------------------------------------------------------


def test_a_probe_verdict_marks_the_file_invalid_until_it_changes(store: ModelStore, tmp_path: Path) -> None:
    path = write_gguf(store.root / "crashy.gguf")
    identity = identity_of(path.name, path.stat())
    store.mark_invalid(identity, "llama.cpp crashed loading it: SIGABRT")
    (model,) = store.scan().models
    assert model.error == "llama.cpp crashed loading it: SIGABRT"
    other = ModelStore(store.root)  # another process: `pendra models list`, the API
    assert other.scan().models[0].error == "llama.cpp crashed loading it: SIGABRT"
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == [".probe"]
    os.replace(write_gguf(tmp_path / "new.gguf"), path)
    assert store.scan().models[0].valid and ModelStore(store.root).scan().models[0].valid

    transient = write_gguf(store.root / "slow.gguf")
    store.mark_invalid(identity_of(transient.name, transient.stat()), "too slow", persist=False)
    assert {m.file_name: m.error for m in store.scan().models}["slow.gguf"] == "too slow"
    assert {m.file_name: m.error for m in ModelStore(store.root).scan().models}["slow.gguf"] is None
    store.uninstall("crashy")
    assert not (store.root / ".probe" / "crashy.gguf.json").exists()
