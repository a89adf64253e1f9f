"""What one request carries through the scheduler, and how its results reach the event loop.

A `Completion` is what a caller submits: prompt tokens, how many choices (`n`), the sampling
parameters, the token limit and the stop strings. The scheduler turns each choice into a `Sequence`
(one llama.cpp sequence id, its sampler, its text stream). A `Ticket` is the caller's side: an
asyncio queue of `Delta`s and one final `Result` (or an exception), `admitted` to learn when the
request has left the queue, and `cancel()` for a client that went away.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pendra_shared.api_errors import APIError

from pendra_inference.detokenize import TextStream
from pendra_inference.sampling import Sampler, SamplingParams


class ClientGone(APIError):
    """The client went away while its request waited in the queue (nginx's 499: nobody reads it)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


@dataclass(frozen=True)
class Completion:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stops: tuple[str, ...] = ()
    n: int = 1
    cache_prompt: bool = True  # may start from a cached prefix (llama-server's name)
    endpoint: str = "chat"  # the API that asked, for the metrics
    # Prompt positions where a later request may diverge (the end of the system prompt, the start
    # of the last user message): a recurrent model's scheduler saves its state there.
    marks: tuple[int, ...] = ()
    # Special tokens written out in the text (a chat format's tags, as `<|channel|>` for gpt-oss);
    # the others are left out, as before.
    shown: frozenset[int] = frozenset()
    # The prompt's images (vision.ImageChunk), in order: each a run of placeholder ids in `prompt`
    # that the scheduler encodes and decodes whole.
    images: tuple[Any, ...] = ()
    # Where a system prompt other conversations may share ends (0: no system prompt; -1: one whose
    # end the template did not show, then the second message's start): its checkpoint is kept
    # longest.
    system_end: int = 0

    @property
    def cells(self) -> int:
        """KV cells the request may need at most (shared prefixes counted as if they were not)."""
        return len(self.prompt) + self.n * self.max_tokens

    def image_at(self, index: int) -> Any:
        """The image whose tokens start at prompt index `index`, if one does."""
        return next((image for image in self.images if image.start == index), None)

    def shift_before(self, index: int) -> int:
        """Positions minus tokens before `index`: an image takes fewer positions than it has
        tokens with M-RoPE, so what follows it sits that much earlier."""
        return sum(image.n_pos - image.n_tokens for image in self.images if image.end <= index)

    def position(self, index: int) -> int:
        """The position of the prompt's token `index` in the cache."""
        return index + self.shift_before(index)

    def snap(self, index: int) -> int:
        """`index`, or the start of the image it falls inside: an image is decoded whole."""
        for image in self.images:
            if image.start < index < image.end:
                return int(image.start)
        return index


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass
class Delta:
    index: int  # the choice
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # set on the choice's last delta: stop, length or abort


@dataclass
class Result:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: list[int]  # per choice
    queue_s: float  # submitted to admitted
    first_token_s: float | None  # submitted to the first sampled token; None if none was
    decode_s: float  # first to last sampled token
    end_s: float = 0.0  # submitted to finished
    intervals: list[float] = field(default_factory=list)  # between consecutive tokens of each choice
    # Recurrent-state checkpoints this request saved, restored, and pushed out of the budget.
    checkpoints_saved: int = 0
    checkpoints_restored: int = 0
    checkpoints_evicted: int = 0
    graph_sampled: int = 0  # tokens llama.cpp sampled in its graph (the rest: on the host)
    # Speculative decoding: tokens proposed by the draft, and those the model accepted.
    drafted: int = 0
    accepted: int = 0


class Ticket:
    """The caller's handle on a submitted completion. Created on the event loop."""

    def __init__(self, completion: Completion) -> None:
        self.completion = completion
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Delta | Result | BaseException] = asyncio.Queue()
        self.admitted: asyncio.Future[None] = self.loop.create_future()
        self.submitted_at = time.monotonic()
        self.cancelled = threading.Event()
        self.result: Result | None = None  # set when `deltas` has ended

    async def deltas(self) -> AsyncIterator[Delta]:
        """The deltas as the scheduler hands them out, then `result` is set; a failure raises."""
        while True:
            item = await self.events.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Result):
                self.result = item
                return
            yield item

    def cancel(self) -> None:
        """The client went away: the scheduler drops the request (queued or running) within one step."""
        self.cancelled.set()

    # -- called on the event loop by the scheduler's thread, through call_soon_threadsafe -------

    def _admit(self, error: BaseException | None = None) -> None:
        if not self.admitted.done():
            if error is None:
                self.admitted.set_result(None)
            else:
                self.admitted.set_exception(error)
                self.admitted.exception()  # retrieved: a caller that left must not log it
        if error is not None:
            self.events.put_nowait(error)


@dataclass
class Sequence:
    """One choice of a running completion, bound to one llama.cpp sequence id."""

    ticket: Ticket
    index: int
    seq_id: int
    sampler: Sampler
    text: TextStream
    tokens: list[int]  # the tokens whose KV is in the cache for seq_id, in order
    prefill: list[int] = field(default_factory=list)  # prompt tokens still to decode
    generated: int = 0
    pending: int | None = None  # the last sampled token, decoded in the next step
    finish: str | None = None
    row: int = -1  # this step's row of logits in the batch, or -1
    shift: int = 0  # the position of the next token minus n_past (images under M-RoPE)
    drafter: Any = (
        None  # speculation.NgramDraft, or the scheduler's DraftModel or MtpDraft, where it speculates
    )
    draft: list[int] = field(default_factory=list)  # this step's drafted tokens, after `pending`
    draft_row: int = -1  # the batch row of the first drafted token
    first_token_at: float | None = None
    last_token_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_past(self) -> int:
        return len(self.tokens)


def common_prefix(a: list[int], b: list[int], limit: int | None = None) -> int:
    """How many tokens `a` and `b` share from their start (at most `limit`). Runs are compared as
    slices (C speed) and halved down to where they part: a long shared prompt, checked at every
    admission and every drafting step, costs no Python loop over its tokens."""
    size = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    if a[:size] == b[:size]:
        return size
    same, differ = 0, size  # a[:same] == b[:same]; a[:differ] != b[:differ]
    while differ - same > 32:
        middle = (same + differ) // 2
        if a[same:middle] == b[same:middle]:
            same = middle
        else:
            differ = middle
    return next(i for i in range(same, differ) if a[i] != b[i])
