"""The modelstore: a directory of GGUF files, each optionally with its sidecar.

`ModelStore.scan()` lists every `*.gguf` at the top of the directory with what it is: its name
(from the sidecar, else the file's stem), its purpose (sidecar, else GGUF metadata), the facts
in its header and whether it is still the file a pinned install verified (`trusted`). A file that
is not a usable GGUF, a link that points out of the store or loops, an unreadable file, or one that
llama.cpp could not load in a probe (`mark_invalid`) is listed as invalid with the reason and is
never offered as a model; directories, FIFOs and device nodes named `*.gguf` are skipped with a
store-level problem. Listing never opens anything but regular files, and those without blocking.
Hard links are ordinary files here: their bytes are checked like any other's. Operations take
names, never paths, and only ever touch direct children of the store directory.

A `*.gguf` whose header is a vision projector's (llama.cpp's mmproj, architecture `clip`) is no
model: it is listed with the model whose sidecar names it (`StoredModel.projector`, once it is
inside the store, a regular file, a projector by its header and still the verified file; else
`projector_problem` says why and the model is served for text alone), and reported as a store
problem when no model names it.

Replace a model file only by writing a new file and renaming it over the old one (as installs and
imports do): llama.cpp maps a loaded model into memory, so rewriting or truncating it in place can
kill the server (SIGBUS) before the change is noticed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pendra_shared import chat_family
from pendra_shared.config import Settings
from pendra_shared.errors import InvalidModelName, ModelNotFound, StoreError
from pendra_shared.fsutil import CHUNK, atomic_write_bytes, exclusive_lock, fsync_dir, temp_path_for
from pendra_shared.gguf_header import DEFAULT_MAX_ARRAY_LEN, DEFAULT_MAX_STRING_BYTES
from pendra_shared.gguf_info import GGUFFacts, InvalidGGUF, ProjectorGGUF, check_projector, read_gguf_facts
from pendra_shared.names import GGUF_SUFFIX, file_name_for, name_for_file, parse_name
from pendra_shared.sidecar import (
    SIDECAR_SUFFIX,
    FileStamp,
    ProjectorRecord,
    Sidecar,
    check_sidecar,
    now_utc,
    projector_file_for,
    read_small_file,
    sidecar_path,
    write_sidecar,
)

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
VERDICT_DIR = ".probe"  # why llama.cpp refused a file, per file identity (see `mark_invalid`)
_PROC_FD = Path("/proc/self/fd")

# (file name, size, mtime_ns, inode): a file as it is now; any change of content or a replacement
# gives another identity.
FileIdentity = tuple[str, int, int, int]

# (device, inode, mtime_ns, ctime_ns) of the store directory: creating, renaming or removing a GGUF
# or a sidecar in it (installs, uninstalls, imports, hand-drops) changes it.
StoreStamp = tuple[int, int, int, int]
# A directory's times move in the file system's timestamp steps (a clock tick on Linux, up to
# seconds on some network and FAT mounts): a second change within the step of the first leaves
# them as they were. A stamp younger than this is not trusted to tell that a scan is current.
STAMP_SETTLE_NS = 1_000_000_000


def identity_of(name: str, st: os.stat_result) -> FileIdentity:
    return (name, st.st_size, st.st_mtime_ns, st.st_ino)


def open_regular(path: Path) -> int:
    """An fd for reading the regular file at `path` (links followed). Never blocks (a FIFO opens
    at once and is refused), never becomes a controlling terminal. Raises OSError, or
    IsADirectoryError naming what it is when it is not a regular file."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, _kind(st.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(fd: int, fallback: Path) -> Path:
    """A path that opens exactly the file behind `fd` (Linux: /proc/self/fd/N), so what is read
    is what was checked even if the name is replaced meanwhile; `fallback` elsewhere."""
    proc = _PROC_FD / str(fd)
    return proc if _PROC_FD.is_dir() else fallback


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


@dataclass
class StoredModel:
    """One `*.gguf` in the store, valid or not."""

    name: str
    file_name: str
    path: Path
    size_bytes: int
    modified: datetime
    facts: GGUFFacts | None
    sidecar: Sidecar | None
    error: str | None = None  # why the file cannot be served; None when it can
    problems: list[str] = field(default_factory=list)  # things worth a warning
    verified: bool = False  # the sidecar's sha256 still vouches for the file (its stamp matches)
    trusted: bool = False  # verified, and from a pinned catalogue install
    identity: FileIdentity | None = None  # the file as scanned
    projector: Path | None = None  # the vision projector its sidecar names, when usable
    projector_problem: str | None = None  # why the projector its sidecar names is not usable

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        return "ready" if self.valid else "invalid"

    @property
    def purpose(self) -> str | None:
        if self.sidecar is not None:
            return self.sidecar.purpose
        return self.facts.purpose if self.facts is not None else None

    @property
    def origin(self) -> str:
        return "sidecar" if self.sidecar is not None else "hand-dropped"

    @property
    def capabilities(self) -> list[str]:
        """Ollama's words for what the model can do (completion, tools, thinking, embedding), read
        from the chat template the inference service renders with: a sidecar's
        `options.chat_template`, else the file's own (the templates it falls back to for a file
        without one know neither tools nor thinking). A sidecar's `options.chat_format` names the
        family instead of the template's markers; `vision` where a projector is paired with it.
        Empty for an invalid file."""
        if not self.valid:
            return []
        options = self.sidecar.options if self.sidecar else {}
        template = options.get("chat_template")
        if not isinstance(template, str) or not template:
            template = self.facts.chat_template if self.facts else None
        override = options.get("chat_format")
        return chat_family.capabilities(
            template,
            self.purpose or "",
            vision=self.projector is not None,
            override=override if isinstance(override, str) else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file_name,
            "path": str(self.path),
            "status": self.status,
            "purpose": self.purpose,
            "size_bytes": self.size_bytes,
            "modified": self.modified.isoformat(),
            "origin": self.origin,
            "sha256": self.sidecar.sha256 if self.sidecar else None,
            "verified": self.verified,
            "trusted": self.trusted,
            "source_url": self.sidecar.source_url if self.sidecar else None,
            "installed_at": self.sidecar.installed_at.isoformat() if self.sidecar else None,
            "facts": self.facts.as_dict() if self.facts else None,
            "projector": self.projector.name if self.projector else None,
            "projector_problem": self.projector_problem,
            "error": self.error,
            "problems": list(self.problems),
        }


def by_name(models: list[StoredModel], name: str) -> StoredModel | None:
    """The model `name` means, Ollama style: that exact name; or, for a name without a tag, the
    family's catalogue default that is installed, else its `latest`, else its only model."""
    exact = next((m for m in models if m.name == name), None)
    if exact is not None or ":" in name:
        return exact
    family = [m for m in models if m.name.partition(":")[0] == name]
    defaults = [m for m in family if m.sidecar and (m.sidecar.catalogue or {}).get("default")]
    latest = [m for m in family if m.name == f"{name}:latest"]
    for group in (defaults, latest, family):
        if len(group) == 1:
            return group[0]
    return None


@dataclass(frozen=True)
class Verification:
    """What re-hashing a model's file found. `matches` is None when no sidecar records a sha256."""

    model: StoredModel
    sha256: str
    matches: bool | None
    message: str


@dataclass(frozen=True)
class ScanResult:
    models: list[StoredModel]
    problems: list[str]  # store-level: orphaned sidecars and the like
    stamp: StoreStamp | None = None  # the store directory, taken before the scan (see `stamp`)
    projectors: tuple[str, ...] = ()  # file names of the vision projectors in the store

    @property
    def valid(self) -> list[StoredModel]:
        return [m for m in self.models if m.valid]


class ModelStore:
    """The store directory. Thread-safe; header facts are cached by file identity."""

    def __init__(
        self,
        root: Path,
        *,
        gguf_max_string_bytes: int = DEFAULT_MAX_STRING_BYTES,
        gguf_max_array_len: int = DEFAULT_MAX_ARRAY_LEN,
    ) -> None:
        self.root = Path(os.path.abspath(root.expanduser()))
        self.gguf_limits = {"max_string_bytes": gguf_max_string_bytes, "max_array_len": gguf_max_array_len}
        self._facts_cache: dict[FileIdentity, GGUFFacts | InvalidGGUF] = {}
        self._verdicts: dict[str, tuple[FileIdentity, str]] = {}
        self._cache_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelStore:
        """The store PENDRA_MODELS_DIR names, with the GGUF header limits the settings give."""
        return cls(
            settings.models_dir,
            gguf_max_string_bytes=settings.gguf_max_string_bytes,
            gguf_max_array_len=settings.gguf_max_array_len,
        )

    # -- paths -------------------------------------------------------------------------------

    @property
    def partial_dir(self) -> Path:
        return self.root / PARTIAL_DIR

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.partial_dir.mkdir(exist_ok=True)

    def child(self, file_name: str) -> Path:
        """A direct child of the store; refuses anything that would resolve elsewhere."""
        if os.path.basename(file_name) != file_name or file_name in ("", ".", ".."):
            raise StoreError(f"refusing file name {file_name!r}: not a plain name in the store")
        if "\x00" in file_name or "/" in file_name or "\\" in file_name:
            raise StoreError(f"refusing file name {file_name!r}: not a plain name in the store")
        return self.root / file_name

    def _inside(self, path: Path) -> bool:
        try:
            real = Path(os.path.realpath(path))
            return real.parent == Path(os.path.realpath(self.root))
        except OSError:
            return False

    def lock_for(self, file_name: str) -> Path:
        return self.partial_dir / f"{file_name}.lock"

    # -- reading -----------------------------------------------------------------------------

    def _facts(self, path: Path, fd: int, st: os.stat_result) -> GGUFFacts | InvalidGGUF:
        """The header's facts, or why it is no model (`ProjectorGGUF` for a projector)."""
        key = identity_of(path.name, st)
        with self._cache_lock:
            cached = self._facts_cache.get(key)
        if cached is not None:
            return cached
        try:
            result: GGUFFacts | InvalidGGUF = read_gguf_facts(fd_path(fd, path), **self.gguf_limits)
        except InvalidGGUF as exc:
            result = exc
        with self._cache_lock:
            self._facts_cache = {k: v for k, v in self._facts_cache.items() if k[0] != path.name}
            self._facts_cache[key] = result
        return result

    def _opened_inside(self, fd: int) -> bool:
        """Whether the file behind `fd` is a direct child of the store (a link may have been
        re-pointed since it was checked); True where that cannot be asked."""
        proc = _PROC_FD / str(fd)
        try:
            target = os.readlink(proc)
        except OSError:
            return True
        return Path(target).parent == Path(os.path.realpath(self.root))

    def _entry(
        self, dirent: os.DirEntry[str], problems: list[str], projectors: list[str]
    ) -> StoredModel | None:
        """The model `dirent` is; None for what is none (a projector goes into `projectors`)."""
        path = Path(dirent.path)
        fallback_name = name_for_file(dirent.name) or dirent.name

        def invalid(st: os.stat_result, error: str) -> StoredModel:
            return StoredModel(
                fallback_name,
                dirent.name,
                path,
                st.st_size,
                datetime.fromtimestamp(st.st_mtime, UTC),
                None,
                None,
                error=error,
            )

        try:
            st = os.stat(path)  # follows links; opens nothing
        except OSError as exc:
            try:
                lst = os.lstat(path)
            except OSError:
                return None  # gone since the directory was read
            if exc.errno == errno.ELOOP:
                return invalid(lst, "symbolic link loops; not used")
            if exc.errno == errno.ENOENT:
                return invalid(lst, "symbolic link points at nothing; not used")
            return invalid(lst, f"unreadable: {exc.strerror or exc}")
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{dirent.name} is {_kind(st.st_mode)}, not a model file; skipped")
            return None
        link = dirent.is_symlink()
        if link and not self._inside(path):
            return invalid(st, "symbolic link points outside the store; not used")
        try:
            fd = open_regular(path)
        except IsADirectoryError as exc:  # replaced since the stat
            problems.append(f"{dirent.name} is {exc.strerror}, not a model file; skipped")
            return None
        except OSError as exc:
            return invalid(st, f"unreadable: {exc.strerror or exc}")
        try:
            st = os.fstat(fd)
            if link and not self._opened_inside(fd):
                return invalid(st, "symbolic link points outside the store; not used")
            check = check_sidecar(path, st)
            facts = self._facts(path, fd, st)
        finally:
            os.close(fd)
        if isinstance(facts, ProjectorGGUF):
            projectors.append(dirent.name)
            return None
        sidecar = check.sidecar
        identity = identity_of(dirent.name, st)
        model = StoredModel(
            name=sidecar.name if sidecar else fallback_name,
            file_name=dirent.name,
            path=path,
            size_bytes=st.st_size,
            modified=datetime.fromtimestamp(st.st_mtime, UTC),
            facts=facts if isinstance(facts, GGUFFacts) else None,
            sidecar=sidecar,
            error=f"invalid GGUF: {facts}" if isinstance(facts, InvalidGGUF) else None,
            verified=check.verified,
            trusted=check.pinned,
            identity=identity,
        )
        if check.problem:
            model.problems.append(check.problem)
        if sidecar is None and name_for_file(dirent.name) is None:
            model.error = model.error or "the file name leaves no usable model name; rename it"
        model.error = model.error or self.verdict(identity)
        if sidecar is not None and sidecar.projector is not None:
            model.projector, model.projector_problem = self._projector(sidecar.projector)
            if model.projector_problem:
                model.problems.append(model.projector_problem)
        return model

    def _projector(self, record: ProjectorRecord) -> tuple[Path | None, str | None]:
        """The projector a sidecar names, or None and why it is not used: it must be a direct
        child of the store (a link only to one), a regular file, a projector by its header and
        still the file that was verified."""
        name = record.file
        unused = "; the model is served without vision"
        try:
            path = self.child(name)
        except StoreError:
            return None, f"projector {name!r} is not a file name in the store{unused}"
        if not name.lower().endswith(GGUF_SUFFIX):
            return None, f"projector {name!r} is not a .gguf file{unused}"
        if os.path.islink(path) and not self._inside(path):
            return None, f"projector {name} is a symbolic link out of the store{unused}"
        try:
            fd = open_regular(path)
        except FileNotFoundError:
            return None, f"projector {name} is missing{unused}"
        except IsADirectoryError as exc:
            return None, f"projector {name} is {exc.strerror}, not a file{unused}"
        except OSError as exc:
            return None, f"projector {name} is unreadable ({exc.strerror or exc}){unused}"
        try:
            st = os.fstat(fd)
            if not self._opened_inside(fd):
                return None, f"projector {name} is a symbolic link out of the store{unused}"
            facts = self._facts(path, fd, st)
        finally:
            os.close(fd)
        if not isinstance(facts, ProjectorGGUF):
            why = "it is a model" if isinstance(facts, GGUFFacts) else f"invalid GGUF: {facts}"
            return None, f"projector {name} is not a vision projector ({why}){unused}"
        if record.verified_file is None or not record.verified_file.matches(st):
            return None, (
                f"projector {name} changed since it was verified (its size, modification time or "
                f"inode differ); its recorded sha256 no longer vouches for it{unused} until "
                "`pendra models verify` checks it again"
            )
        return path, None

    # -- probe verdicts ----------------------------------------------------------------------

    def _verdict_path(self, file_name: str) -> Path:
        return self.root / VERDICT_DIR / f"{file_name}.json"

    def mark_invalid(self, identity: FileIdentity, reason: str, *, persist: bool = True) -> None:
        """Record that the file with `identity` must not be served (llama.cpp crashed or failed
        loading it), until it changes. Kept in memory and, with `persist` and where the store is
        writable, on disk for other processes (`pendra models list`) and restarts."""
        with self._cache_lock:
            self._verdicts[identity[0]] = (identity, reason)
        if not persist:
            return
        record = {"size_bytes": identity[1], "mtime_ns": identity[2], "inode": identity[3], "reason": reason}
        try:
            self._verdict_path(identity[0]).parent.mkdir(exist_ok=True)
            atomic_write_bytes(self._verdict_path(identity[0]), json.dumps(record).encode())
        except OSError as exc:
            logger.debug("cannot record the verdict on %s on disk: %s", identity[0], exc)

    def verdict(self, identity: FileIdentity) -> str | None:
        """Why the file with `identity` was marked invalid, or None."""
        with self._cache_lock:
            remembered = self._verdicts.get(identity[0])
        if remembered is not None and remembered[0] == identity:
            return remembered[1]
        try:
            record = json.loads(read_small_file(self._verdict_path(identity[0]), 16 * 1024))
            recorded = (identity[0], record["size_bytes"], record["mtime_ns"], record["inode"])
            reason = record["reason"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return str(reason)[:1000] if recorded == identity else None

    def stamp(self) -> StoreStamp | None:
        """The store directory's stamp now; None when it is missing or changed within the last
        `STAMP_SETTLE_NS` (too recently to tell a later change in the same timestamp step)."""
        try:
            st = os.stat(self.root)
        except OSError:
            return None
        if abs(time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns)) < STAMP_SETTLE_NS:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    def unchanged_since(self, scan: ScanResult) -> bool:
        """Whether `scan` still lists the store as it is: no GGUF or sidecar has been created,
        renamed or removed since it was taken. (A file rewritten in place does not show here: the
        store watcher and the registry's loaded-file check see those.)"""
        return scan.stamp is not None and self.stamp() == scan.stamp

    def scan(self) -> ScanResult:
        """Everything in the store, valid models first-come by name."""
        stamp = self.stamp()  # before reading: a change made while it reads shows as a new stamp
        try:
            dirents = sorted(os.scandir(self.root), key=lambda d: d.name)
        except FileNotFoundError:
            return ScanResult([], [])
        models: list[StoredModel] = []
        problems: list[str] = []
        projectors: list[str] = []
        names = {d.name for d in dirents}
        for dirent in dirents:
            if dirent.name.startswith("."):
                continue
            if dirent.name.lower().endswith(GGUF_SUFFIX):
                entry = self._entry(dirent, problems, projectors)
                if entry is not None:
                    models.append(entry)
            elif dirent.name.endswith(GGUF_SUFFIX + SIDECAR_SUFFIX):
                if dirent.name[: -len(SIDECAR_SUFFIX)] not in names:
                    problems.append(f"orphaned sidecar {dirent.name} (no GGUF beside it); ignored")
        named = {m.sidecar.projector.file for m in models if m.sidecar and m.sidecar.projector}
        for name in projectors:
            if name not in named:
                problems.append(
                    f"{name} is a vision projector that no model names; not used (it is no model on "
                    f"its own: `pendra models import MODEL.gguf --mmproj {name}` pairs it with one)"
                )
        # Curated files (with a sidecar) claim their names before hand-dropped ones.
        seen: dict[str, StoredModel] = {}
        for model in sorted(models, key=lambda m: (m.sidecar is None, m.file_name)):
            if not model.valid:
                continue
            if model.name in seen:
                model.error = f"name {model.name!r} is already used by {seen[model.name].file_name}"
            else:
                seen[model.name] = model
        return ScanResult(models, problems, stamp, tuple(projectors))

    def find(self, name: str, *, include_invalid: bool = False) -> StoredModel:
        """The model called `name` (also: its file name, or a family with one installed tag)."""
        scan = self.scan()
        candidates = scan.models if include_invalid else scan.valid
        for model in candidates:
            if model.name == name or model.file_name == name:
                return model
        try:
            ref = parse_name(name)
        except InvalidModelName:
            if include_invalid:
                raise ModelNotFound(f"model {name!r} is not in the store ({self.root})") from None
            raise
        for model in candidates:
            if model.name == str(ref):
                return model
        if ref.tag is None:
            family = [m for m in candidates if m.name.split(":", 1)[0] == ref.family]
            if len(family) == 1:
                return family[0]
            if len(family) > 1:
                tags = ", ".join(sorted(m.name for m in family))
                raise ModelNotFound(f"{name!r} matches several installed models ({tags}); name one")
        raise ModelNotFound(f"model {name!r} is not in the store ({self.root})")

    def verify(self, name: str, on_bytes: Callable[[int], None] | None = None) -> Verification:
        """Re-hash the model's file (and the projector its sidecar names) and compare them with
        the sidecar's sha256s. A match stamps the file as verified again (a touched or copied file
        becomes trusted again); a model file's mismatch is recorded in the sidecar, so every
        listing flags it until the file is replaced (a projector's stays unused, unverified)."""
        model = self.find(name, include_invalid=True)
        with exclusive_lock(self.lock_for(model.file_name)):
            path = self.child(model.file_name)
            sha, before = self._hash_unchanged(path, on_bytes)
            sidecar = check_sidecar(path, before).sidecar
            if sidecar is None:
                message = f"{model.file_name} has sha256 {sha}; no usable sidecar records what it should be"
                return Verification(self.find(model.file_name, include_invalid=True), sha, None, message)
            projector_ok, note = True, ""
            if sidecar.projector is not None:
                record, note = self._verify_projector(sidecar.projector, on_bytes)
                projector_ok = record is not None
                sidecar = sidecar.model_copy(update={"projector": record or sidecar.projector})
            if sha == sidecar.sha256:
                write_sidecar(path, sidecar, verified=before)
                message = f"{model.file_name}: sha256 {sha} matches the sidecar; verified"
            else:
                write_sidecar(path, sidecar.model_copy(update={"sha256_found": sha}), stamp=False)
                message = (
                    f"{model.file_name}: sha256 mismatch: the file has {sha}, the sidecar records "
                    f"{sidecar.sha256}; reinstall the model"
                )
            message += note
        logger.info("%s", message)
        return Verification(
            self.find(model.file_name, include_invalid=True),
            sha,
            sha == sidecar.sha256 and projector_ok,
            message,
        )

    def _hash_unchanged(
        self, path: Path, on_bytes: Callable[[int], None] | None
    ) -> tuple[str, os.stat_result]:
        """The sha256 of the regular file at `path` and its stat; StoreError if it changed meanwhile."""
        fd = open_regular(path)
        try:
            before = os.fstat(fd)
            digest = hashlib.sha256()
            while chunk := os.read(fd, CHUNK):
                digest.update(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
            after = os.fstat(fd)
        finally:
            os.close(fd)
        try:
            now = os.stat(path)
        except OSError:
            now = None
        same = identity_of(path.name, before) == identity_of(path.name, after)
        if not same or now is None or identity_of(path.name, now) != identity_of(path.name, before):
            raise StoreError(f"{path.name} changed while it was being verified; try again")
        return digest.hexdigest(), before

    def _verify_projector(
        self, record: ProjectorRecord, on_bytes: Callable[[int], None] | None
    ) -> tuple[ProjectorRecord | None, str]:
        """The record stamped anew when the projector still has its sha256 (else None), and a
        note for the verification's message."""
        name = record.file
        try:
            path = self.child(name)
            if os.path.islink(path) and not self._inside(path):
                return None, f"; projector {name} is a symbolic link out of the store"
            check_projector(path, **self.gguf_limits)
            sha, before = self._hash_unchanged(path, on_bytes)
        except (StoreError, InvalidGGUF, OSError) as exc:
            return None, f"; projector {name} cannot be verified: {exc}"
        if sha != record.sha256:
            return None, (
                f"; projector {name}: sha256 mismatch: the file has {sha}, the sidecar records "
                f"{record.sha256}; reinstall the model"
            )
        stamped = record.model_copy(update={"verified_file": FileStamp.of(before)})
        return stamped, f"; projector {name}: sha256 matches; verified"

    # -- writing -----------------------------------------------------------------------------

    def uninstall(self, name: str) -> StoredModel:
        """Remove the model's GGUF, its sidecar and the projector its sidecar names (when that is
        a projector in the store that no other model's sidecar names), and nothing else."""
        scan = self.scan()
        model = self.find(name, include_invalid=True)
        projector = self._owned_projector(model, scan)
        with exclusive_lock(self.lock_for(model.file_name)):
            path = self.child(model.file_name)
            path.unlink(missing_ok=True)  # a link is removed, never what it points to
            sidecar_path(path).unlink(missing_ok=True)
            self._verdict_path(model.file_name).unlink(missing_ok=True)
            if projector is not None:
                self.child(projector).unlink(missing_ok=True)
        fsync_dir(self.root)
        logger.info("uninstalled %s (%s)", model.name, model.file_name)
        return model

    @staticmethod
    def _owned_projector(model: StoredModel, scan: ScanResult) -> str | None:
        """The projector file that goes with `model` when it is uninstalled: the one its sidecar
        names, if the scan found it to be a projector and no other model's sidecar names it."""
        record = model.sidecar.projector if model.sidecar else None
        if record is None or record.file not in scan.projectors:
            return None
        others = [m.sidecar.projector for m in scan.models if m.file_name != model.file_name and m.sidecar]
        shared = any(other is not None and other.file == record.file for other in others)
        return None if shared else record.file

    def import_file(
        self,
        source: Path,
        *,
        name: str | None = None,
        move: bool = False,
        purpose: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
        projector: Path | None = None,
    ) -> StoredModel:
        """Copy (or move) a local GGUF into the store with a computed sha256 and a sidecar; with
        `projector`, its vision projector too (placed first, the sidecar naming both last)."""
        source = source.expanduser()
        if not source.is_file():
            raise StoreError(f"{source} is not a file")
        try:
            facts = read_gguf_facts(source, **self.gguf_limits)
        except InvalidGGUF as exc:
            raise StoreError(f"{source} is not a usable GGUF model: {exc}") from None
        if projector is not None:
            projector = projector.expanduser()
            if not projector.is_file():
                raise StoreError(f"{projector} is not a file")
            try:
                check_projector(projector, **self.gguf_limits)
            except InvalidGGUF as exc:
                raise StoreError(f"{projector} is not a usable vision projector: {exc}") from None
        raw_name = name if name is not None else name_for_file(source.name)
        if not raw_name:
            raise InvalidModelName(f"cannot derive a model name from {source.name!r}; pass --name")
        ref = parse_name(raw_name)
        file_name = file_name_for(ref)
        target = self.child(file_name)
        self.ensure()
        with exclusive_lock(self.lock_for(file_name)):
            existing = {m.name: m for m in self.scan().models}
            if str(ref) in existing and existing[str(ref)].file_name != file_name:
                raise StoreError(f"a model named {ref} already exists ({existing[str(ref)].file_name})")
            if target.exists():
                raise StoreError(f"{file_name} already exists in the store; uninstall {ref} first")
            record = None
            if projector is not None:
                paired = self.child(projector_file_for(file_name))
                if os.path.lexists(paired):
                    raise StoreError(f"{paired.name} already exists in the store; move it away first")
                sha = _copy_into(projector, paired, on_bytes)
                record = ProjectorRecord(
                    file=paired.name,
                    sha256=sha,
                    size_bytes=paired.stat().st_size,
                    source_url=projector.resolve().as_uri(),
                    verified_file=FileStamp.of(paired.stat()),
                )
            try:
                sha = _copy_into(source, target, on_bytes)
            except BaseException:
                if record is not None:
                    self.child(record.file).unlink(missing_ok=True)
                raise
            fsync_dir(self.root)
            write_sidecar(
                target,
                Sidecar(
                    name=str(ref),
                    purpose=purpose or facts.purpose,  # type: ignore[arg-type]
                    sha256=sha,
                    source_url=source.resolve().as_uri(),
                    size_bytes=target.stat().st_size,
                    installed_at=now_utc(),
                    projector=record,
                ),
            )
        if move:
            source.unlink()
            if projector is not None:
                projector.unlink()
        return self.find(str(ref))


def _copy_into(source: Path, target: Path, on_bytes: Callable[[int], None] | None) -> str:
    """Copy `source` to `target` through a temporary name beside it; its sha256."""
    tmp = temp_path_for(target)
    digest = hashlib.sha256()
    try:
        with source.open("rb") as src, tmp.open("wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copystat(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()
