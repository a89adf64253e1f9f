"""The sidecar `<file>.gguf.meta.json` that records what a curated model is and where it came from.

Installs write it last, atomically, after the GGUF is verified and in place, and it records which
file was verified: its size, modification time (ns) and inode, taken when it is written. A reader
trusts its `sha256` only while the file beside it still has that stamp; a file rewritten or
replaced since (even by one of the same size) is "changed since it was verified". A sidecar that
is not a small regular file, does not parse, names no valid model or records another size is
reported as a problem and ignored altogether. Reading never blocks on a FIFO and never reads more
than `MAX_SIDECAR_BYTES`.

A vision model's sidecar also names its projector (`projector`: the mmproj GGUF beside it in the
store, `<model stem>.mmproj.gguf`), with that file's hash and stamp, judged the same way by the
store.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pendra_shared.fsutil import atomic_write_bytes
from pendra_shared.names import GGUF_SUFFIX, parse_name

SIDECAR_SUFFIX = ".meta.json"
MAX_SIDECAR_BYTES = 64 * 1024  # real ones are about 1 KiB; anything far larger is not ours
Purpose = Literal["chat", "embedding", "rerank", "image", "transcription"]


class FileStamp(BaseModel):
    """What identifies the verified bytes cheaply: a rewrite changes the mtime, a replacement
    (rename, copy, restore) the inode, a truncation the size. The device number is left out: it
    is not stable across reboots, remounts and containers that share the volume."""

    model_config = ConfigDict(extra="allow")

    size_bytes: int = Field(ge=0)
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(size_bytes=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)

    def matches(self, st: os.stat_result) -> bool:
        return (self.size_bytes, self.mtime_ns, self.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)


PROJECTOR_SUFFIX = ".mmproj" + GGUF_SUFFIX


def projector_file_for(model_file: str) -> str:
    """The store file of a model's projector: `qwen3.6-27b.gguf` -> `qwen3.6-27b.mmproj.gguf`."""
    return model_file.removesuffix(GGUF_SUFFIX) + PROJECTOR_SUFFIX


class ProjectorRecord(BaseModel):
    """The vision projector (llama.cpp mmproj GGUF) installed with a model."""

    model_config = ConfigDict(extra="allow")

    file: str = Field(description="The projector's file name in the store, beside the model.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    source_url: str
    verified_file: FileStamp | None = Field(
        default=None, description="The projector file whose bytes had `sha256` when it was recorded."
    )


class Sidecar(BaseModel):
    """What an install knows about a model file. Unknown keys are kept (newer writers)."""

    model_config = ConfigDict(extra="allow")

    format_version: Literal[1] = 1
    name: str = Field(description="Catalogue name, family:tag.")
    purpose: Purpose
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source_url: str
    size_bytes: int = Field(ge=0)
    installed_at: datetime
    catalogue: dict[str, Any] | None = Field(
        default=None, description="The catalogue entry's facts at install time."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Per-model runtime overrides (n_ctx, n_gpu_layers, ...) for the inference service.",
    )
    verified_file: FileStamp | None = Field(
        default=None,
        description="The file whose bytes had `sha256` when this sidecar was written (None: an older "
        "writer, which recorded only the size).",
    )
    sha256_found: str | None = Field(
        default=None,
        description="Set by a verification that hashed the file and found other bytes: their sha256.",
    )
    projector: ProjectorRecord | None = Field(
        default=None, description="The vision projector installed with the model, if any."
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return str(parse_name(value))


@dataclass(frozen=True)
class SidecarCheck:
    """A sidecar read against the file beside it.

    `sidecar` is None when there is none or it is ignored (`problem` says why). `verified` is True
    only when the file still has the stamp recorded at verification; otherwise `problem` says so
    and the sidecar still names the model, but its `sha256` vouches for nothing."""

    sidecar: Sidecar | None
    problem: str | None
    verified: bool

    @property
    def pinned(self) -> bool:
        """A verified catalogue install: the bytes are the catalogue's pinned ones."""
        return self.verified and self.sidecar is not None and self.sidecar.catalogue is not None


def sidecar_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.name + SIDECAR_SUFFIX)


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def write_sidecar(
    gguf_path: Path, sidecar: Sidecar, *, stamp: bool = True, verified: os.stat_result | None = None
) -> None:
    """Write the sidecar of `gguf_path`. With `stamp` (call it right after verifying the bytes) it
    records the file as the verified one: as `verified` (the stat taken when it was verified)
    says, else as it is now."""
    if stamp:
        st = verified if verified is not None else gguf_path.stat()
        sidecar = sidecar.model_copy(update={"verified_file": FileStamp.of(st), "sha256_found": None})
    data = json.dumps(sidecar.model_dump(mode="json"), indent=2, sort_keys=True)
    atomic_write_bytes(sidecar_path(gguf_path), (data + "\n").encode("utf-8"))


def read_small_file(path: Path, limit: int = MAX_SIDECAR_BYTES) -> bytes:
    """The bytes of the small regular file at `path`, never following a link at its name, never
    blocking on a FIFO, never reading more than `limit`. Raises OSError or ValueError."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("it is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"it has {st.st_size:,} bytes, more than the {limit:,} expected")
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise ValueError(f"it grew past the {limit:,} bytes expected")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _load(gguf_path: Path) -> tuple[Sidecar | None, str | None]:
    """The parsed sidecar beside `gguf_path`, or None and why it is ignored (None, None: none)."""
    path = sidecar_path(gguf_path)
    try:
        raw = read_small_file(path)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno in (errno.ELOOP, errno.EMLINK) else exc.strerror
        return None, f"sidecar {path.name} unreadable ({why}); ignored"
    except ValueError as exc:
        return None, f"sidecar {path.name} refused ({exc}); ignored"
    try:
        return Sidecar.model_validate(json.loads(raw)), None
    except (ValueError, ValidationError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, ValidationError):
            err = exc.errors()[0]
            first = f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
        return None, f"sidecar {path.name} is corrupt ({first[:200]}); ignored"


def _stale(gguf_path: Path, sidecar: Sidecar, file_size: int) -> str | None:
    if sidecar.size_bytes == file_size:
        return None
    return (
        f"sidecar {sidecar_path(gguf_path).name} is stale (it records {sidecar.size_bytes} bytes, "
        f"the file has {file_size}); ignored"
    )


def check_sidecar(gguf_path: Path, st: os.stat_result) -> SidecarCheck:
    """The sidecar beside `gguf_path`, judged against the file's `st` (its stat, or its fstat
    when the caller holds it open)."""
    sidecar, problem = _load(gguf_path)
    if sidecar is None:
        return SidecarCheck(None, problem, False)
    stale = _stale(gguf_path, sidecar, st.st_size)
    if stale:
        return SidecarCheck(None, stale, False)
    if sidecar.sha256_found is not None:
        return SidecarCheck(
            sidecar,
            f"sha256 mismatch: a verification found {sidecar.sha256_found}, the sidecar records "
            f"{sidecar.sha256}; the file is not the one that was installed",
            False,
        )
    stamp = sidecar.verified_file
    if stamp is None:
        return SidecarCheck(
            sidecar,
            "unverified: the sidecar (from an older Pendra) records only the size, so its sha256 "
            "is not vouched for until the file is verified again",
            False,
        )
    if not stamp.matches(st):
        replaced = stamp.inode != st.st_ino
        return SidecarCheck(
            sidecar,
            f"unverified: the file was {'replaced' if replaced else 'rewritten'} since it was "
            f"verified (same size, another {'inode' if replaced else 'modification time'}); its "
            "recorded sha256 no longer vouches for it",
            False,
        )
    return SidecarCheck(sidecar, None, True)


def read_sidecar(gguf_path: Path, file_size: int) -> tuple[Sidecar | None, str | None]:
    """The sidecar beside `gguf_path` and None, or None and why it is not trusted.

    (None, None) means there is no sidecar at all. This checks the size only; `check_sidecar`
    also says whether the file is still the verified one, and `read_verified_sidecar` refuses a
    sidecar whose file is not.
    """
    sidecar, problem = _load(gguf_path)
    if sidecar is None:
        return None, problem
    stale = _stale(gguf_path, sidecar, file_size)
    return (None, stale) if stale else (sidecar, None)


def read_verified_sidecar(gguf_path: Path) -> tuple[Sidecar | None, str | None]:
    """The sidecar beside `gguf_path` when the file is still the one it verified; else None and
    why (None, None: no sidecar). An install that finds None re-hashes the file before trusting
    it, and re-stamps it when its bytes are the pinned ones."""
    try:
        st = os.stat(gguf_path)
    except OSError as exc:
        return None, f"{gguf_path.name} unreadable ({exc.strerror})"
    check = check_sidecar(gguf_path, st)
    if check.verified:
        return check.sidecar, None
    return None, check.problem
