"""The catalogue: installable variants, each pinned to a URL and a SHA-256.

A catalogue is YAML or JSON (chosen by extension) with a top-level `models` list. The bundled one
ships with Pendra; files or URLs named by `PENDRA_CATALOGUE` merge over it, a later entry replacing
an earlier one of the same name. Names resolve like Ollama's: `family` alone means the family's
default tag (the entry marked `default: true`, else `latest`, else the only variant).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

import httpx
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pendra_shared.errors import CatalogueError, ModelNotFound
from pendra_shared.names import ModelRef, parse_name

SOURCE_SCHEMES = ("https", "http", "file", "s3")
BUNDLED = "bundled"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: object) -> bool:
    """`value` is a SHA-256 as Pendra writes one: exactly 64 lowercase hex digits, nothing else.
    Checked where a digest enters (catalogue entries, jobs, mirror keys), because it becomes part
    of file names and object keys."""
    return isinstance(value, str) and _SHA256_RE.fullmatch(value) is not None


class Sampling(BaseModel):
    """A model's recommended sampling, as its authors publish it (Qwen3.6: temperature 0.7, top_p
    0.8, top_k 20, presence_penalty 1.5 without thinking)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    def values(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Speculative(BaseModel):
    """Speculative decoding: `ngram` drafts up to `draft_tokens` tokens per step from where the
    sequence's last `ngram_max` (down to `ngram_min`) tokens occurred before in its prompt or answer;
    `draft` has `model`, a small installed model of the same vocabulary, write them; `mtp` has the
    model's own multi-token-prediction block (Qwen3.5/3.6) write them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ngram", "draft", "mtp"] = "ngram"
    model: str | None = Field(default=None, min_length=1, max_length=200)
    draft_tokens: int = Field(default=4, ge=1, le=64)
    ngram_min: int = Field(default=2, ge=1, le=64)
    ngram_max: int = Field(default=4, ge=1, le=64)
    # Drafts only while at most this many sequences generate: a fuller batch keeps the hardware
    # busy with real tokens, and checking drafts would take from them.
    max_sequences: int = Field(default=8, ge=1, le=256)

    @model_validator(mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _sizes(self) -> Speculative:
        if self.ngram_min > self.ngram_max:
            raise ValueError("ngram_min is larger than ngram_max")
        if (self.kind == "draft") != (self.model is not None):
            raise ValueError("a draft model is named for kind draft, and only for it")
        return self


class CatalogueEntry(BaseModel):
    """One installable variant. Fields beyond these are kept as extra facts."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(description="family:tag, Ollama style.")
    purpose: Literal["chat", "embedding", "rerank", "image", "transcription"]
    gguf_url: str = Field(description="https://, http://, file:// or s3:// location of the GGUF.")
    gguf_sha256: str = Field(description="SHA-256 of the GGUF, 64 lowercase hex digits.")
    size_bytes: int | None = Field(
        gt=0, description="Exact size of the GGUF in bytes; null where no public record gives it."
    )
    mmproj_url: str | None = Field(
        default=None,
        description="Location of the vision projector (llama.cpp mmproj GGUF) installed beside the "
        "model; same schemes as gguf_url. Needs mmproj_sha256.",
    )
    mmproj_sha256: str | None = Field(default=None, description="SHA-256 of the projector.")
    mmproj_size_bytes: int | None = Field(
        default=None, gt=0, description="Exact size of the projector in bytes, where a record gives it."
    )
    default: bool = Field(default=False, description="This is the family's default tag.")
    allow_private: bool = Field(
        default=False,
        description=(
            "The download (and its redirects) may reach loopback, private, link-local and metadata "
            "addresses, as PENDRA_ALLOW_PRIVATE_SOURCES allows for every entry: a LAN mirror."
        ),
    )
    purpose_from_header: bool = Field(
        default=False,
        description="Record the purpose the verified file's GGUF header gives (hf.co installs).",
    )
    parameters: str | None = None
    quantization: str | None = None
    context_length: int | None = Field(default=None, gt=0)
    state_bytes: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Recurrent state of one sequence of a recurrent or hybrid model (Qwen3.5/3.6's Gated "
            "DeltaNet layers), in bytes, as llama.cpp allocates it: what the console adds to the "
            "file's size for the states and checkpoints a loaded model holds."
        ),
    )
    sampling: Sampling | None = Field(
        default=None,
        description="The model's recommended sampling: what a request that sets none of these gets.",
    )
    speculative: Speculative | None = Field(
        default=None,
        description="Speculative decoding for this model (off when absent); the sidecar's "
        "options.speculative overrides it.",
    )
    license: str | None = None
    description: str | None = None
    source: str = Field(default=BUNDLED, description="The catalogue this entry came from.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        ref = parse_name(value)
        if ref.tag is None:
            raise ValueError(f"{value!r} needs a tag (family:tag)")
        return str(ref)

    @field_validator("gguf_sha256", "mmproj_sha256", mode="before")
    @classmethod
    def _sha(cls, value: Any, info: ValidationInfo) -> Any:
        # Exactly as written: no trimming or case folding, so what is checked is what is used.
        if value is None and info.field_name == "mmproj_sha256":
            return None
        if not is_sha256(value):
            raise ValueError("must be a SHA-256: 64 hexadecimal digits, lowercase, nothing else")
        return value

    @field_validator("gguf_url", "mmproj_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlparse(value)
        if parsed.scheme not in SOURCE_SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SOURCE_SCHEMES)}")
        if parsed.scheme != "file" and not parsed.netloc:
            raise ValueError("URL has no host or bucket")
        return value

    @model_validator(mode="after")
    def _projector_pinned(self) -> CatalogueEntry:
        if (self.mmproj_url is None) != (self.mmproj_sha256 is None):
            raise ValueError("mmproj_url and mmproj_sha256 go together: give both or neither")
        if self.mmproj_size_bytes is not None and self.mmproj_url is None:
            raise ValueError("mmproj_size_bytes needs mmproj_url and mmproj_sha256")
        return self

    @property
    def ref(self) -> ModelRef:
        return parse_name(self.name)

    @property
    def projector(self) -> CatalogueEntry | None:
        """The projector's download as an entry of its own (its URL, pin and size in the GGUF
        fields), for the same verified-download machinery; None when the entry names none."""
        if self.mmproj_url is None or self.mmproj_sha256 is None:
            return None
        return self.model_copy(
            update={
                "gguf_url": self.mmproj_url,
                "gguf_sha256": self.mmproj_sha256,
                "size_bytes": self.mmproj_size_bytes,
                "mmproj_url": None,
                "mmproj_sha256": None,
                "mmproj_size_bytes": None,
            }
        )

    @property
    def total_size_bytes(self) -> int | None:
        """Bytes to download: the GGUF's and, where pinned, its projector's; None when the GGUF's
        size is not pinned (a download learns the sizes from the source)."""
        if self.size_bytes is None:
            return None
        return self.size_bytes + (self.mmproj_size_bytes or 0)

    def facts(self) -> dict[str, Any]:
        """The entry as plain data, for sidecars and JSON output."""
        return self.model_dump(mode="json")


def _parse_document(text: str, location: str) -> Any:
    suffix = Path(urlparse(location).path).suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise CatalogueError(f"catalogue {location}: cannot parse: {exc}") from None
    raise CatalogueError(f"catalogue {location}: unknown format (use .yaml, .yml or .json)")


def _read_location(location: str, timeout_s: float = 30.0) -> str:
    parsed = urlparse(location)
    try:
        if parsed.scheme in ("http", "https"):
            response = httpx.get(location, timeout=timeout_s, follow_redirects=True)
            response.raise_for_status()
            return response.text
        path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(location)
        return path.expanduser().read_text(encoding="utf-8")
    except httpx.HTTPError as exc:
        raise CatalogueError(f"catalogue {location}: cannot fetch: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogueError(f"catalogue {location}: cannot read: {exc}") from None


def parse_catalogue(text: str, location: str) -> list[CatalogueEntry]:
    """Entries of one catalogue document; the first malformed entry is an error naming it."""
    data = _parse_document(text, location)
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CatalogueError(f"catalogue {location}: expected a top-level 'models' list")
    entries: list[CatalogueEntry] = []
    names: set[str] = set()
    for index, raw in enumerate(data["models"]):
        label = f"entry #{index + 1}"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            label += f" ({raw['name']})"
        if not isinstance(raw, dict):
            raise CatalogueError(f"catalogue {location}: {label}: expected a mapping")
        if "size_bytes" not in raw:
            raise CatalogueError(
                f"catalogue {location}: {label}: size_bytes: field required (null if unknown)"
            )
        try:
            entry = CatalogueEntry.model_validate({**raw, "source": location})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "entry"
            raise CatalogueError(f"catalogue {location}: {label}: {where}: {err['msg']}") from None
        if entry.name in names:
            raise CatalogueError(f"catalogue {location}: {label}: duplicate name {entry.name}")
        names.add(entry.name)
        entries.append(entry)
    return entries


def bundled_entries() -> list[CatalogueEntry]:
    text = resources.files("pendra_shared").joinpath("catalogue.yaml").read_text("utf-8")
    return parse_catalogue(text, BUNDLED + ".yaml")


class Catalogue:
    """Merged entries by name, with Ollama-style default tags."""

    def __init__(self, entries: Iterable[CatalogueEntry]) -> None:
        self.entries: dict[str, CatalogueEntry] = {}
        for entry in entries:
            self.entries[entry.name] = entry

    @classmethod
    def load(cls, extra_locations: Iterable[str] = ()) -> Catalogue:
        entries = bundled_entries()
        for location in extra_locations:
            entries.extend(parse_catalogue(_read_location(location), location))
        return cls(entries)

    def __iter__(self) -> Iterator[CatalogueEntry]:
        return iter(sorted(self.entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self.entries)

    def family(self, family: str) -> list[CatalogueEntry]:
        return [e for e in self if e.ref.family == family]

    def default_tag(self, family: str) -> CatalogueEntry:
        variants = self.family(family)
        if not variants:
            raise ModelNotFound(self._not_found_message(family))
        # The last catalogue to mark a default wins, so an extra catalogue can change it.
        marked = [e for e in variants if e.default]
        if marked:
            return marked[-1]
        latest = [e for e in variants if e.ref.tag == "latest"]
        if latest:
            return latest[0]
        if len(variants) == 1:
            return variants[0]
        tags = ", ".join(e.name for e in variants)
        raise ModelNotFound(f"{family!r} has several variants and no default; name one of: {tags}")

    def resolve(self, name: str) -> CatalogueEntry:
        """`family:tag` exactly, or `family` by its default tag."""
        ref = parse_name(name)
        if ref.tag is None:
            return self.default_tag(ref.family)
        entry = self.entries.get(str(ref))
        if entry is None:
            raise ModelNotFound(self._not_found_message(str(ref)))
        return entry

    def search(self, query: str = "", purpose: str | None = None) -> list[CatalogueEntry]:
        words = query.lower().split()
        found = []
        for entry in self:
            if purpose and entry.purpose != purpose:
                continue
            haystack = " ".join(
                str(v)
                for v in (entry.name, entry.description, entry.quantization, entry.parameters, entry.purpose)
                if v
            ).lower()
            if all(word in haystack for word in words):
                found.append(entry)
        return found

    def _not_found_message(self, name: str) -> str:
        family = name.split(":", 1)[0]
        near = [e.name for e in self if e.ref.family == family]
        hint = f"; available: {', '.join(near)}" if near else "; see `pendra models catalogue`"
        return f"{name!r} is not in the catalogue{hint}"
