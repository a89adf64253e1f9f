"""Watches the store directory and tells the registry when models appear, change or go."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from watchfiles import awatch

from pendra_inference.registry import ModelRegistry

logger = logging.getLogger(__name__)


def _relevant(path: str) -> bool:
    name = Path(path).name
    return name.endswith(".gguf") or name.endswith(".gguf.meta.json")


async def watch_store(registry: ModelRegistry, stop: asyncio.Event) -> None:
    """Rescan on every batch of changes to GGUF files or sidecars (debounced by watchfiles)."""
    root = registry.store.root
    root.mkdir(parents=True, exist_ok=True)
    async for changes in awatch(
        root,
        stop_event=stop,
        recursive=False,
        debounce=400,
        step=50,
        watch_filter=lambda _change, path: _relevant(path),
    ):
        logger.info("store changed (%d events); rescanning", len(changes))
        try:
            await registry.refresh()
        except Exception:
            logger.exception("rescanning the store failed")
