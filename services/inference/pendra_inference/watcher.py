"""Watches the store directory and tells the registry when models appear, change or go.

Two watches run together. Directory events (watchfiles, debounced) rescan the store whenever a
GGUF file or sidecar is created, written, renamed or removed. And every `LOADED_CHECK_S` the
files of the loaded models are stat'ed, because llama.cpp maps a loaded model into memory: a file
truncated or rewritten in place must be noticed before the next request touches a page that is
gone (SIGBUS), even where the file system sends no events (network and some container mounts).
Either way the registry retires the model: it finishes its running requests, unloads, and the
next request judges the new file. Files should only ever be replaced by an atomic rename, which
leaves the loaded mapping intact; this check narrows, but cannot close, the window in which an
in-place rewrite during a running decode still kills the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from watchfiles import awatch

from pendra_inference.registry import ModelRegistry

logger = logging.getLogger(__name__)

LOADED_CHECK_S = 0.5


def _relevant(path: str) -> bool:
    name = Path(path).name
    return name.endswith(".gguf") or name.endswith(".gguf.meta.json")


async def watch_loaded_files(
    registry: ModelRegistry, stop: asyncio.Event, every_s: float = LOADED_CHECK_S
) -> None:
    """Retire loaded models whose file changed, every `every_s`, until `stop` is set."""
    while not stop.is_set():
        try:
            await registry.check_loaded_files()
        except Exception:
            logger.exception("checking the loaded models' files failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def watch_store(registry: ModelRegistry, stop: asyncio.Event) -> None:
    """Rescan on every batch of changes to GGUF files or sidecars (debounced by watchfiles), and
    check the loaded models' files between them."""
    root = registry.store.root
    root.mkdir(parents=True, exist_ok=True)
    loaded_files = asyncio.create_task(watch_loaded_files(registry, stop))
    try:
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
    finally:
        loaded_files.cancel()
        await asyncio.gather(loaded_files, return_exceptions=True)
