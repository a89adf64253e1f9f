"""Running one generation in a worker thread and handing its pieces to the event loop.

The thread holds the model's lock for the whole generation (requests to one model are serialized;
different models run side by side). A stop event, polled by llama.cpp's sampler loop every token,
ends the work when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pendra_inference.engine import GenerationParams, Piece
from pendra_inference.registry import Loaded

logger = logging.getLogger(__name__)


@dataclass
class Finished:
    completion_tokens: int


async def generate(
    loaded: Loaded, prompt: list[int], params: GenerationParams, stop: threading.Event
) -> AsyncIterator[Piece | Finished]:
    """Pieces as llama.cpp produces them, then one Finished with the token count."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Piece | Finished | BaseException] = asyncio.Queue()

    def work() -> None:
        try:
            with loaded.lock:
                engine = loaded.engine
                finish = None
                # Closed here, under the lock, even when we stop early: llama.cpp's own stream
                # must not be finalized later from another thread while the model is in use.
                with contextlib.closing(engine.generate(prompt, params, stop.is_set)) as pieces:
                    for piece in pieces:
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                        finish = piece.finish_reason
                        if stop.is_set():
                            break
                done = Finished(engine.generated_tokens)
                stopped = engine.stopped_early or (stop.is_set() and finish is None)
            if stopped:
                logger.info(
                    "%s: client went away; stopped after %d tokens", loaded.name, done.completion_tokens
                )
            loop.call_soon_threadsafe(queue.put_nowait, done)
        except BaseException as exc:  # handed to the event loop, raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return
    finally:
        stop.set()
        # Let the thread finish (within one token) before the model may be unloaded.
        await asyncio.shield(worker)
