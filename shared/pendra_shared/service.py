"""The entry point every service's `python -m` shares: logging, settings, and a clean exit."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pendra_shared.config import Settings, load_settings
from pendra_shared.errors import PendraError


def run_service(name: str, run: Callable[[Settings], None]) -> None:
    """Run one service until it stops; a Pendra error (bad settings) is one line on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(load_settings())
    except PendraError as exc:
        sys.stderr.write(f"pendra {name}: error: {exc}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
