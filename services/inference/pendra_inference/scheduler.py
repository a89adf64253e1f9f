"""Continuous batching for one chat model: one thread, one llama.cpp context, many sequences.

The scheduler owns a context with a unified KV cache of `n_ctx × parallel` cells shared by up to
llama.cpp's 256 sequences. Requests wait in a bounded queue (`max_queue`, `queue_timeout_s`) and
are admitted, oldest first, as soon as their prompt and `max_tokens` fit in the cells not promised
to others; there is no fixed slot count. Its thread repeats one step:

1. drop requests whose client left, and fail those that waited too long;
2. admit waiting requests: reuse the longest prefix any sequence holds, running or finished
   (`llama_memory_seq_cp` shares cells, it copies nothing), and evict finished sequences, least
   recently used first, when their cells are needed, or while sequences run, beyond as many cells
   as those hold (or one n_ctx; see _trim_cache); where the prefix of a sequence cannot be
   shared by its cells alone (a recurrent state, a sliding window's reused cells), the prefix ends
   at a checkpoint, restored into the new sequence (see checkpoints.py);
3. build one batch: the pending token of every generating sequence, then prompt chunks of newly
   admitted ones, at most `prefill_budget` tokens while others generate (chunked prefill); a chunk
   ends where a checkpoint is to be saved;
4. `llama_decode` it once (the GIL is released meanwhile);
5. save the checkpoints the chunks reached; sample every sequence whose row has logits with its own
   sampler chain, detokenize, check stop strings and limits; an `n` > 1 request forks its prompt's
   cells to its other choices here;
6. hand the step's deltas to the event loop in one `call_soon_threadsafe`.

Nothing else touches the context. The event loop only submits tickets and reads their queues.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from pendra_shared.api_errors import APIError, InvalidRequest, Overloaded, Unavailable

from pendra_inference.batch import Batch
from pendra_inference.checkpoints import Checkpoint, CheckpointStore
from pendra_inference.detokenize import TextStream, token_bytes
from pendra_inference.draft_model import DraftModel
from pendra_inference.model_memory import HYBRID, RECURRENT, SWA, kind_of
from pendra_inference.mtp import MtpDraft
from pendra_inference.sampling import Candidates, Sampler, logprobs_of
from pendra_inference.sequence import (
    ClientGone,
    Completion,
    Delta,
    Result,
    Sequence,
    Ticket,
    TokenLogprob,
    common_prefix,
)
from pendra_inference.speculation import NgramDraft, Speculation

logger = logging.getLogger(__name__)

# A checkpointed model's prefill saves a checkpoint this many tokens before the end of the prompt: a
# chat's next turn resends the prompt, but the template writes the answer after fewer or other
# tokens than the generation prompt (ChatML's `<|im_start|>assistant\n<think>\n`: 5 tokens).
CHECKPOINT_BEFORE_END = 6

# Told of every request the scheduler finishes (stopped, at its limit, or aborted), with what the
# scheduler measured; runs on the scheduler's thread, so it must be quick.
Observer = Callable[[Result, Completion], None]


@dataclass(frozen=True)
class SchedulerConfig:
    n_ctx: int  # per sequence: a request's prompt plus max_tokens
    parallel: int  # the cache holds n_ctx × parallel cells
    n_batch: int  # tokens in one llama_decode
    n_ubatch: int
    prefill_budget: int  # prompt tokens per step while other sequences generate
    max_queue: int
    queue_timeout_s: float
    n_threads: int
    prefix_cache: bool = True
    # With a unified cache, attention without flash attention spans every used cell, every
    # sequence's (measured here, 16 sequences beside 3,000 cached cells: 118 ms a step against 78
    # with it); but llama.cpp's CPU flash attention takes different paths for different batch
    # shapes, so a sequence's logits then depend on its batch-mates. None: llama.cpp decides.
    flash_attention: bool | None = None  # None: llama.cpp decides
    # Sequences the context holds, running and cached (0: llama.cpp's maximum, 256). llama.cpp
    # allocates a recurrent state for each, so the registry sizes it for recurrent and hybrid models.
    n_seq_max: int = 0
    # Host memory for checkpoints of recurrent and hybrid models' states and of sliding-window
    # models' last window (see checkpoints.py).
    checkpoint_budget_bytes: int = 0
    # Sampling in llama.cpp's graph for every request it can serve (no grammar, no logprobs, one
    # choice): only the token id comes back, not the row of logits.
    backend_sampling: bool = True
    gpu: bool = False  # the model runs on a GPU (top-p's sort of the vocabulary is cheap there)
    # Speculative decoding (see speculation.py); its sequences sample on the host, each drafted
    # token's row of logits checked by the sequence's own sampler.
    speculative: Speculation | None = None
    # The model was loaded with its multi-token-prediction blocks (speculation of kind "mtp"): an
    # MTP context on a model loaded without them would run a graph with no weights.
    mtp_loaded: bool = False


@dataclass
class _Request:
    ticket: Ticket
    seqs: list[Sequence]
    admitted_at: float
    cached_tokens: int = 0
    checkpoints_saved: int = 0
    checkpoints_restored: int = 0
    checkpoints_evicted: int = 0
    graph_sampled: int = 0
    drafted: int = 0
    accepted: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    intervals: list[float] = field(default_factory=list)  # between consecutive tokens of a choice

    @property
    def done(self) -> bool:
        return all(s.finish is not None for s in self.seqs)


@dataclass
class SchedulerStats:
    waiting: int = 0
    running: int = 0
    kv_cells: int = 0  # cells of the unified cache
    kv_cells_used: int = 0  # held by running and cached sequences (shared prefixes counted once each)
    kv_cells_reserved: int = 0  # promised to running requests (prompt + max_tokens)
    cached_sequences: int = 0
    cache_trimmed: int = 0  # cached sequences dropped to keep the running ones' attention short
    steps: int = 0
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0  # prompt tokens offered (cached or not)
    decode_seconds: float = 0.0  # in llama_decode
    memory_kind: str = "attention"  # attention, swa, recurrent or hybrid (see model_memory.py)
    sequences: int = 0  # sequence ids of the context (n_seq_max)
    parallel: int = 0  # requests generating at once (config.parallel)
    checkpoints: int = 0  # checkpoints held (recurrent states, sliding windows)
    checkpoint_bytes: int = 0
    checkpoints_saved: int = 0
    checkpoints_restored: int = 0
    checkpoints_evicted: int = 0
    sample_seconds: float = 0.0  # choosing tokens, detokenizing, handing them out
    image_tokens: int = 0  # image embeddings decoded
    graph_sampled: int = 0  # tokens llama.cpp sampled in its graph
    host_sampled: int = 0  # tokens sampled on the host, from the whole row of logits
    speculative: bool = False  # the model speculates
    drafted: int = 0  # speculative decoding: tokens drafted
    accepted: int = 0  # ... and accepted


class Scheduler:
    def __init__(
        self,
        model: Any,
        vocab: Any,
        config: SchedulerConfig,
        name: str = "",
        observer: Observer | None = None,
        projector: Any = None,
        draft: Path | None = None,
        draft_gpu_layers: int = 0,
        draft_mmap: bool = False,
    ) -> None:
        self.config = config
        self.name = name
        self.projector = projector  # vision.Projector: encodes the prompts' images
        self.observer = observer  # told of each finished request, on this scheduler's thread
        self.vocab = vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.n_swa = int(llama_cpp.llama_model_n_swa(model))
        self.kind = kind_of(model)
        # A recurrent state cannot be cut back to a position: shared whole, or from a checkpoint.
        self.stateful = self.kind in (RECURRENT, HYBRID)
        most = int(llama_cpp.llama_max_parallel_sequences())
        self.n_seq_max = min(config.n_seq_max, most) if config.n_seq_max > 0 else most
        if self.stateful and config.n_seq_max <= 0:
            # The registry read no recurrent state from the file's header: llama.cpp's 256 states
            # could take many GB. Two per sequence of the cache, as the registry would have given.
            self.n_seq_max = min(most, 2 * config.parallel)
            logger.warning("%s: a %s model with no sequence count: %d", name, self.kind, self.n_seq_max)
        # A rejected draft's cells are removed from the cache: attention cells can be, a recurrent
        # state can go back only with llama.cpp's rollback snapshots (n_rs_seq), and a sliding
        # window's cells may be reused by the drafts themselves.
        self.speculative = config.speculative
        if self.speculative is not None and self.kind == SWA:
            logger.warning("%s: no speculative decoding on a sliding-window model", name)
            self.speculative = None
        # Checkpoints of a recurrent state, or of a sliding window's last cells (see checkpoints.py).
        self.checkpointed = self.stateful or self.kind == SWA
        self.checkpoints = CheckpointStore(config.checkpoint_budget_bytes if self.checkpointed else 0)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = config.n_ctx * config.parallel
        params.n_batch = max(config.n_batch, self.n_seq_max)
        params.n_ubatch = min(config.n_ubatch, params.n_batch)
        params.n_seq_max = self.n_seq_max
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = config.n_threads
        params.no_perf = True
        params.flash_attn_type = {None: -1, False: 0, True: 1}[config.flash_attention]
        if self.speculative is not None and self.stateful:
            params.n_rs_seq = self.speculative.draft_tokens
        # A sequence sampled in the graph has one row of logits a step (speculating ones sample on
        # the host): llama.cpp then sizes its sampling graph for one output per sequence, not for
        # a whole batch of them, and runs the penalties in the graph too.
        params.n_outputs_max_per_seq = 1
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} cells")
        self.capacity = int(llama_cpp.llama_n_ctx(self.ctx))
        if self.speculative is not None and self.stateful and llama_cpp.llama_n_rs_seq(self.ctx) < 1:
            logger.warning(
                "%s: llama.cpp cannot roll this %s model's state back: no speculation", name, self.kind
            )
            self.speculative = None
        # A draft model's file (speculation of kind "draft"), loaded here with a context of its own
        # as large as this one's.
        self.draft_model: DraftModel | None = None
        if self.speculative is not None and self.speculative.kind == "draft":
            self.draft_model = self._open_draft(draft, params, draft_gpu_layers, draft_mmap)
            if self.draft_model is None:
                self.speculative = None
        # The model's own multi-token-prediction block (speculation of kind "mtp"), in a context
        # of its own beside this one.
        self.mtp: MtpDraft | None = None
        if self.speculative is not None and self.speculative.kind == "mtp":
            self.mtp = self._open_mtp(model, params)
            if self.mtp is None:
                self.speculative = None
        self.batch_size = int(params.n_batch)
        self.ubatch_size = int(params.n_ubatch)
        self.batch = Batch(self.batch_size)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.candidates = Candidates(self.n_vocab)
        self._piece = ctypes.create_string_buffer(256)

        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._closing = False
        self._running: list[_Request] = []
        self._cached: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # LRU first
        self._free_ids = list(range(self.n_seq_max))
        self._graph_ok = True  # False once llama.cpp's graph sampled no token (see _next_token)
        self._stats = SchedulerStats(
            kv_cells=self.capacity,
            memory_kind=self.kind,
            sequences=self.n_seq_max,
            parallel=config.parallel,
            speculative=self.speculative is not None,
        )
        self._thread = threading.Thread(target=self._run, name=f"pendra-scheduler-{name}", daemon=True)
        self._thread.start()

    def _open_draft(
        self, draft: Path | None, params: Any, n_gpu_layers: int, mmap: bool
    ) -> DraftModel | None:
        """The draft model with a context like this one's (`params`): as many cells and sequence
        ids, the same batch and attention; None, logged, where it cannot draft."""
        if draft is None:
            logger.warning("%s: no draft model was found for it: no speculation", self.name)
            return None
        try:
            return DraftModel(
                draft,
                self.vocab,
                n_gpu_layers=n_gpu_layers,
                use_mmap=mmap,
                catch_up=max(64, self.config.prefill_budget),
                flash_attn_type=int(params.flash_attn_type),
                n_ctx=self.capacity,
                n_seq_max=self.n_seq_max,
                n_batch=int(params.n_batch),
                n_threads=self.config.n_threads,
                name=self.name,
            )
        except (ValueError, RuntimeError) as exc:
            logger.warning("%s: %s: no speculation", self.name, exc)
            return None

    def _open_mtp(self, model: Any, params: Any) -> MtpDraft | None:
        """The MTP block's context, as large as this one; None, logged, where it cannot draft."""
        assert self.speculative is not None
        if not self.config.mtp_loaded:
            logger.warning("%s: loaded without its MTP block: no speculation", self.name)
            return None
        try:
            mtp = MtpDraft(
                model,
                self.ctx,
                n_ctx=self.capacity,
                n_seq_max=self.n_seq_max,
                n_batch=int(params.n_batch),
                n_ubatch=int(params.n_ubatch),
                n_threads=self.config.n_threads,
                flash_attn_type=int(params.flash_attn_type),
                name=self.name,
            )
        except ValueError as exc:
            logger.warning("%s: %s: no speculation", self.name, exc)
            return None
        mtp.keep_rows = self.speculative.draft_tokens + 1  # the drafts' rows, the pending token's
        return mtp

    @property
    def _drafter(self) -> DraftModel | MtpDraft | None:
        """The model that writes drafts (a draft model, or the MTP block), if any."""
        return self.draft_model or self.mtp

    def _forget_drafts(self, seq_id: int) -> None:
        drafter = self._drafter
        if drafter is not None:
            drafter.forget(seq_id)

    # -- the event loop's side ---------------------------------------------------------------

    def submit(self, completion: Completion) -> Ticket:
        """Queue a completion; raises Overloaded when the queue is full. Call on the event loop."""
        if completion.cells > self.capacity:
            raise Unavailable(f"the request needs {completion.cells} KV cells; the cache has {self.capacity}")
        if completion.n > self.n_seq_max:
            raise InvalidRequest(
                f"n={completion.n} asks for more choices than the {self.n_seq_max} sequences "
                f"'{self.name}' holds at once",
                param="n",
            )
        ticket = Ticket(completion)
        with self._cond:
            if self._closing:
                raise Unavailable(f"'{self.name}' is being unloaded; retry")
            if len(self._waiting) >= self.config.max_queue:
                raise Overloaded(
                    f"'{self.name}' has {len(self._waiting)} requests waiting (PENDRA_MAX_QUEUE); "
                    "retry shortly"
                )
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def wake(self) -> None:
        """Look at the queue now (a ticket was cancelled)."""
        with self._cond:
            self._cond.notify()

    def stats(self) -> SchedulerStats:
        with self._cond:
            self._stats.waiting = len(self._waiting)
        return self._stats

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        gone = Unavailable(f"'{self.name}' was unloaded")
        for ticket in self._waiting:
            self._post(ticket, gone)
        for req in self._running:
            self._post(req.ticket, gone)
            for seq in req.seqs:
                self._release_sampler(seq)
        self._waiting.clear()
        self._running.clear()
        self.checkpoints.clear()
        self.batch.free()
        if self.draft_model is not None:
            self.draft_model.close()
        if self.mtp is not None:
            self.mtp.close()
        llama_cpp.llama_free(self.ctx)
        self.ctx = None

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closing:
                    return
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - every request in flight gets the error
                logger.exception("%s: scheduler step failed", self.name)
                self._fail_running(exc)
            if not self._running:
                with self._cond:
                    if self._waiting and not self._closing:
                        # Waiting but not admitted (no room): look again soon, for timeouts.
                        self._cond.wait(0.05)

    def _step(self) -> None:
        self._drop_gone()
        self._admit()
        if not self._running:
            return
        self._trim_cache()
        self._resolve_waits()
        sequences = self._fill_batch()
        if not sequences:
            return
        started = time.perf_counter()
        self._decode()
        if self.mtp is not None:  # its cache follows what the model decoded
            batch, count = self.batch, int(self.batch.raw.n_tokens)
            self.mtp.process(
                batch.token[:count],
                batch.pos[:count],
                batch.seq_id[:count],
                {s.seq_id: s.tokens for s in sequences if s.drafter is self.mtp},
            )
        decoded = time.perf_counter()
        self._sample(sequences)
        stats = self._stats
        stats.steps += 1
        stats.decode_seconds += decoded - started
        stats.sample_seconds += time.perf_counter() - decoded

    def _drop_gone(self) -> None:
        now = time.monotonic()
        with self._cond:
            keep: collections.deque[Ticket] = collections.deque()
            for ticket in self._waiting:
                if ticket.cancelled.is_set():  # its handler waits for admission: end that wait
                    self._post(ticket, ClientGone("the client went away while the request was queued"))
                    continue
                if now - ticket.submitted_at > self.config.queue_timeout_s:
                    self._post(
                        ticket,
                        Overloaded(
                            f"'{self.name}' is busy: the request waited {self.config.queue_timeout_s:g}s "
                            "in the queue (PENDRA_QUEUE_TIMEOUT_S); retry shortly"
                        ),
                    )
                    continue
                keep.append(ticket)
            self._waiting = keep
        for req in list(self._running):
            if req.ticket.cancelled.is_set():
                generated = sum(s.generated for s in req.seqs)
                logger.info("%s: client went away; stopped after %d tokens", self.name, generated)
                for seq in req.seqs:
                    if seq.finish is None:
                        seq.finish = "abort"
                self._finish(req, now)

    # -- admission -----------------------------------------------------------------------------

    def _reserved(self) -> int:
        return sum(r.ticket.completion.cells for r in self._running)

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._waiting:
                    return
                ticket = self._waiting[0]
                need = ticket.completion.cells
                n = ticket.completion.n
                if self._reserved() + need > self.capacity:
                    return  # wait for running requests to finish (oldest first, no overtaking)
                if len(self._free_ids) + len(self._cached) < n:
                    return  # every sequence id runs a request (a recurrent model holds few): wait
                self._waiting.popleft()
            try:
                self._start(ticket, need, n)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                logger.exception("%s: could not start a request", self.name)
                self._post(ticket, APIError(f"generation failed: {exc}"))

    def _start(self, ticket: Ticket, need: int, n: int) -> None:
        completion = ticket.completion
        prompt = completion.prompt
        try:
            graph = self.config.backend_sampling and self._graph_ok
            # (n > 1: the choices share a row at first; speculation: many rows a step, on the host)
            offload = graph and n == 1 and self.speculative is None
            samplers = [
                Sampler(
                    self.vocab,
                    self.n_vocab,
                    completion.sampling,
                    i,
                    history=completion.max_tokens,
                    graph=graph,
                    sort_in_graph=self.config.gpu,
                    offload=offload,
                )
                for i in range(n)
            ]
        except ValueError as exc:  # checked before submitting; only this request fails
            self._post(ticket, InvalidRequest(str(exc)))
            return
        reuse = self.config.prefix_cache and completion.cache_prompt
        source, shared, in_flight, checkpoint = (
            self._longest_prefix(prompt, completion) if reuse else (None, 0, None, None)
        )
        at = completion.position  # a prompt index's position in the cache
        if in_flight is not None:
            source = None  # shared later, when `in_flight` has decoded it (see _resolve_waits)
        ids: list[int] = []
        if (
            source is not None
            and source in self._cached
            and checkpoint is None
            and (shared >= len(self._cached[source]) or len(self._free_ids) < n)
        ):
            # A finished sequence holds the prefix and nothing more worth keeping (or there is no
            # free sequence id): take it over. Otherwise it stays cached and its cells are shared.
            tokens = self._cached.pop(source)
            if llama_cpp.llama_memory_seq_rm(self.memory, source, at(shared), -1):
                ids.append(source)
            else:
                llama_cpp.llama_memory_seq_rm(self.memory, source, -1, -1)
                self._forget_drafts(source)
                self._free_ids.append(source)
                shared = 0
            del tokens
        restored = False
        short = len(self._free_ids) < n
        if source is not None and source in self._cached and checkpoint is not None and short:
            # No free id but the holder's: it becomes this request's sequence, its recurrent part
            # (or last window) the checkpoint's and its cells cut back to the checkpoint.
            del self._cached[source]
            restored = self._restore(source, checkpoint, at(shared))
            if restored:
                llama_cpp.llama_memory_seq_rm(self.memory, source, at(shared), -1)
            else:
                shared = 0
            ids.append(source)
            checkpoint = None
        # Ids first (never evicting the prefix's holder before its cells are shared) ...
        if source is not None and source in self._cached:
            self._cached.move_to_end(source)  # recently useful: evicted last
        while len(self._free_ids) < n - len(ids) and self._evict(keep=source):
            pass
        if len(self._free_ids) < n - len(ids):
            for sampler in samplers:
                sampler.close()
            for seq_id in ids:
                llama_cpp.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
                self._forget_drafts(seq_id)
                self._free_ids.append(seq_id)
            self._post(ticket, Overloaded(f"'{self.name}' has no free sequence; retry shortly"))
            return
        self._free_ids.sort()
        while len(ids) < n:
            ids.append(self._free_ids.pop(0))
        try:
            first = ids[0]
            if shared and source is not None and source != first:
                llama_cpp.llama_memory_seq_rm(self.memory, first, -1, -1)
                llama_cpp.llama_memory_seq_cp(self.memory, source, first, 0, at(shared))
                if self.mtp is not None:
                    self.mtp.copy(source, first, at(shared))
            elif not shared or in_flight is not None or checkpoint is not None:
                llama_cpp.llama_memory_seq_rm(self.memory, first, -1, -1)
            if checkpoint is not None:
                restored = self._restore(first, checkpoint, at(shared))
                shared = shared if restored else 0
            # ... then cells: finished sequences go, least recently used first, when theirs are needed.
            while self._reserved() + need + self._cached_cells() > self.capacity and self._evict():
                pass
            seqs = []
            for index, (seq_id, sampler) in enumerate(zip(ids, samplers, strict=True)):
                seq = Sequence(ticket, index, seq_id, sampler, TextStream(completion.stops), tokens=[])
                if self._drafter is not None:
                    # (a draft model or the MTP block sees no images, and n choices would each
                    # decode the prompt again in the draft model, or need their own hidden states)
                    seq.drafter = self._drafter if not completion.images and n == 1 else None
                elif self.speculative is not None:
                    seq.drafter = NgramDraft(self.speculative)
                if index == 0:
                    seq.tokens = list(prompt[:shared])
                    seq.prefill = list(prompt[shared:])
                    seq.shift = completion.shift_before(shared)
                    if in_flight is not None:
                        seq.tokens = []
                        seq.extra["wait"] = (in_flight, shared)
                        in_flight.extra.setdefault("cuts", set()).add(shared)
                    # A sliding window's cells are reused once a sequence outgrows it.
                    outgrows = self.kind == SWA and len(prompt) + completion.max_tokens >= self.n_swa
                    if (self.stateful or outgrows) and reuse and self.checkpoints.budget_bytes:
                        starts = self._message_starts(prompt)
                        seq.extra["marks"] = self._marks(completion, shared, starts)
                        # Where the system prompt ends (the mark other conversations share): as
                        # the chat service found it, else where the second message starts.
                        end = completion.system_end
                        seq.extra["lasting"] = end if end >= 0 else next(iter(starts), 0)
                seqs.append(seq)
            now = time.monotonic()
            req = _Request(ticket, seqs, now, cached_tokens=shared, checkpoints_restored=int(restored))
        except BaseException:
            # Whatever failed, the ids go back (a recurrent model has few: one lost would stall it).
            for seq_id in ids:
                llama_cpp.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
                self._forget_drafts(seq_id)
                self._free_ids.append(seq_id)
            for sampler in samplers:
                sampler.close()
            raise
        for seq in seqs:
            sampler = seq.sampler
            if offload and sampler.graph_capable:
                sampler.in_graph = bool(llama_cpp.llama_set_sampler(self.ctx, seq.seq_id, sampler.chain))
        self._running.append(req)
        self._stats.prefix_hit_tokens += shared
        self._stats.prompt_tokens += len(prompt)
        self._post(ticket, None)

    def _longest_prefix(
        self, prompt: list[int], completion: Completion
    ) -> tuple[int | None, int, Sequence | None, Checkpoint | None]:
        """The sequence holding the longest prefix of `prompt` that may be shared, its length, the
        running sequence still decoding it (None when the cells are there already), and the
        checkpoint to restore at that length (a recurrent or hybrid model's state, a sliding-window
        model's last window). At least one prompt token is always left to decode (its logits start
        the answer)."""
        best: tuple[int | None, int, Sequence | None, Checkpoint | None] = (None, 0, None, None)
        limit = len(prompt) - 1
        matches = self.checkpoints.matching(prompt, limit) if self.checkpoints.budget_bytes else []
        if self.kind == RECURRENT and matches:  # nothing but the state: no cells to share
            best = (None, len(matches[0].tokens), None, matches[0])
        holders: list[tuple[int, list[int], Sequence | None]] = [
            (s, t, None) for s, t in self._cached.items()
        ]
        for req in self._running:
            for seq in req.seqs:
                if "wait" in seq.extra:
                    continue
                if self.stateful and seq.drafter is not None and seq.generated:
                    continue  # its state may hold a rejected draft until its next decode rolls it back
                holders.append((seq.seq_id, seq.tokens + seq.prefill, seq if seq.prefill else None))
        for seq_id, tokens, source in holders:
            if not tokens or tokens[0] != prompt[0]:
                continue
            size = completion.snap(common_prefix(tokens, prompt, limit))
            in_flight = source is not None and size > source.n_past
            held = source.n_past if source is not None else len(tokens)
            restore = None
            # A recurrent state is shared whole (it is at `held`), or from a checkpoint at a
            # position whose attention cells this sequence holds. With sliding-window attention,
            # cells a sequence no longer sees (its next token is `n_swa` or more positions on) may
            # be reused: a strict prefix of a sequence as long as the window may have lost some of
            # them, and its last window comes from a checkpoint too. (A prefix still being decoded
            # is shared the moment its last token is.)
            outgrown = self.kind == SWA and held >= self.n_swa
            if (self.stateful or outgrown) and not in_flight and size < held:
                fit = next((c for c in matches if len(c.tokens) <= size), None)
                if self.kind == RECURRENT or fit is None:
                    continue
                size, restore = len(fit.tokens), fit
            if size > best[1] or (size == best[1] and best[3] is not None and restore is None):
                best = (seq_id, size, source if in_flight else None, restore)
        return best

    def _restore(self, seq_id: int, checkpoint: Checkpoint, position: int) -> bool:
        """Put `checkpoint` into `seq_id`, whose attention cells (if any) hold its tokens: the
        recurrent state, or the sliding-window layers' cells of the last window, which replace the
        ones `seq_id` was given (llama.cpp then reports that cache's positions). On any failure the
        sequence is emptied and the prompt is decoded whole. (`position`: the checkpoint's
        length in cache positions.)"""
        at = len(checkpoint.tokens)
        if (
            self.checkpoints.restore(self.ctx, seq_id, checkpoint)
            and int(llama_cpp.llama_memory_seq_pos_max(self.memory, seq_id)) == position - 1
        ):
            self.checkpoints.used(checkpoint)
            return True
        logger.warning(
            "%s: restoring a checkpoint of %d tokens failed; decoding the prompt whole", self.name, at
        )
        self.checkpoints.drop(checkpoint)  # it would fail again
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
        return False

    def _marks(self, completion: Completion, shared: int, starts: tuple[int, ...]) -> set[int]:
        """Where a checkpointed model's prefill stops to save a checkpoint: where the caller says a
        later request may diverge (the end of the system prompt, the last user message), and a few
        tokens before the end of the prompt (a chat's next turn resends this prompt, and the
        generation prompt's last tokens often differ from how the template writes the answer)."""
        prompt = completion.prompt
        marks = {*completion.marks, *starts, len(prompt) - CHECKPOINT_BEFORE_END}
        return {
            m
            for m in marks
            if shared < m < len(prompt) and completion.snap(m) == m and not self.checkpoints.has(prompt[:m])
        }

    def _message_starts(self, prompt: list[int]) -> tuple[int, ...]:
        """The end of the first message (a system prompt, shared by many conversations) and the
        start of the last user message, found where the template's message-start token (the
        prompt's first control token, ChatML's `<|im_start|>`) opens the second and the
        second-to-last messages."""
        bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        head = prompt[1:3] if prompt and prompt[0] == bos else prompt[:2]
        opener = next((t for t in head if t >= 0 and llama_cpp.llama_vocab_is_control(self.vocab, t)), None)
        if opener is None:
            return ()
        starts = [i for i, token in enumerate(prompt) if token == opener]
        return (starts[1], starts[-2]) if len(starts) >= 3 else ()

    def _cached_cells(self) -> int:
        return sum(len(t) for t in self._cached.values())

    def _evict(self, keep: int | None = None) -> bool:
        """Drop the least recently used finished sequence (other than `keep`); False if none."""
        victim = next((seq_id for seq_id in self._cached if seq_id != keep), None)
        if victim is None:
            return False
        del self._cached[victim]
        llama_cpp.llama_memory_seq_rm(self.memory, victim, -1, -1)
        self._forget_drafts(victim)
        self._free_ids.append(victim)
        return True

    def _trim_cache(self) -> None:
        """Finished sequences kept for their prefixes are not free while others generate: in a
        unified cache every generating sequence's attention spans every used cell, the cached ones
        too. 16 streams beside ten runs' worth of cached prompts decoded at 158 tokens/s against 240
        beside none. So while sequences run, the cache keeps at most as many cells as they hold, or
        one request's n_ctx where that is more (a conversation's next turn, a system prompt), least
        recently used out first; an idle server keeps everything (it costs nothing then)."""
        if not self._cached or self.kind == RECURRENT:  # (no attention cells: nothing to gain)
            return
        limit = max(self.config.n_ctx, sum(s.n_past for r in self._running for s in r.seqs))
        cached = self._cached_cells()
        if cached <= limit:
            return
        while cached > limit:
            cached -= len(next(iter(self._cached.values())))
            self._evict()
            self._stats.cache_trimmed += 1
        self._update_usage()

    # -- one step ------------------------------------------------------------------------------

    def _resolve_waits(self) -> None:
        """Requests waiting for a running sequence to decode their common prefix: share its cells
        once it has (its chunks end exactly there), or decode the prompt alone if it went away."""
        for req in self._running:
            seq = req.seqs[0]
            wait = seq.extra.get("wait")
            if wait is None:
                continue
            source, size = wait
            completion = req.ticket.completion
            prompt = completion.prompt
            exact = self.stateful or self.kind == SWA  # (cuts end chunks there: == is what happens)
            reached = source.n_past == size if exact else source.n_past >= size
            if source.finish is None and reached and source.tokens[:size] == prompt[:size]:
                llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
                llama_cpp.llama_memory_seq_cp(
                    self.memory, source.seq_id, seq.seq_id, 0, completion.position(size)
                )
                if self.mtp is not None:
                    self.mtp.copy(source.seq_id, seq.seq_id, completion.position(size))
                seq.tokens = list(prompt[:size])
                seq.shift = completion.shift_before(size)
                del seq.extra["wait"]
            elif (
                source.finish is not None
                or source not in (s for r in self._running for s in r.seqs)
                or (self.stateful and source.n_past > size)  # its state has moved past the prefix
            ):
                seq.tokens, seq.prefill, seq.shift = [], list(prompt), 0
                self._stats.prefix_hit_tokens -= req.cached_tokens
                req.cached_tokens = 0
                del seq.extra["wait"]

    def _save_checkpoint(self, seq: Sequence) -> None:
        stats = self.checkpoints.stats
        saved, evicted = stats.saved, stats.evicted
        self.checkpoints.save(
            self.ctx, seq.seq_id, seq.tokens, lasting=seq.n_past == seq.extra.get("lasting")
        )
        req = next(r for r in self._running if r.ticket is seq.ticket)
        req.checkpoints_saved += stats.saved - saved
        req.checkpoints_evicted += stats.evicted - evicted

    def _fill_batch(self) -> list[Sequence]:
        batch = self.batch
        out: list[Sequence] = []
        generating = sorted(
            (s for r in self._running for s in r.seqs if s.pending is not None), key=lambda s: s.seq_id
        )
        # The pending token of every generating sequence, a row of logits each, in one go ...
        count = len(generating)
        batch.token[:count] = [s.pending for s in generating]
        batch.pos[:count] = [s.n_past + s.shift for s in generating]
        batch.seq_id[:count] = [s.seq_id for s in generating]
        batch.logits[:count] = 1
        for row, seq in enumerate(generating):
            seq.row = row
            seq.extra["chunk"] = 0
            seq.draft = []
            out.append(seq)
        # ... then the drafts of speculating ones, each with its row, ...
        if self.speculative is not None and len(generating) <= self.speculative.max_sequences:
            # Drafts never take the answer past max_tokens (their cells are within the request's),
            # nor the batch past its size.
            room = self.batch_size - count
            limits = []
            for seq in generating:
                completion = seq.ticket.completion
                left = completion.max_tokens - seq.generated - 1
                most = max(0, min(self.speculative.draft_tokens, left, room))
                if seq.drafter is None:
                    most = 0
                room -= most
                limits.append(most)
            by_model: dict[int, list[int]] = {}
            drafter = self._drafter
            if drafter is not None:
                wanted = [
                    (s.seq_id, s.tokens, s.pending or 0, m) for s, m in zip(generating, limits, strict=True)
                ]
                by_model = drafter.draft([w for w in wanted if w[3] > 0])
            for seq, most in zip(generating, limits, strict=True):
                if isinstance(seq.drafter, NgramDraft):
                    seq.draft = seq.drafter.draft(seq.tokens, seq.pending or 0, most)
                else:
                    seq.draft = by_model.get(seq.seq_id, [])[:most]
                if seq.draft:
                    seq.draft_row = count
                    count = batch.put(count, seq.draft, seq.n_past + seq.shift + 1, seq.seq_id, every=True)
        # ... then prompt chunks.
        budget = self.batch_size - count
        if generating:
            budget = min(budget, self.config.prefill_budget)
        failed: list[tuple[_Request, Exception]] = []
        for req in self._running:
            seq = req.seqs[0]
            if not seq.prefill or budget <= 0 or "wait" in seq.extra:
                continue
            completion = req.ticket.completion
            if completion.images:
                try:
                    budget -= self._decode_images(seq, completion)
                except RuntimeError as exc:
                    failed.append((req, exc))
                    continue
                if budget <= 0:
                    continue
            # End a chunk where a waiting request's shared prefix ends, so it can share from there.
            # (A checkpointed model's prefill also stops where it saves a checkpoint, and a chunk
            # stops where an image starts.)
            stops = (
                *seq.extra.get("cuts", ()),
                *seq.extra.get("marks", ()),
                *(image.start for image in completion.images),
            )
            cuts = [c - seq.n_past for c in stops if c > seq.n_past]
            chunk = seq.prefill[: min([budget, *cuts])]
            last = len(chunk) == len(seq.prefill)
            count = batch.put(count, chunk, seq.n_past + seq.shift, seq.seq_id, last=last)
            seq.row = count - 1 if last else -1
            seq.extra["chunk"] = len(chunk)
            budget -= len(chunk)
            out.append(seq)
        for req, error in failed:  # (this request only: the others go on)
            logger.warning("%s: %s", self.name, error)
            self._fail(req, error)
        batch.raw.n_tokens = count
        return out

    def _decode_images(self, seq: Sequence, completion: Completion) -> int:
        """Encode and decode the images at the start of `seq`'s prefill into its cells, outside the
        step's batch (as llama-server does: an image's embeddings are not tokens); returns the
        tokens they took."""
        from llama_cpp import mtmd_cpp

        used = 0
        while seq.prefill and (image := completion.image_at(seq.n_past)) is not None:
            if self.projector is None or not self.projector.ctx:
                raise RuntimeError("the model's projector is not loaded")
            position = seq.n_past + seq.shift
            after = llama_cpp.llama_pos(0)
            while True:
                rc = mtmd_cpp.mtmd_helper_eval_chunk_single(
                    self.projector.ctx,
                    self.ctx,
                    image.chunk,
                    position,
                    seq.seq_id,
                    # an image read with non-causal attention (Gemma 3) must fit one micro-batch
                    self.ubatch_size if image.non_causal else self.batch_size,
                    False,
                    ctypes.byref(after),
                )
                if rc == 0 or self.stateful or not self._cached:
                    break
                # No room in the cache: what the image wrote goes, a finished sequence gives its cells.
                llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, position, -1)
                self._evict()
            if rc != 0:
                raise RuntimeError(f"llama.cpp could not read an image (mtmd: {rc})")
            seq.tokens.extend(seq.prefill[: image.n_tokens])
            del seq.prefill[: image.n_tokens]
            seq.shift += image.n_pos - image.n_tokens
            used += image.n_tokens
            self._stats.image_tokens += image.n_tokens
        return used

    def _decode(self) -> None:
        while True:
            rc = int(llama_cpp.llama_decode(self.ctx, self.batch.raw))
            if rc == 0:
                return
            if rc == 1 and self._cached:
                self._evict()  # no room in the cache: a finished sequence gives its cells
                continue
            raise RuntimeError(f"llama_decode returned {rc}")

    def _sample(self, sequences: list[Sequence]) -> None:
        now = time.monotonic()
        events: list[tuple[Ticket, Delta | Result | BaseException | None]] = []
        for seq in sequences:
            chunk = seq.extra.get("chunk", 0)
            if chunk:
                seq.tokens.extend(seq.prefill[:chunk])
                del seq.prefill[:chunk]
                if seq.n_past in seq.extra.get("marks", ()):
                    self._save_checkpoint(seq)
            elif seq.pending is not None:
                seq.tokens.append(seq.pending)
                seq.pending = None
        for req in list(self._running):
            first = req.seqs[0]
            if first.row < 0 or first.prefill:
                rows = [s for s in req.seqs if s.row >= 0 and s.finish is None and s is not first]
            else:
                rows = [first]
                if len(req.seqs) > 1 and not req.seqs[1].tokens and req.seqs[1].finish is None:
                    for child in req.seqs[1:]:  # n > 1: the prompt's cells become every choice's
                        llama_cpp.llama_memory_seq_rm(self.memory, child.seq_id, -1, -1)
                        llama_cpp.llama_memory_seq_cp(self.memory, first.seq_id, child.seq_id, 0, -1)
                        child.tokens = list(first.tokens)
                        child.shift = first.shift
                        child.row = first.row
                        rows.append(child)
                else:
                    rows += [s for s in req.seqs[1:] if s.row >= 0 and s.finish is None]
            for seq in rows:
                delta = self._next_token(req, seq, now) if not seq.draft else self._verify(req, seq, now)
                if delta is not None:
                    events.append((req.ticket, delta))
            for seq in req.seqs:
                seq.row = -1
            if req.done:
                events.extend(self._finish(req, now, post=False))
        self._post_many(events)

    def _next_token(self, req: _Request, seq: Sequence, now: float) -> Delta | None:
        completion = req.ticket.completion
        logits = None
        if seq.sampler.in_graph:
            token = int(llama_cpp.llama_get_sampled_token_ith(self.ctx, seq.row))
            if token < 0:
                # llama.cpp took the chain but its device lacks an operation of it: this step's
                # requests fail, and later ones sample on the host.
                self._graph_ok = False
                raise RuntimeError(
                    "llama.cpp sampled no token in its graph; sampling on the host from now on"
                )
            seq.sampler.accept(token)
            self._stats.graph_sampled += 1
            req.graph_sampled += 1
        else:
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self.ctx, seq.row), shape=(self.n_vocab,)
            )
            token = seq.sampler.sample(logits, self.candidates)
            self._stats.host_sampled += 1
        seq.generated += 1
        if req.first_token_at is None:
            req.first_token_at = now
        req.last_token_at = now
        if seq.last_token_at is not None:
            req.intervals.append(now - seq.last_token_at)
        seq.last_token_at = now
        logprobs = None
        top = completion.sampling.top_logprobs
        eog = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        piece = b"" if eog else self._token_piece(token, token in completion.shown)
        if top is not None and logits is not None:
            value, alternatives = logprobs_of(logits, token, top)
            logprobs = [
                TokenLogprob(
                    piece.decode("utf-8", errors="replace"),
                    value,
                    list(piece),
                    [self._alternative(t, lp) for t, lp in alternatives],
                )
            ]
        text = seq.text.push(piece) if not eog else ""
        if eog or seq.text.stopped:
            seq.finish = "stop"
        elif seq.generated >= completion.max_tokens:
            seq.finish = "length"
        else:
            seq.pending = token
        if seq.finish is not None:
            text += seq.text.flush()
        if not text and logprobs is None and seq.finish is None:
            return None
        return Delta(seq.index, text, logprobs, seq.finish)

    def _verify(self, req: _Request, seq: Sequence, now: float) -> Delta | None:
        """Sample the pending token's row, then each drafted token's while the sampler picks the
        drafted token: those are kept (their cells hold them already), the first other pick is the
        next pending token, and the cells of the drafts after it go."""
        draft, seq.draft = seq.draft, []
        delta = self._next_token(req, seq, now)
        kept = 0
        while kept < len(draft) and seq.finish is None and seq.pending == draft[kept]:
            seq.tokens.append(draft[kept])
            seq.pending = None
            seq.row = seq.draft_row + kept
            kept += 1
            delta = _merged(delta, self._next_token(req, seq, now))
        req.drafted += len(draft)
        req.accepted += kept
        self._stats.drafted += len(draft)
        self._stats.accepted += kept
        if kept < len(draft) and not llama_cpp.llama_memory_seq_rm(
            self.memory, seq.seq_id, seq.n_past + seq.shift, -1
        ):
            raise RuntimeError("llama.cpp could not remove a rejected draft from the cache")
        return delta

    def _release_sampler(self, seq: Sequence) -> None:
        """Take a sequence's chain back from llama.cpp's graph (it must not run on freed memory),
        then free it."""
        if seq.sampler.in_graph and self.ctx:
            llama_cpp.llama_set_sampler(self.ctx, seq.seq_id, None)
            seq.sampler.in_graph = False
        seq.sampler.close()

    def _alternative(self, token: int, logprob: float) -> tuple[str, float, list[int]]:
        piece = self._token_piece(token)
        return piece.decode("utf-8", errors="replace"), logprob, list(piece)

    def _token_piece(self, token: int, special: bool = False) -> bytes:
        return token_bytes(self.vocab, token, self._piece, special=special)

    def _finish(
        self, req: _Request, now: float, post: bool = True
    ) -> list[tuple[Ticket, Delta | Result | BaseException | None]]:
        """Release a request's sequences; their cells stay cached for later prefixes."""
        self._running.remove(req)
        for seq in req.seqs:
            self._release_sampler(seq)
            if seq.tokens and self.config.prefix_cache:
                self._cached[seq.seq_id] = seq.tokens
                if self._drafter is not None:
                    self._drafter.cached(seq.seq_id, seq.n_past)
            else:
                llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
                self._forget_drafts(seq.seq_id)
                self._free_ids.append(seq.seq_id)
        ticket = req.ticket
        result = Result(
            prompt_tokens=len(ticket.completion.prompt),
            cached_tokens=req.cached_tokens,
            checkpoints_saved=req.checkpoints_saved,
            checkpoints_restored=req.checkpoints_restored,
            checkpoints_evicted=req.checkpoints_evicted,
            graph_sampled=req.graph_sampled,
            drafted=req.drafted,
            accepted=req.accepted,
            completion_tokens=[s.generated for s in req.seqs],
            queue_s=req.admitted_at - ticket.submitted_at,
            first_token_s=None if req.first_token_at is None else req.first_token_at - ticket.submitted_at,
            decode_s=0.0
            if req.first_token_at is None or req.last_token_at is None
            else req.last_token_at - req.first_token_at,
            end_s=now - ticket.submitted_at,
            intervals=req.intervals,
        )
        if self.observer is not None:
            try:
                self.observer(result, ticket.completion)
            except Exception:  # the metrics must never stop the engine
                logger.exception("recording the metrics of a finished request failed")
        events: list[tuple[Ticket, Delta | Result | BaseException | None]] = [(ticket, result)]
        self._update_usage()
        if post:
            self._post_many(events)
            return []
        return events

    def _update_usage(self) -> None:
        stats = self._stats
        stats.running = len(self._running)
        stats.cached_sequences = len(self._cached)
        stats.kv_cells_reserved = self._reserved()
        held = sum(s.n_past for r in self._running for s in r.seqs) + self._cached_cells()
        stats.kv_cells_used = min(held, self.capacity)
        saved = self.checkpoints.stats
        stats.checkpoints, stats.checkpoint_bytes = saved.held, saved.held_bytes
        stats.checkpoints_saved, stats.checkpoints_restored = saved.saved, saved.restored
        stats.checkpoints_evicted = saved.evicted

    def _fail_running(self, exc: Exception) -> None:
        for req in list(self._running):
            self._fail(req, exc)
        self._update_usage()

    def _fail(self, req: _Request, exc: Exception) -> None:
        """Fail one running request: its sequences are emptied and their ids free again."""
        self._running.remove(req)
        for seq in req.seqs:
            self._release_sampler(seq)
            self._forget_drafts(seq.seq_id)
            llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
            self._free_ids.append(seq.seq_id)
        self._post(req.ticket, exc if isinstance(exc, APIError) else APIError(f"generation failed: {exc}"))

    # -- to the event loop ---------------------------------------------------------------------

    def _post(self, ticket: Ticket, item: BaseException | None) -> None:
        """Admission (None) or a failure, for one ticket."""
        self._post_many([(ticket, item)])

    def _post_many(self, events: list[tuple[Ticket, Delta | Result | BaseException | None]]) -> None:
        if not events:
            return
        self._update_usage()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, Any]]] = {}
        for ticket, item in events:
            by_loop.setdefault(ticket.loop, []).append((ticket, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver(items: list[tuple[Ticket, Any]]) -> None:
    for ticket, item in items:
        if item is None or isinstance(item, BaseException):
            ticket._admit(item)
        else:
            ticket.events.put_nowait(item)


def _merged(first: Delta | None, second: Delta | None) -> Delta | None:
    """One choice's deltas of one step as one."""
    if first is None or second is None:
        return first or second
    logprobs = None if first.logprobs is None else first.logprobs + (second.logprobs or [])
    return Delta(first.index, first.text + second.text, logprobs, second.finish_reason)
