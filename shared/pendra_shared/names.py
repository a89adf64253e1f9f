"""Model names: `family[:tag]` in the Ollama style, checked so that no name can leave the store.

A name is lowercase ASCII letters, digits and `._-`, starting with a letter or digit, at most 64
characters a part. That excludes path separators, `..` as a whole part, NUL, drive letters and any
Unicode look-alike, so a name can always be turned into a plain file name inside the store.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from pendra_shared.errors import InvalidModelName

_PART = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME_RE = re.compile(rf"^(?P<family>{_PART})(?::(?P<tag>{_PART}))?$")
_UNSAFE_RE = re.compile(r"[^a-z0-9._-]+")
GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True, order=True)
class ModelRef:
    """A parsed name: `family` and an optional `tag` (None means "the family's default")."""

    family: str
    tag: str | None = None

    def __str__(self) -> str:
        return self.family if self.tag is None else f"{self.family}:{self.tag}"

    def with_tag(self, tag: str) -> ModelRef:
        return ModelRef(self.family, tag)


def parse_name(raw: str) -> ModelRef:
    """Parse `family[:tag]`, refusing anything that is not plain, safe ASCII."""
    if not isinstance(raw, str) or not raw:
        raise InvalidModelName("a model name must be a non-empty string such as 'qwen3:0.6b'")
    if unicodedata.normalize("NFKC", raw) != raw or not raw.isascii():
        raise InvalidModelName(f"invalid model name {raw!r}: only ASCII letters, digits and ._-: are allowed")
    match = _NAME_RE.match(raw.lower())
    if match is None:
        raise InvalidModelName(
            f"invalid model name {raw!r}: expected family[:tag] made of letters, digits and ._- "
            "(each part starting with a letter or digit, at most 64 characters)"
        )
    ref = ModelRef(match["family"], match["tag"])
    if file_name_for(ref).endswith(".mmproj" + GGUF_SUFFIX):
        # (the store keeps a model's vision projector as `<its file's stem>.mmproj.gguf`)
        raise InvalidModelName(f"invalid model name {raw!r}: a name may not end in '.mmproj'")
    return ref


def file_name_for(ref: ModelRef) -> str:
    """The store file for a model: `family-tag.gguf` or `family.gguf` (a plain name, never a path)."""
    stem = ref.family if ref.tag is None else f"{ref.family}-{ref.tag}"
    return stem + GGUF_SUFFIX


def name_for_file(file_name: str) -> str | None:
    """The model name of a hand-dropped file with no sidecar: its stem, lower-cased, with any
    character a name cannot hold turned into `-`. None when nothing usable is left."""
    stem = unicodedata.normalize("NFKD", file_name[: -len(GGUF_SUFFIX)]).encode("ascii", "ignore")
    cleaned = _UNSAFE_RE.sub("-", stem.decode().lower()).lstrip("._-")[:64].rstrip("._-")
    return cleaned or None
