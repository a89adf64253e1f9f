"""Which CPU variant of llama.cpp this host serves with: the self-check's verdict, remembered.

ggml scores each CPU variant of the build by what the CPU reports (cpuid). A CPU can report what it
will not execute: Sapphire Rapids VMs report AMX whose tile instructions the hypervisor refuses,
and there the top-scored variant dies of SIGILL on the first prompt. So the score only orders the
candidates, and the self-check (`selfcheck`, a child process) decides:

1. the candidates are the variants this CPU scores above 0, best first;
2. the self-check runs the first; if it dies of a fault signal (SIGILL, SIGSEGV, ...) the next
   runs, and so on (when an AMX variant dies, every AMX variant is dropped);
3. the first that lives is the verdict, logged in one line when others died ("sapphirerapids died
   of SIGILL in its self-check; serving with zen4") and remembered in the user's cache
   (`PENDRA_CACHE_DIR`) under a key of this build and this CPU: its model name, flags and
   microcode, and the hash of the build's CPU libraries. A later start on the same build and CPU
   begins with the remembered variant; a changed build or CPU is checked again;
4. `PENDRA_CPU_VARIANT` pins a variant: it is never overridden, and when it dies the start fails.

`preflight()` (in `doctor`) calls `decide(check=True)` before a server listens: one self-check
child when a verdict is remembered, as many as it takes when none is. Every process that loads
llama.cpp gets its variant from `variant_for_process()` (through `backends.activate`): the one this
process decided, else the remembered verdict, else the search, run now. No process loads the
top-scored variant on trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from pendra_shared import hostinfo
from pendra_shared.config import Settings

from pendra_inference import backends
from pendra_inference.backends import AMX_VARIANTS, BackendError, CpuVariant
from pendra_inference.selfcheck import REBUILD, SelfCheck, SelfCheckDied, crash_cause, run_selfcheck

logger = logging.getLogger(__name__)

VERDICT_VERSION = 1


@dataclass(frozen=True)
class Death:
    variant: str
    signal: str


@dataclass(frozen=True)
class Verdict:
    """The CPU variant to serve with, and how it was reached."""

    variant: str | None  # None: a build whose CPU backend is linked in
    source: str  # "checked" (now), "remembered" (the cache), "pinned" (PENDRA_CPU_VARIANT), "linked"
    died: tuple[Death, ...] = ()
    cache_file: str | None = None  # where it is remembered

    @property
    def fallback(self) -> str | None:
        """The one line that says which variants died and which serves, when any died."""
        if not self.died:
            return None
        deaths = "; ".join(f"{d.variant} died of {d.signal} in its self-check" for d in self.died)
        return f"{deaths}; serving with {self.variant}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["died"] = [asdict(d) for d in self.died]
        data["fallback"] = self.fallback
        return data


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    check: SelfCheck | None  # the self-check of the verdict's variant, when one ran in this call


# -- the key: this build on this CPU -----------------------------------------------------------


def build_hash(directory: Path | None = None) -> str:
    """The hash of the build's CPU side: the contents of libllama, libggml, libggml-base and every
    CPU variant module, with the names and sizes of the other modules (GPU ones are large)."""
    directory = directory or backends.lib_dir()
    digest = hashlib.sha256(llama_cpp.__version__.encode())
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        stem = backends._stem(path)
        if not stem.startswith(("ggml", "llama")):
            continue
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        if stem in ("llama", "ggml", "ggml-base") or stem.startswith("ggml-cpu"):
            with path.open("rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def host_key() -> dict[str, str]:
    return {**hostinfo.cpu_identity(), "build": build_hash()}


# -- the cache -----------------------------------------------------------------------------------


class VerdictCache:
    """One JSON file per build and CPU under `<cache_dir>/cpu-variant/`. Unreadable, foreign or
    stale files count as absent; a cache that cannot be written (a read-only home) is logged and
    the start goes on."""

    def __init__(self, cache_dir: Path, key: dict[str, str]) -> None:
        self.key = key
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        self.path = cache_dir / "cpu-variant" / f"{name}.json"

    def read(self, variants: list[CpuVariant]) -> Verdict | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") != VERDICT_VERSION or data.get("key") != self.key:
                return None
            names = {v.name for v in variants}
            variant = data["variant"]
            died = tuple(Death(str(d["variant"]), str(d["signal"])) for d in data["died"])
            if variant not in names or any(d.variant not in names for d in died):
                return None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the remembered CPU variant in %s: %s", self.path, exc)
            return None
        return Verdict(variant, "remembered", died, str(self.path))

    def write(self, verdict: Verdict) -> str | None:
        record = {
            "version": VERDICT_VERSION,
            "key": self.key,
            "variant": verdict.variant,
            "died": [asdict(d) for d in verdict.died],
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".verdict-", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
            os.replace(tmp, self.path)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            logger.warning(
                "cannot remember the CPU variant in %s (%s): the next start checks again; "
                "point PENDRA_CACHE_DIR at a writable directory",
                self.path.parent,
                exc,
            )
            return None
        return str(self.path)

    def forget(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # a cache path under a file, a read-only mount
            logger.warning("cannot forget the CPU variant remembered in %s: %s", self.path, exc)


# -- the decision --------------------------------------------------------------------------------


def _all_died(died: list[Death]) -> BackendError:
    listed = ", ".join(f"{d.variant} ({d.signal})" for d in died)
    return BackendError(
        f"llama.cpp died in its start-up self-check with every CPU variant this CPU reports it "
        f"can run ({listed}): {crash_cause(died[-1].signal)}; {REBUILD}"
    )


def still_to_try(candidates: list[CpuVariant], died: list[Death]) -> list[CpuVariant]:
    """The candidates (best first) left once the variants in `died` died: those, and every AMX
    variant as soon as one AMX variant died (a host that refuses tiles refuses them all)."""
    dead = {d.variant for d in died}
    amx_dead = bool(dead & AMX_VARIANTS)
    return [c for c in candidates if c.name not in dead and not (amx_dead and c.name in AMX_VARIANTS)]


def decide(settings: Settings, *, check: bool, fresh: bool = False) -> Decision:
    """The CPU variant to serve with. `check`: run the self-check of the chosen variant even when
    it is remembered (before a server listens); `fresh`: forget what is remembered and search again
    (`pendra doctor --recheck`). Raises a BackendError when no variant lives."""
    pinned = settings.cpu_variant or None
    variants = backends.build_variants()
    if pinned or not variants:
        verdict = Verdict(pinned, "pinned" if pinned else "linked")
        if not check:
            return Decision(verdict, None)
        try:
            return Decision(verdict, run_selfcheck(pinned, threads=settings.n_threads))
        except SelfCheckDied as exc:
            if pinned:
                raise BackendError(
                    f"PENDRA_CPU_VARIANT={pinned} died of {exc.signal} in its start-up self-check: "
                    "this CPU or its OS refuses what it executes; unset PENDRA_CPU_VARIANT, and "
                    "Pendra serves with the best variant that lives here"
                ) from exc
            raise
    candidates = backends.ranked(variants)
    cache = VerdictCache(settings.cache_dir, host_key())
    if fresh:
        cache.forget()
    remembered = cache.read(variants)
    if remembered is not None and not check:
        return Decision(remembered, None)
    died: list[Death] = []
    if remembered is not None:
        died = list(remembered.died)
        candidates = still_to_try(candidates, died)
        # Begin with the remembered variant (a later start costs one self-check, as ever).
        start = next((i for i, c in enumerate(candidates) if c.name == remembered.variant), 0)
        candidates = candidates[start:]
    while candidates:
        candidate = candidates[0]
        try:
            selfcheck = run_selfcheck(candidate.name, threads=settings.n_threads)
        except SelfCheckDied as exc:
            died.append(Death(candidate.name, exc.signal))
            candidates = still_to_try(candidates, died)
            logger.debug(
                "llama.cpp CPU variant %s died of %s in its self-check; next: %s",
                candidate.name,
                exc.signal,
                candidates[0].name if candidates else "none left",
            )
            continue
        verdict = Verdict(candidate.name, "checked", tuple(died))
        if remembered is not None and remembered.variant == verdict.variant:
            verdict = remembered  # the remembered variant lived again: nothing new to write
        else:
            verdict = Verdict(verdict.variant, "checked", verdict.died, cache.write(verdict))
        return Decision(verdict, selfcheck)
    cache.forget()
    raise _all_died(died)


_decided_lock = threading.Lock()
_decided: Verdict | None = None


def decided() -> Verdict | None:
    """The verdict this process serves with, once it has chosen (None until then)."""
    with _decided_lock:
        return _decided


def adopt(verdict: Verdict) -> None:
    """This process serves with `verdict` (decided by its preflight): `activate()` takes it."""
    global _decided
    with _decided_lock:
        _decided = verdict


def variant_for_process(settings: Settings) -> str | None:
    """The CPU variant this process loads: PENDRA_CPU_VARIANT, else what this process decided,
    else the remembered verdict, else the verdict the self-check reaches now."""
    global _decided
    if settings.cpu_variant:
        return settings.cpu_variant
    with _decided_lock:
        if _decided is None:
            _decided = decide(settings, check=False).verdict
            if _decided.fallback:
                logger.warning("llama.cpp CPU variant: %s", _decided.fallback)
        return _decided.variant
