"""The sidecar `<file>.gguf.meta.json` that records what a curated model is and where it came from.

Installs write it last, atomically, after the GGUF is verified and in place. Readers trust it only
when it parses, names a valid model and still matches the file beside it (same size); anything else
is reported as a problem and ignored.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pendra_shared.fsutil import atomic_write_bytes
from pendra_shared.names import parse_name

SIDECAR_SUFFIX = ".meta.json"
Purpose = Literal["chat", "embedding", "image", "transcription"]


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

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return str(parse_name(value))


def sidecar_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.name + SIDECAR_SUFFIX)


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def write_sidecar(gguf_path: Path, sidecar: Sidecar) -> None:
    data = json.dumps(sidecar.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(sidecar_path(gguf_path), data.encode("utf-8"))


def read_sidecar(gguf_path: Path, file_size: int) -> tuple[Sidecar | None, str | None]:
    """The sidecar beside `gguf_path` and None, or None and why it is not trusted.

    (None, None) means there is no sidecar at all.
    """
    path = sidecar_path(gguf_path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"sidecar {path.name} unreadable ({exc.strerror}); ignored"
    try:
        sidecar = Sidecar.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, ValidationError):
            err = exc.errors()[0]
            first = f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
        return None, f"sidecar {path.name} is corrupt ({first}); ignored"
    if sidecar.size_bytes != file_size:
        return None, (
            f"sidecar {path.name} is stale (it records {sidecar.size_bytes} bytes, the file has "
            f"{file_size}); ignored"
        )
    return sidecar, None
