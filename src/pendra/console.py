"""Output helpers shared by the CLI commands: one Rich console each for stdout and stderr,
human-readable sizes, and JSON printing for `--json`."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

# Piped output is not cut to 80 columns: names and hashes must stay whole for scripts and logs.
_WIDE = None if sys.stdout.isatty() else 240
out = Console(highlight=False, width=_WIDE)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=str), highlight=False)
