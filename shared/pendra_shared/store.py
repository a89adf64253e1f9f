"""The modelstore: a directory of GGUF files, each optionally with its sidecar.

`ModelStore.scan()` lists every `*.gguf` at the top of the directory with what it is: its name
(from the sidecar, else the file's stem), its purpose (sidecar, else GGUF metadata) and the facts
in its header. A file that is not a usable GGUF, or a link that points out of the store, is listed
as invalid with the reason and is never offered as a model. Operations take names, never paths, and
only ever touch direct children of the store directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pendra_shared.errors import InvalidModelName, ModelNotFound, StoreError
from pendra_shared.fsutil import CHUNK, exclusive_lock, fsync_dir, temp_path_for
from pendra_shared.gguf_info import GGUFFacts, InvalidGGUF, read_gguf_facts
from pendra_shared.names import GGUF_SUFFIX, file_name_for, name_for_file, parse_name
from pendra_shared.sidecar import (
    SIDECAR_SUFFIX,
    Sidecar,
    now_utc,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"


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
            "source_url": self.sidecar.source_url if self.sidecar else None,
            "installed_at": self.sidecar.installed_at.isoformat() if self.sidecar else None,
            "facts": self.facts.as_dict() if self.facts else None,
            "error": self.error,
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class ScanResult:
    models: list[StoredModel]
    problems: list[str]  # store-level: orphaned sidecars and the like

    @property
    def valid(self) -> list[StoredModel]:
        return [m for m in self.models if m.valid]


_FactsKey = tuple[str, int, int, int]


class ModelStore:
    """The store directory. Thread-safe; header facts are cached by file identity."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root.expanduser()))
        self._facts_cache: dict[_FactsKey, GGUFFacts | str] = {}
        self._cache_lock = threading.Lock()

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

    def _facts(self, path: Path, st: os.stat_result) -> GGUFFacts | str:
        key = (path.name, st.st_size, st.st_mtime_ns, st.st_ino)
        with self._cache_lock:
            cached = self._facts_cache.get(key)
        if cached is not None:
            return cached
        try:
            result: GGUFFacts | str = read_gguf_facts(path)
        except InvalidGGUF as exc:
            result = str(exc)
        with self._cache_lock:
            self._facts_cache = {k: v for k, v in self._facts_cache.items() if k[0] != path.name}
            self._facts_cache[key] = result
        return result

    def _entry(self, dirent: os.DirEntry[str]) -> StoredModel | None:
        path = Path(dirent.path)
        fallback_name = name_for_file(dirent.name) or dirent.name
        try:
            st = path.stat()  # follows links
        except OSError as exc:
            lst = path.lstat()
            return StoredModel(
                fallback_name,
                dirent.name,
                path,
                lst.st_size,
                datetime.fromtimestamp(lst.st_mtime, UTC),
                None,
                None,
                error=f"unreadable: {exc.strerror or exc}",
            )
        modified = datetime.fromtimestamp(st.st_mtime, UTC)
        if not dirent.is_file():
            return None
        if dirent.is_symlink() and not self._inside(path):
            return StoredModel(
                fallback_name,
                dirent.name,
                path,
                st.st_size,
                modified,
                None,
                None,
                error="symbolic link points outside the store; not used",
            )
        sidecar, problem = read_sidecar(path, st.st_size)
        facts = self._facts(path, st)
        model = StoredModel(
            name=sidecar.name if sidecar else fallback_name,
            file_name=dirent.name,
            path=path,
            size_bytes=st.st_size,
            modified=modified,
            facts=facts if isinstance(facts, GGUFFacts) else None,
            sidecar=sidecar,
            error=f"invalid GGUF: {facts}" if isinstance(facts, str) else None,
        )
        if problem:
            model.problems.append(problem)
        if sidecar is None and name_for_file(dirent.name) is None:
            model.error = model.error or "the file name leaves no usable model name; rename it"
        return model

    def scan(self) -> ScanResult:
        """Everything in the store, valid models first-come by name."""
        try:
            dirents = sorted(os.scandir(self.root), key=lambda d: d.name)
        except FileNotFoundError:
            return ScanResult([], [])
        models: list[StoredModel] = []
        problems: list[str] = []
        names = {d.name for d in dirents}
        for dirent in dirents:
            if dirent.name.startswith("."):
                continue
            if dirent.name.lower().endswith(GGUF_SUFFIX):
                entry = self._entry(dirent)
                if entry is not None:
                    models.append(entry)
            elif dirent.name.endswith(GGUF_SUFFIX + SIDECAR_SUFFIX):
                if dirent.name[: -len(SIDECAR_SUFFIX)] not in names:
                    problems.append(f"orphaned sidecar {dirent.name} (no GGUF beside it); ignored")
        # Curated files (with a sidecar) claim their names before hand-dropped ones.
        seen: dict[str, StoredModel] = {}
        for model in sorted(models, key=lambda m: (m.sidecar is None, m.file_name)):
            if not model.valid:
                continue
            if model.name in seen:
                model.error = f"name {model.name!r} is already used by {seen[model.name].file_name}"
            else:
                seen[model.name] = model
        return ScanResult(models, problems)

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

    # -- writing -----------------------------------------------------------------------------

    def uninstall(self, name: str) -> StoredModel:
        """Remove the model's GGUF and its sidecar, and nothing else."""
        model = self.find(name, include_invalid=True)
        with exclusive_lock(self.lock_for(model.file_name)):
            path = self.child(model.file_name)
            path.unlink(missing_ok=True)  # a link is removed, never what it points to
            sidecar_path(path).unlink(missing_ok=True)
        fsync_dir(self.root)
        logger.info("uninstalled %s (%s)", model.name, model.file_name)
        return model

    def import_file(
        self,
        source: Path,
        *,
        name: str | None = None,
        move: bool = False,
        purpose: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> StoredModel:
        """Copy (or move) a local GGUF into the store with a computed sha256 and a sidecar."""
        source = source.expanduser()
        if not source.is_file():
            raise StoreError(f"{source} is not a file")
        try:
            facts = read_gguf_facts(source)
        except InvalidGGUF as exc:
            raise StoreError(f"{source} is not a usable GGUF model: {exc}") from None
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
            fsync_dir(self.root)
            write_sidecar(
                target,
                Sidecar(
                    name=str(ref),
                    purpose=purpose or facts.purpose,  # type: ignore[arg-type]
                    sha256=digest.hexdigest(),
                    source_url=source.resolve().as_uri(),
                    size_bytes=target.stat().st_size,
                    installed_at=now_utc(),
                ),
            )
        if move:
            source.unlink()
        return self.find(str(ref))
