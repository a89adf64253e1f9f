"""Embeddings batched across requests: one thread per embedding model packs the inputs of every
waiting `/v1/embeddings` request into shared llama.cpp decodes.

That thread is the only one that touches the model's llama.cpp context; requests reach it through
a queue and get their vectors back on their event loop. One step of the thread:

1. wait until inputs are queued (a request queues all its inputs at once, requests in arrival order);
2. take inputs from the front of the queue while they fit: at most `token_budget` tokens and the
   context's sequence limit per decode, whole inputs only (an input longer than the budget goes
   alone; the batch is the whole context, so it still fits);
3. one `llama_decode` with each input as its own sequence; pooled, L2-normalized vectors;
4. copy each vector into its request's result; a request whose inputs are all done resolves at
   once (`call_soon_threadsafe`); if the decode fails, the requests it held fail with its error.

The budget is not "as much as fits": an encoder's attention spans the whole decode, so past a few
hundred tokens per decode each embedding costs more (see `embed_batch_tokens` in the settings).
A request whose caller is cancelled has its remaining inputs dropped; `close()` fails whatever
waits and stops the thread once the decode in progress ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque

import numpy as np
from pendra_shared.api_errors import Unavailable

from pendra_inference.engine import LlamaEngine

logger = logging.getLogger(__name__)


class _Request:
    """One caller's inputs, how far the thread has got with them, and where the vectors go."""

    def __init__(self, inputs: list[list[int]], n_embd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.inputs = inputs
        self.loop = loop
        self.future: asyncio.Future[np.ndarray] = loop.create_future()
        self.vectors = np.empty((len(inputs), n_embd), dtype=np.float32)
        self.taken = 0  # inputs handed to a decode so far (the next one is inputs[taken])
        self.left = len(inputs)  # inputs not embedded yet
        self.finished = False  # resolved, failed or dropped: the thread has nothing more to do for it


class EmbedBatcher:
    """The embedding thread of one model. `embed` may be awaited from any number of requests."""

    def __init__(self, engine: LlamaEngine, token_budget: int, name: str) -> None:
        if token_budget < 1:
            raise ValueError(f"token_budget must be at least 1, not {token_budget}")
        self.engine = engine
        self.name = name
        self.max_tokens, self.max_sequences = engine.embed_limits
        self.token_budget = min(token_budget, self.max_tokens)
        self.n_embd = engine.output_width  # a reranker's rows are its scores
        self._cond = threading.Condition()  # guards everything below
        self._queue: deque[_Request] = deque()
        self._live: set[_Request] = set()  # requests not finished
        self._waiting = 0  # inputs queued and not yet taken into a decode
        self._decodes = 0
        self._embedded = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"embed {name}", daemon=True)
        self._thread.start()

    # -- the callers' side (event loop) --------------------------------------------------------

    async def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """Pooled, L2-normalized embeddings of token sequences, one float32 row each."""
        if any(not 0 < len(tokens) <= self.max_tokens for tokens in inputs):
            raise ValueError(f"every input must hold 1 to {self.max_tokens} tokens")
        if not inputs:
            return np.empty((0, self.n_embd), dtype=np.float32)
        request = _Request(inputs, self.n_embd, asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise self._closed_error()
            self._queue.append(request)
            self._live.add(request)
            self._waiting += len(inputs)
            self._cond.notify()
        try:
            return await request.future
        finally:
            if not request.finished:  # cancelled: drop what has not been decoded yet
                with self._cond:
                    self._finish(request)

    def stats(self) -> dict[str, int]:
        """Inputs waiting for a decode, requests not yet answered, decodes and inputs done."""
        with self._cond:
            return {
                "inputs_waiting": self._waiting,
                "requests_active": len(self._live),
                "decodes": self._decodes,
                "inputs_embedded": self._embedded,
                "token_budget": self.token_budget,
            }

    def close(self) -> None:
        """Fail every request not yet answered and stop the thread. Blocks until the decode in
        progress (if any) ends, so call it off the event loop and before closing the engine."""
        with self._cond:
            self._closed = True
            stranded = list(self._live)
            for request in stranded:
                self._finish(request)
            self._queue.clear()
            self._cond.notify_all()
        for request in stranded:
            self._resolve(request, self._closed_error())
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _closed_error(self) -> Unavailable:
        return Unavailable(f"'{self.name}' was unloaded before its embeddings were done; retry")

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting:
                    self._cond.wait()
                if self._closed:
                    return
                pack = self._take()
            self._decode(pack)

    def _take(self) -> list[tuple[_Request, int]]:
        """The next decode's inputs, (request, index) from the front of the queue, within the token
        budget and the sequence limit. Called with the lock held."""
        pack: list[tuple[_Request, int]] = []
        tokens = 0
        while self._queue and len(pack) < self.max_sequences:
            request = self._queue[0]
            if request.finished or request.taken == len(request.inputs):
                self._queue.popleft()
                continue
            size = len(request.inputs[request.taken])
            if pack and tokens + size > self.token_budget:
                break
            pack.append((request, request.taken))
            request.taken += 1
            self._waiting -= 1
            tokens += size
        return pack

    def _decode(self, pack: list[tuple[_Request, int]]) -> None:
        try:
            vectors = self.engine.embed_decode([request.inputs[i] for request, i in pack])
        except Exception as exc:
            logger.exception("an embedding decode of %d inputs for %s failed", len(pack), self.name)
            with self._cond:
                self._decodes += 1
                failed = list({id(r): r for r, _ in pack if not r.finished}.values())
                for request in failed:
                    self._finish(request)
            for request in failed:
                self._resolve(request, exc)
            return
        done: list[_Request] = []
        with self._cond:
            self._decodes += 1
            self._embedded += len(pack)
            for row, (request, i) in enumerate(pack):
                if request.finished:
                    continue
                request.vectors[i] = vectors[row]
                request.left -= 1
                if request.left == 0:
                    self._finish(request)
                    done.append(request)
        for request in done:
            self._resolve(request)

    def _finish(self, request: _Request) -> None:
        """Nothing more to do for `request`: forget its inputs not taken yet. Lock held."""
        if request.finished:
            return
        request.finished = True
        self._waiting -= len(request.inputs) - request.taken
        request.taken = len(request.inputs)
        self._live.discard(request)

    @staticmethod
    def _resolve(request: _Request, error: BaseException | None = None) -> None:
        """Settle the request's future on its own loop (from any thread)."""

        def settle() -> None:
            if request.future.done():  # the caller was cancelled meanwhile
                return
            if error is None:
                request.future.set_result(request.vectors)
            else:
                request.future.set_exception(error)

        try:
            request.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass
