"""What the console's pages show, as plain data: catalogue variants grouped by family with whether
each fits the memory Pendra will give it, install failures in words, sizes for people. No HTTP and
no HTML here: the templates render these, the tests read them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.gguf_info import PURPOSES

__all__ = ["PURPOSES"]
from pendra_shared.jobs import Job, JobState

# A loaded model holds its weights plus the KV cache and compute buffers of its context. The
# catalogue gives only the file's size, so the console reckons a fifth more, at least 64 MiB; the
# registry's own figure, once loaded, is on the overview.
OVERHEAD_RATIO = 0.2
OVERHEAD_MIN = 64 * 1024**2
# A recurrent or hybrid model (Qwen3.6) also holds a recurrent state per sequence id and its
# checkpoints: at the least, one running and one cached sequence and two checkpoints for each (see
# the inference registry's `sequence_plan`).
STATES_AT_LEAST = 6
TIGHT_RATIO = 0.8  # past this share of the budget a model fits only with little else loaded

# What an installed model can do beyond plain chat, as its row's badges say it (Ollama's words, from
# its chat template: `StoredModel.capabilities`), with what each means for a person.
CAPABILITY_WORDS = {
    "tools": "Can call tools (functions)",
    "thinking": "Reasons before it answers",
    "vision": "Reads images",
}

# A failed install's error code, said in words for a person (the code itself is shown beside them).
FAILURE_WORDS = {
    "checksum_mismatch": "The downloaded file is not the one the catalogue pins (its SHA-256 differs), "
    "so it was discarded.",
    "disk_full": "The disk filled up while downloading.",
    "insufficient_space": "There is not enough free space in the models directory for this file.",
    "unsupported_source": "Pendra cannot download from this model's source.",
    "source_refused": "The download was refused: the source pointed somewhere Pendra will not go "
    "(a private address, a bad redirect or an encoded body).",
    "download_stalled": "The download stalled: the source stopped sending data.",
    "download_interrupted": "The download was cut off too many times.",
    "store_conflict": "The models directory refused the file (a name clash or a permission problem).",
    "install_failed": "The install failed.",
    "internal_error": "Pendra hit an internal error while installing.",
    "job_lost": "The install job was lost (the queue or its worker went away).",
}


def human_bytes(n: int | float | None) -> str:
    """Sizes as people read them, in powers of 1000 as disks and downloads are sold."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def failure_words(job: Job) -> str:
    return FAILURE_WORDS.get(job.error_code or "", FAILURE_WORDS["install_failed"])


@dataclass(frozen=True)
class Fit:
    """Whether a model of some size fits what this server will give it: `fits`, `tight`,
    `too_big` or `unknown` (no size in the catalogue, or the inference service unreachable)."""

    level: str
    text: str


def memory_needed(size_bytes: int, state_bytes: int | None = None) -> int:
    states = STATES_AT_LEAST * (state_bytes or 0)
    return size_bytes + max(int(size_bytes * OVERHEAD_RATIO), OVERHEAD_MIN) + states


def fit_for(size_bytes: int | None, status: dict[str, Any] | None, state_bytes: int | None = None) -> Fit:
    """Judge against the registry's memory budget and, where models are offloaded to a GPU, the
    GPU memory as well (the registry loads every layer onto it)."""
    if size_bytes is None:
        return Fit("unknown", "Size unknown")
    if not status:
        return Fit("unknown", "Memory unknown: the inference service is not answering")
    need = memory_needed(size_bytes, state_bytes)
    budget = int(status.get("memory_budget_bytes") or 0)
    limits = [("memory budget", budget)] if budget else []
    gpu_memory = sum(
        int(d.get("memory_total") or 0) for d in status.get("devices", ()) if d.get("type") in ("gpu", "igpu")
    )
    if status.get("gpu_offload") and gpu_memory > 0:  # a GPU that reports no memory says nothing
        limits.append(("GPU memory", gpu_memory))
    if not limits:
        return Fit("unknown", "Memory unknown")
    what, room = min(limits, key=lambda limit: limit[1])
    words = f"needs about {human_bytes(need)} of {human_bytes(room)} {what}"
    if need > room:
        return Fit("too_big", f"Too big: {words}")
    if need > room * TIGHT_RATIO:
        return Fit("tight", f"Fits, tightly: {words}")
    return Fit("fits", f"Fits: {words}")


@dataclass
class Variant:
    entry: CatalogueEntry
    installed: bool
    fit: Fit
    job: Job | None = None  # the latest install job of this variant, if the queue still knows it

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def tag(self) -> str:
        return self.entry.ref.tag or ""

    @property
    def active(self) -> bool:
        return self.job is not None and not self.job.final

    @property
    def failed(self) -> bool:
        return self.job is not None and self.job.state is JobState.FAILED and not self.installed

    @property
    def cancelled(self) -> bool:
        return self.job is not None and self.job.state is JobState.CANCELLED and not self.installed


@dataclass
class Family:
    name: str
    variants: list[Variant] = field(default_factory=list)

    def _first(self, attr: str) -> Any:
        """A family-wide fact: the default variant's, else the first variant that has it."""
        ordered = sorted(self.variants, key=lambda v: not v.entry.default)
        return next((getattr(v.entry, attr) for v in ordered if getattr(v.entry, attr)), None)

    @property
    def purpose(self) -> str:
        return str(self._first("purpose"))

    @property
    def description(self) -> str | None:
        value = self._first("description")
        return str(value) if value else None

    @property
    def license(self) -> str | None:
        value = self._first("license")
        return str(value) if value else None

    @property
    def installed(self) -> int:
        return sum(v.installed for v in self.variants)


def group(
    entries: Iterable[CatalogueEntry],
    installed: set[str],
    jobs: Iterable[Job],
    status: dict[str, Any] | None,
) -> list[Family]:
    """Variants grouped by family (in catalogue order), smallest first within a family."""
    latest: dict[str, Job] = {}
    for job in sorted(jobs, key=lambda j: j.updated_at):
        latest[job.model] = job
    families: dict[str, Family] = {}
    for entry in entries:
        family = families.setdefault(entry.ref.family, Family(entry.ref.family))
        family.variants.append(
            Variant(
                entry,
                entry.name in installed,
                fit_for(entry.total_size_bytes, status, entry.state_bytes),  # a pinned projector too
                latest.get(entry.name),
            )
        )
    for family in families.values():
        family.variants.sort(key=lambda v: (v.entry.size_bytes is None, v.entry.size_bytes or 0, v.name))
    return list(families.values())
