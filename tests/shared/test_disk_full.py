"""A full disk while Pendra writes its small files (sidecars, job records, the install's partial
record): the error surfaces, the previous file stays whole, and no temporary file is left."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from pendra_shared.fsutil import atomic_write_bytes

from tests.support.tmpfs import small_tmpfs


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "disk", "64k") as mount:
        yield mount


def test_a_write_that_finds_the_disk_full_keeps_the_old_file_whole(tiny_disk: Path) -> None:
    sidecar = tiny_disk / "model.gguf.meta.json"
    atomic_write_bytes(sidecar, b'{"purpose": "chat"}')
    filler = tiny_disk / "filler"
    with filler.open("wb", buffering=0) as fh:
        with pytest.raises(OSError) as full:
            while True:
                fh.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as raised:
        atomic_write_bytes(sidecar, b'{"purpose": "chat", "sha256": "' + b"a" * 64 * 200 + b'"}')
    assert raised.value.errno == errno.ENOSPC
    assert sidecar.read_bytes() == b'{"purpose": "chat"}'
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "model.gguf.meta.json"]
