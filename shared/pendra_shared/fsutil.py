"""File-system helpers for writing the store safely: atomic writes, locks, hashing.

Every write into the store goes to a temporary name in the same directory and is moved into place
with `os.replace`, so a reader sees the old file or the new one, never half of one. Locks are
advisory OS locks (`fcntl.flock`, `msvcrt.locking` on Windows) that other processes honour too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

CHUNK = 1024 * 1024


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_for(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write_bytes(target: Path, data: bytes) -> None:
    tmp = temp_path_for(target)
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def _try_lock(fh: IO[bytes]) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        else:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _unlock(fh: IO[bytes]) -> None:
    if os.name == "nt":
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
    else:
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive_lock(
    path: Path,
    on_wait: Callable[[], None] | None = None,
    poll_s: float = 0.2,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed), across threads and processes.

    `on_wait` is called once if another holder makes us wait; `should_stop` is polled while
    waiting and aborts the wait with TimeoutError when it returns True.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as fh:
        waited = False
        while not _try_lock(fh):
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            if should_stop is not None and should_stop():
                raise TimeoutError(f"gave up waiting for {path}")
            time.sleep(poll_s)
        try:
            yield
        finally:
            _unlock(fh)
