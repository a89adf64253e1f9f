"""The model registry: which store models are loaded, loading on first use, and unloading.

Models load on their first request (or at start with `preload`). Several stay loaded within
`max_loaded_models` and the memory budget; when a new one needs room the least recently used idle
model goes. Each model unloads after its keep-alive once idle. When the store changes, or the
watcher's frequent check sees a loaded model's file with another size, mtime or inode, the model
is retired: it finishes its in-flight requests and then unloads, and the next request judges and
loads the new file. All decisions run on the event loop; loading, unloading and inference run in
worker threads.

Loading one model, in `_acquire`:

1. open the file (never blocking) and take its identity from the open descriptor; a file that
   changed since the last scan is scanned again first (it may be invalid now);
2. a file that is not a verified, pinned catalogue install is probed in a child process
   (`probe.py`) unless `untrusted_probe` is off, once per file identity: a crash or load error
   marks the model invalid (`ModelStore.mark_invalid`) and the request gets a 400 `model_invalid`;
3. llama.cpp loads the descriptor's file (`/proc/self/fd/N`), the very one that was judged.

A request for a model the store lists as invalid (truncated, not a GGUF, crashed the probe) gets
a 400 `model_invalid` with the reason, never a load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pendra_shared.api_errors import InvalidRequest, ModelNotFoundError, Unavailable, WrongPurpose
from pendra_shared.catalogue import Sampling
from pendra_shared.config import Settings
from pendra_shared.store import (
    FileIdentity,
    ModelStore,
    ScanResult,
    StoredModel,
    by_name,
    fd_path,
    open_regular,
)
from pendra_shared.store import identity_of as stat_identity
from pydantic import ValidationError

from pendra_inference.backends import activate, usable_cores
from pendra_inference.embed_batcher import EmbedBatcher
from pendra_inference.engine import POOLING, EngineConfig, LlamaEngine, gpu_offload_supported
from pendra_inference.metrics import InferenceMetrics, LoadedModel, ServerLoad
from pendra_inference.model_memory import SWA, MemoryShape, memory_shape
from pendra_inference.probe import ProbeResult, probe
from pendra_inference.scheduler import Scheduler, SchedulerConfig
from pendra_inference.speculation import Speculation, speculation_of
from pendra_inference.vision import open_projector

logger = logging.getLogger(__name__)

Identity = FileIdentity
EngineFactory = Callable[[Path, EngineConfig], LlamaEngine]
Prober = Callable[..., ProbeResult]
ENDPOINT_FOR = {"chat": "/v1/chat/completions", "embedding": "/v1/embeddings", "rerank": "/v1/rerank"}
MAX_KEEP_ALIVE_S = 10 * 365 * 86400.0
_DURATION_RE = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")


def parse_keep_alive(value: str | int | float | None, default: float | None) -> float | None:
    """Seconds to stay loaded when idle; None means forever. Ollama style: 30s, 5m, 1h, 0, -1."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"keep_alive must be a duration such as 30s, 5m, 1h, 0 or -1, not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(value.strip())
        if match is None:
            raise ValueError(f"keep_alive {value!r} is not a duration such as 30s, 5m, 1h, 0 or -1")
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
        seconds = float(match.group(1)) * scale
    if not math.isfinite(seconds):
        raise ValueError(f"keep_alive {value!r} is not a finite duration")
    if seconds > MAX_KEEP_ALIVE_S:
        return None  # longer than ten years: for ever, as -1 says
    return None if seconds < 0 else seconds


def physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 1024**3


def identity_of(path: Path) -> Identity:
    return stat_identity(path.name, path.stat())


def model_invalid(name: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"The model '{name}' is invalid: {reason}", param="model", code="model_invalid")


@dataclass
class Loaded:
    model: StoredModel
    engine: LlamaEngine
    identity: Identity
    memory_bytes: int
    keep_alive_s: float | None
    runner: Any = None  # the chat model's Scheduler or the embedding model's EmbedBatcher
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    retired: bool = False
    closed: bool = False  # unloaded: its engine is freed, and must never be freed again
    memo: dict[str, Any] = field(default_factory=dict)  # per-model results worth keeping (template)

    @property
    def name(self) -> str:
        return self.model.name


class ModelRegistry:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        engine_factory: EngineFactory = LlamaEngine,
        prober: Prober = probe,
        metrics: InferenceMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or InferenceMetrics()
        self.store = store
        self.engine_factory = engine_factory
        self.prober = prober
        self.default_keep_alive = parse_keep_alive(settings.keep_alive, 300.0)
        self.budget = settings.memory_budget_bytes or int(physical_memory() * 0.75)
        self.backends = activate(settings=settings)
        self.gpu = gpu_offload_supported()
        self._loaded: dict[str, Loaded] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self.loading: dict[str, int] = {}  # model name: requests waiting for it to load
        self._reserved: dict[str, int] = {}  # model name: the memory of a load under way
        self._scan: ScanResult | None = None
        self._scan_lock = asyncio.Lock()
        self._probed: dict[str, Identity] = {}  # file name: the identity that passed the probe
        # model file name: the model's identity and its projector's stat, and the probe's verdict
        self._probed_projectors: dict[str, tuple[Any, str | None]] = {}

    # -- the store ---------------------------------------------------------------------------

    async def refresh(self) -> ScanResult:
        """Rescan the store; retire loaded models whose file is gone or replaced."""
        async with self._scan_lock:
            scan = await asyncio.to_thread(self.store.scan)
            self._scan = scan
        valid = {m.name: m for m in scan.valid}
        for name, loaded in list(self._loaded.items()):
            current = valid.get(name)
            if current is None or current.identity != loaded.identity:
                await self._retire(loaded, "changed or was removed")
        return scan

    async def _retire(self, loaded: Loaded, why: str) -> None:
        if not loaded.retired:
            logger.info("%s %s; unloading once idle", loaded.name, why)
        loaded.retired = True
        await self._unload_if_idle(loaded, "replaced")

    async def check_loaded_files(self) -> None:
        """Retire every loaded model whose file is no longer the one loaded (in place rewrites and
        truncations included), without waiting for the watcher: llama.cpp maps the file, so it
        must stop using it before the next request touches a page that is gone."""
        for loaded in list(self._loaded.values()):
            if loaded.retired:
                continue
            try:
                same = await asyncio.to_thread(identity_of, loaded.model.path) == loaded.identity
            except OSError:
                same = False
            if not same and not loaded.retired and not loaded.closed:  # (a refresh may have meanwhile)
                self._scan = None  # the listing is stale too
                await self._retire(loaded, "changed on disk")

    async def scan(self) -> ScanResult:
        if self._scan is None:
            return await self.refresh()
        return self._scan

    async def valid_models(self) -> list[StoredModel]:
        """The listing, scanned again when the store directory changed since the last scan: an
        install another process finished is listed before the watcher reports it. (A request
        naming a model need not: `find` scans again when the name is missing.)"""
        scan = self._scan
        if scan is None or not await asyncio.to_thread(self.store.unchanged_since, scan):
            scan = await self.refresh()
        return scan.valid

    async def find(self, name: str) -> StoredModel:
        model = by_name((await self.scan()).valid, name)
        if model is not None and model.path.exists():
            return model
        # The watcher may not have told us yet (a model just installed or removed): look again.
        return self._lookup(await self.refresh(), name)

    @staticmethod
    def _lookup(scan: ScanResult, name: str) -> StoredModel:
        model = by_name(scan.valid, name)
        if model is not None:
            return model
        for model in scan.models:
            if name in (model.name, model.file_name) and model.error:
                raise model_invalid(name, model.error)
        raise ModelNotFoundError(f"The model '{name}' does not exist", param="model")

    def is_loaded(self, name: str) -> bool:
        loaded = self._loaded.get(name)
        return loaded is not None and not loaded.retired

    # -- use ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str, purpose: str, keep_alive: Any = None) -> AsyncIterator[Loaded]:
        """Hold a loaded model for one request."""
        model = await self.find(name)
        if model.purpose != purpose:
            endpoint = ENDPOINT_FOR.get(model.purpose or "", "no endpoint Pendra offers")
            raise WrongPurpose(
                f"'{name}' is a{'n' if (model.purpose or 'x')[0] in 'aeiou' else ''} "
                f"{model.purpose} model; it is served on {endpoint}",
                param="model",
            )
        try:
            keep = parse_keep_alive(keep_alive, self.default_keep_alive)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="keep_alive") from None
        if self.is_loaded(model.name):
            loaded = await self._acquire(model)
        else:
            self.loading[model.name] = self.loading.get(model.name, 0) + 1
            try:
                loaded = await self._acquire(model)
            finally:
                self.loading[model.name] -= 1
                if not self.loading[model.name]:
                    del self.loading[model.name]
        loaded.in_flight += 1
        try:
            yield loaded
        finally:
            loaded.in_flight -= 1
            loaded.last_used = time.monotonic()
            loaded.keep_alive_s = keep
            if loaded.retired or keep == 0:
                await self._unload_if_idle(loaded, "replaced" if loaded.retired else "idle")

    async def _acquire(self, model: StoredModel) -> Loaded:
        lock = self._load_locks.setdefault(model.name, asyncio.Lock())
        async with lock:
            loaded = self._loaded.get(model.name)
            if loaded is not None and not loaded.retired:
                try:
                    # (a projector paired or unpaired since it loaded: loaded again, with or without)
                    if (
                        identity_of(model.path) == loaded.identity
                        and model.projector == loaded.model.projector
                    ):
                        return loaded
                except OSError:
                    pass
                await self._retire(loaded, "changed on disk")
            fd, model = await self._open_current(model)
            draft_fd: tuple[int, Path, bool] | None = None
            try:
                identity = stat_identity(model.file_name, os.fstat(fd))
                config, memory = self.engine_config(model)
                await self._make_room(model.name, memory)
                self._reserved[model.name] = memory  # (no await since the room was made)
                path = fd_path(fd, model.path)
                await self._probe_if_untrusted(model, identity, config, path, fd)
                projector, refused = await self._probe_projector(model, identity, config, path, fd)
                draft_fd = await self._draft_file(model, config)
                logger.info(
                    "loading %s (%s, n_ctx=%d, gpu_layers=%d)",
                    model.name,
                    model.file_name,
                    config.n_ctx,
                    config.n_gpu_layers,
                )
                started = time.monotonic()
                try:
                    draft = None if draft_fd is None else (fd_path(draft_fd[0], draft_fd[1]), draft_fd[2])
                    engine, runner = await asyncio.to_thread(
                        self._load, model, config, path, projector, refused, draft
                    )
                except (ValueError, RuntimeError, OSError) as exc:
                    logger.exception("loading %s failed", model.name)
                    self.metrics.model_load_failed(model.name)
                    raise Unavailable(f"'{model.name}' could not be loaded: {exc}") from None
                self.metrics.model_loaded(model.name, model.purpose or "chat", time.monotonic() - started)
            finally:
                os.close(fd)
                if draft_fd is not None:
                    os.close(draft_fd[0])
                self._reserved.pop(model.name, None)
            loaded = Loaded(model, engine, identity, memory, self.default_keep_alive, runner)
            self._loaded[model.name] = loaded
            return loaded

    async def _open_current(self, model: StoredModel) -> tuple[int, StoredModel]:
        """An open descriptor of the model's file and the model as scanned with that very file:
        when the file changed since the last scan, the store is scanned again (the file may be
        invalid now, or no longer a verified install)."""
        for _attempt in range(3):
            try:
                fd = await asyncio.to_thread(open_regular, model.path)
            except OSError:
                fd = -1
            if fd >= 0:
                if stat_identity(model.file_name, os.fstat(fd)) == model.identity:
                    return fd, model
                os.close(fd)
            model = self._lookup(await self.refresh(), model.name)
        raise Unavailable(f"'{model.name}' is being changed on disk; retry when it is in place")

    async def _draft_file(self, model: StoredModel, config: EngineConfig) -> tuple[int, Path, bool] | None:
        """The draft model's open file, its path and whether it may be mapped (a pinned install's),
        where the model speculates with one: installed, for chat, the file as scanned, and probed
        like any model no pinned install verified. None (the model then serves without
        speculation, as the scheduler logs) where there is none or it cannot be used."""
        name = draft_name(model)
        if name is None:
            return None
        fd = -1
        try:
            draft = self._lookup(await self.refresh(), name)
            if (draft.purpose or "chat") != "chat":
                raise InvalidRequest(f"'{draft.name}' is a {draft.purpose} model")
            fd = await asyncio.to_thread(open_regular, draft.path)
            identity = stat_identity(draft.file_name, os.fstat(fd))
            if identity != draft.identity:
                raise InvalidRequest(f"'{draft.name}' is being changed on disk")
            await self._probe_if_untrusted(draft, identity, config, fd_path(fd, draft.path), fd)
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            if not isinstance(exc, Exception):
                raise
            logger.warning("%s: draft model %r: %s", model.name, name, getattr(exc, "message", exc))
            return None  # the model serves without a draft
        return fd, draft.path, draft.trusted

    async def _probe_if_untrusted(
        self, model: StoredModel, identity: Identity, config: EngineConfig, path: Path, fd: int
    ) -> None:
        """Load a file that no pinned install verified in a child process first (see probe.py);
        a failure marks the model invalid until its file changes."""
        if model.trusted or not self.settings.untrusted_probe:
            return
        if self._probed.get(model.file_name) == identity:
            return
        if model.sidecar is None:
            why = "hand-dropped"
        elif not model.verified:
            why = "changed since it was verified"
        else:
            why = "imported, not a pinned catalogue install"
        logger.info("probing %s in a child process first (%s)", model.name, why)
        result = await self._probe(model, config, path, fd)
        if result.reason is None:
            logger.info("%s passed the load probe in %.1fs", model.name, result.seconds)
            self._probed[model.file_name] = identity
            return
        if not result.lasting:  # out of memory, a timeout, killed from outside: not the file's fault
            logger.warning("%s could not be probed now: %s", model.name, result.reason)
            raise Unavailable(f"'{model.name}' cannot be loaded now: {result.reason}")
        logger.warning("%s refused: %s", model.name, result.reason)
        self.metrics.model_load_failed(model.name)
        await asyncio.to_thread(self.store.mark_invalid, identity, result.reason, persist=True)
        await self.refresh()
        raise model_invalid(model.name, result.reason)

    async def _probe(
        self, model: StoredModel, config: EngineConfig, path: Path, fd: int, **extra: Any
    ) -> ProbeResult:
        return await asyncio.to_thread(
            self.prober,
            path,
            config,
            timeout_s=self.settings.probe_timeout_s,
            pass_fds=(fd,) if path != model.path else (),
            **extra,
        )

    async def _probe_projector(
        self, model: StoredModel, identity: Identity, config: EngineConfig, path: Path, fd: int
    ) -> tuple[Path | None, str | None]:
        """The model's projector, or why it is refused: a projector beside a model no pinned
        install verified is loaded in a child process first too (after the model alone passed), so
        that one that crashes llama.cpp costs the model its images, not the server."""
        projector = model.projector
        if projector is None or config.embedding:
            return None, None
        if model.trusted or not self.settings.untrusted_probe:
            return projector, None
        try:
            st = projector.stat()
        except OSError as exc:
            return None, f"its projector cannot be read: {exc.strerror or exc}"
        key = (identity, (st.st_size, st.st_mtime_ns, st.st_ino))
        seen = self._probed_projectors.get(model.file_name)
        if seen is not None and seen[0] == key:
            refused = seen[1]
        else:
            logger.info("probing %s with its projector %s in a child process", model.name, projector.name)
            result = await self._probe(model, config, path, fd, projector=projector)
            refused = (
                None if result.reason is None else f"its projector failed the load probe: {result.reason}"
            )
            if result.reason is None or result.lasting:
                self._probed_projectors[model.file_name] = (key, refused)
        if refused is not None:
            logger.warning("%s: %s; serving text only", model.name, refused)
            return None, refused
        return projector, None

    def _load(
        self,
        model: StoredModel,
        config: EngineConfig,
        path: Path,
        projector_path: Path | None = None,
        projector_refused: str | None = None,
        draft: tuple[Path, bool] | None = None,
    ) -> tuple[LlamaEngine, Any]:
        engine = self.engine_factory(path, config)
        try:
            if config.embedding:
                budget = int(self._options(model).get("embed_batch_tokens", self.settings.embed_batch_tokens))
                return engine, EmbedBatcher(engine, token_budget=budget, name=model.name)
            projector, refused = open_projector(
                projector_path,
                engine.model,
                engine.n_embd,
                n_threads=config.n_threads or usable_cores(),
                gpu=config.n_gpu_layers != 0,
            )
            engine.projector_refused = projector_refused or refused or model.projector_problem
            engine.sampling_defaults = sampling_defaults(model)
            try:
                return engine, Scheduler(
                    engine.model,
                    engine.vocab,
                    self.scheduler_config(model, config),
                    model.name,
                    self.metrics.observer(model.name),
                    projector=projector,
                    draft=None if draft is None else draft[0],
                    draft_gpu_layers=config.n_gpu_layers,
                    draft_mmap=draft is not None and draft[1],
                )
            except BaseException:
                if projector is not None:
                    projector.close()
                raise
        except BaseException:
            engine.close()
            raise

    @staticmethod
    def _options(model: StoredModel) -> dict[str, Any]:
        return dict(model.sidecar.options) if model.sidecar else {}

    def scheduler_config(self, model: StoredModel, config: EngineConfig) -> SchedulerConfig:
        s = self.settings
        options = self._options(model)
        return SchedulerConfig(
            n_ctx=config.n_ctx,
            parallel=config.parallel,
            n_batch=config.n_batch,
            n_ubatch=config.n_ubatch,
            prefill_budget=int(options.get("prefill_budget", s.prefill_budget)),
            max_queue=s.max_queue,
            queue_timeout_s=s.queue_timeout_s,
            n_threads=config.n_threads or usable_cores(),
            prefix_cache=bool(options.get("prefix_cache", s.prefix_cache)),
            flash_attention=flash_attention(str(options.get("flash_attention", s.flash_attention)), config),
            n_seq_max=config.sequences,
            checkpoint_budget_bytes=config.checkpoint_bytes,
            backend_sampling=backend_sampling(options.get("backend_sampling", s.backend_sampling), config),
            gpu=config.n_gpu_layers != 0,
            speculative=speculation_for(model),
            mtp_loaded=config.load_mtp,
        )

    def parallel_for(
        self, model: StoredModel, n_ctx: int, gpu: bool, shape: MemoryShape | None = None
    ) -> int:
        """Sequences of `n_ctx` tokens the model's cache holds: the setting or sidecar option, else as
        many as a fair share of the memory budget allows (8 at most on a CPU, 32 on a GPU). Each
        sequence of a recurrent or hybrid model also costs its states, and of a recurrent, hybrid or
        sliding-window model its share of the checkpoints (see `sequence_plan`)."""
        chosen = int(self._options(model).get("parallel", self.settings.parallel))
        if chosen > 0:
            return chosen
        shape = shape or memory_shape(model.path, **self.store.gguf_limits)
        share = self.budget // max(1, self.settings.max_loaded_models) - model.size_bytes
        sequences, checkpoint_bytes = self.sequence_plan(model, shape, 1)
        if self._checkpoint_setting(model) is not None:  # a set budget is paid once, not per sequence
            share -= checkpoint_bytes
            checkpoint_bytes = 0
        per_sequence = max(1, shape.context_bytes(n_ctx, sequences * state_copies(model)) + checkpoint_bytes)
        return max(1, min(32 if gpu else 8, share // per_sequence))

    def _checkpoint_setting(self, model: StoredModel) -> Any:
        return self._options(model).get("checkpoint_budget_bytes", self.settings.checkpoint_budget_bytes)

    def sequence_plan(self, model: StoredModel, shape: MemoryShape, parallel: int) -> tuple[int, int]:
        """Sequence ids of the context (0: llama.cpp's 256) and bytes of checkpoints for a model whose
        cache holds `parallel` sequences. llama.cpp allocates a recurrent state per sequence id up
        front, so a recurrent or hybrid model gets two per sequence (one running, one cached for
        the next turn) and, unless set, room for two checkpoints per id. A sliding-window model's
        sequences hold no such state (llama.cpp's 256 ids); unless set, its checkpoints (one window
        of its sliding-window layers each) get room for two per sequence of the cache."""
        chosen = self._checkpoint_setting(model)
        if shape.state_bytes:
            sequences = min(256, 2 * parallel)
            default = 2 * sequences * shape.state_bytes
        elif shape.swa_state_bytes:
            sequences, default = 0, 2 * parallel * shape.swa_state_bytes
        else:
            return 0, 0
        return sequences, default if chosen is None else int(chosen)

    def engine_config(self, model: StoredModel) -> tuple[EngineConfig, int]:
        """How to load `model` (settings, overridden by its sidecar's options) and its memory."""
        s = self.settings
        options: dict[str, Any] = dict(model.sidecar.options) if model.sidecar else {}
        trained = model.facts.context_length if model.facts and model.facts.context_length else 4096
        n_ctx = int(options.get("n_ctx", s.n_ctx)) or trained
        n_ctx = min(n_ctx, trained)
        embedding = model.purpose in ("embedding", "rerank")  # a reranker is an encoder too
        n_batch = int(options.get("n_batch", s.n_batch))
        n_ubatch = int(options.get("n_ubatch", s.n_ubatch))
        pooling = None
        if embedding:
            # Encoders need a whole sequence in one micro-batch; so does pooling.
            n_batch = n_ubatch = n_ctx
            pooling_name = options.get("pooling")
            if pooling_name in POOLING:
                pooling = POOLING[pooling_name]
            elif not (model.facts and model.facts.pooling_type):
                pooling = POOLING["mean"]  # a decoder used for embeddings: mean pooling
        gpu_layers = options.get("n_gpu_layers", s.n_gpu_layers)
        if gpu_layers is None:
            gpu_layers = -1 if self.gpu else 0
        shape = memory_shape(model.path, **self.store.gguf_limits)
        on_gpu = self.gpu and int(gpu_layers) != 0
        parallel = 1 if embedding else self.parallel_for(model, n_ctx, on_gpu, shape)
        sequences, checkpoint_bytes = (0, 0) if embedding else self.sequence_plan(model, shape, parallel)
        config = EngineConfig(
            n_ctx=n_ctx,
            n_batch=min(n_batch, n_ctx),
            n_ubatch=min(n_ubatch, n_batch, n_ctx),
            n_threads=options.get("n_threads", s.n_threads) or usable_cores(),
            n_gpu_layers=int(gpu_layers),
            embedding=embedding,
            pooling=pooling,
            parallel=parallel,
            sequences=sequences,
            checkpoint_bytes=checkpoint_bytes,
            use_mmap=model.trusted,
            load_mtp=not embedding and mtp_wanted(model, shape),
        )
        context_bytes = shape.context_bytes(n_ctx * parallel, max(1, sequences) * state_copies(model))
        projector_bytes = 0 if embedding or model.projector is None else _size(model.projector)
        weights = model.size_bytes + projector_bytes
        draft_bytes = 0 if embedding else self._draft_bytes(model, n_ctx * parallel, shape)
        return config, weights + shape.overhead_bytes + context_bytes + checkpoint_bytes + draft_bytes

    def _draft_bytes(self, model: StoredModel, cells: int, shape: MemoryShape) -> int:
        """A draft model's weights and its cache of `cells` (as large as the model's), where the
        model speculates with one that is installed; the MTP block's cache where it drafts."""
        if mtp_wanted(model, shape):
            return shape.mtp_kv_bytes_per_token * cells
        name = draft_name(model)
        if name is None:
            return 0
        try:
            draft = self.store.find(name)
            shape = memory_shape(draft.path, **self.store.gguf_limits)
        except Exception:  # noqa: BLE001 - no usable draft: the model loads without one
            return 0
        return draft.size_bytes + shape.overhead_bytes + shape.kv_bytes(cells)

    async def _make_room(self, name: str, needed: int) -> None:
        """Unload idle models (least recently used first) until `name` fits beside the loaded
        models and the loads under way, in model count and memory."""

        def used() -> int:
            return sum(m.memory_bytes for m in self._loaded.values()) + sum(self._reserved.values())

        def count() -> int:
            return len(self._loaded) + len(self._reserved)

        while count() and (count() >= self.settings.max_loaded_models or used() + needed > self.budget):
            idle = [m for m in self._loaded.values() if m.in_flight == 0]
            if not idle:
                raise Unavailable(
                    f"'{name}' cannot be loaded now: every loaded model is busy and there is no room; "
                    "retry shortly"
                )
            victim = min(idle, key=lambda m: m.last_used)
            logger.info("unloading %s to make room for %s", victim.name, name)
            await self._unload(victim, "room")
        if needed > self.budget:
            raise Unavailable(
                f"'{name}' needs about {needed:,} bytes but the memory budget is {self.budget:,} "
                "(PENDRA_MEMORY_BUDGET_BYTES)"
            )

    async def _unload_if_idle(self, loaded: Loaded, reason: str) -> None:
        if loaded.in_flight == 0:
            await self._unload(loaded, reason)

    async def _unload(self, loaded: Loaded, reason: str) -> None:
        """Unload `loaded`: idle, room, replaced or shutdown (the metrics' reasons). Two paths may
        reach one model (a retirement while the file check awaits): it is freed once."""
        if loaded.closed:
            return
        loaded.closed = True
        if self._loaded.get(loaded.name) is loaded:
            del self._loaded[loaded.name]  # (a retired model may have been replaced there already)
        self.metrics.model_unloaded(loaded.name, reason)

        def close() -> None:
            if loaded.runner is not None:
                loaded.runner.close()
                projector = getattr(loaded.runner, "projector", None)
                if projector is not None:
                    projector.close()
            loaded.engine.close()

        await asyncio.to_thread(close)
        logger.info("unloaded %s", loaded.name)

    async def reap_idle(self) -> None:
        """Unload idle models whose keep-alive has passed."""
        now = time.monotonic()
        for loaded in list(self._loaded.values()):
            if loaded.in_flight or loaded.keep_alive_s is None:
                continue
            if now - loaded.last_used >= loaded.keep_alive_s:
                logger.info("%s idle for %.0fs; unloading", loaded.name, now - loaded.last_used)
                await self._unload(loaded, "idle")

    async def run_reaper(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.reap_idle()

    async def close(self) -> None:
        for loaded in list(self._loaded.values()):
            await self._unload(loaded, "shutdown")

    def loaded_names(self) -> list[str]:
        return sorted(self._loaded)

    def loaded_models(self) -> list[Loaded]:
        return list(self._loaded.values())

    def report(self) -> list[LoadedModel]:
        """What `/metrics` and `/status` show of each loaded model."""
        return [
            LoadedModel(
                m.name,
                m.model.purpose or "chat",
                m.memory_bytes,
                m.runner.stats() if isinstance(m.runner, Scheduler) else None,
                m.in_flight,
            )
            for m in self._loaded.values()
        ]

    def load(self) -> ServerLoad:
        return ServerLoad.of(self.report(), self.loading)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _chosen(model: StoredModel, key: str) -> Any:
    """A per-model choice: the sidecar's options, else its catalogue entry's (None: neither)."""
    sidecar = model.sidecar
    if sidecar is None:
        return None
    if key in sidecar.options:
        return sidecar.options[key]
    return (sidecar.catalogue or {}).get(key)


def speculation_for(model: StoredModel) -> Speculation | None:
    """The model's speculative decoding, or None; a value that does not parse is logged and ignored
    (the model serves without speculation rather than not at all)."""
    try:
        return speculation_of(_chosen(model, "speculative"))
    except ValueError as exc:
        logger.warning("%s: %s; serving without speculative decoding", model.name, exc)
        return None


def draft_name(model: StoredModel) -> str | None:
    """The installed model that writes the model's drafts (speculation of kind "draft"), or None."""
    spec = speculation_for(model)
    return spec.model if spec is not None and spec.kind == "draft" else None


def mtp_wanted(model: StoredModel, shape: MemoryShape) -> bool:
    """The model drafts with its own multi-token-prediction block (speculation of kind "mtp"; a
    sliding-window model does not speculate, see scheduler.py)."""
    spec = speculation_for(model)
    return spec is not None and spec.kind == "mtp" and shape.kind != SWA


def state_copies(model: StoredModel) -> int:
    """Recurrent states llama.cpp keeps per sequence id: one, and with speculative decoding one
    rollback snapshot per drafted token (`n_rs_seq`, see scheduler.py)."""
    spec = speculation_for(model)
    return 1 + (spec.draft_tokens if spec is not None else 0)


def sampling_defaults(model: StoredModel) -> dict[str, float]:
    """The model's recommended sampling (what a request setting none of it gets), or {}."""
    value = _chosen(model, "sampling")
    if value is None:
        return {}
    try:
        return Sampling.model_validate(value).values()
    except ValidationError as exc:
        logger.warning("%s: sampling: %s; ignored", model.name, exc.errors()[0]["msg"])
        return {}


def backend_sampling(setting: str | bool, config: EngineConfig) -> bool:
    """Sampling in llama.cpp's graph: on, off, or (auto) where the model runs on a GPU."""
    if isinstance(setting, bool):
        return setting
    return config.n_gpu_layers != 0 if setting == "auto" else setting == "on"


def flash_attention(setting: str, config: EngineConfig) -> bool | None:
    """auto: llama.cpp's choice with a GPU; off on a CPU (batch-invariant results, see the README)."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    return None if config.n_gpu_layers != 0 else False
