"""The inference service's Prometheus metrics: tokens, requests, latencies, the KV cache, models.

Where the engine measures a value it is read from there, never measured again:
- the scheduler tells `finished` of every request it ends (stopped, at its limit, or aborted
  because the client left), on its own thread, with its timings: queue time, time to first
  token, the intervals between tokens, prompt and generation seconds, cached prompt tokens;
- the gauges (requests waiting and running, KV-cache cells) are the schedulers' own figures,
  read when `/metrics` is scraped, as are the loaded models and the memory the registry gave them;
- the chat and embedding services count each request once with how it ended (`request_done`),
  since only they know a tool call from a plain stop, or an error from a client leaving;
- the registry reports loads and unloads.

Names follow vLLM's meanings and bucket boundaries with Prometheus-style names; the README's
metrics table documents them and a test holds the two together.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from pendra_shared.api_errors import APIError
from pendra_shared.metrics import (
    DURATION_BUCKETS,
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    ServiceMetrics,
)
from prometheus_client import Counter, Gauge, Histogram

from pendra_inference.scheduler import SchedulerStats
from pendra_inference.sequence import ClientGone, Completion, Result

MODEL = "model_name"
FINISH_REASONS = ("stop", "length", "tool_calls", "abort", "error")
ENDPOINT_OF = {"chat": "chat", "embedding": "embeddings"}


@dataclass(frozen=True)
class LoadedModel:
    """What `/metrics` shows of one loaded model."""

    name: str
    purpose: str
    memory_bytes: int
    stats: SchedulerStats | None  # a chat model's scheduler figures
    in_flight: int = 0  # requests holding the model (an embedding model's running requests)


@dataclass(frozen=True)
class ServerLoad:
    """The whole server's load across its models: what a router or an endpoint picker reads."""

    waiting: int  # queued in a scheduler, or waiting for their model to load
    running: int
    kv_cache_usage: float  # KV cells in use over every loaded chat model's cells, 0 to 1
    loaded: list[str]
    loading: list[str]  # models requests wait to be loaded

    @classmethod
    def of(cls, loaded: Iterable[LoadedModel], loading: dict[str, int]) -> ServerLoad:
        waiting = sum(loading.values())
        running = cells = used = 0
        names = []
        for m in loaded:
            names.append(m.name)
            if m.stats is None:
                running += m.in_flight
                continue
            waiting += m.stats.waiting
            running += m.stats.running
            cells += m.stats.kv_cells
            used += m.stats.kv_cells_used
        return cls(waiting, running, used / cells if cells else 0.0, sorted(names), sorted(loading))


class InferenceMetrics:
    def __init__(self, service: ServiceMetrics | None = None) -> None:
        self.service = service or ServiceMetrics()
        r = self.service.registry
        self.prompt_tokens = Counter(
            "pendra_prompt_tokens", "Prompt tokens processed (cached ones included).", [MODEL, "endpoint"],
            registry=r,
        )  # fmt: skip
        self.generation_tokens = Counter("pendra_generation_tokens", "Tokens generated.", [MODEL], registry=r)
        self.prompt_images = Counter(
            "pendra_prompt_images",
            "Images read in prompts (each encoded by the model's projector).",
            [MODEL],
            registry=r,
        )
        self.prompt_image_tokens = Counter(
            "pendra_prompt_image_tokens",
            "Prompt tokens that are image embeddings (in pendra_prompt_tokens too).",
            [MODEL],
            registry=r,
        )
        self.sampled_tokens = Counter(
            "pendra_sampled_tokens",
            "Generated tokens by where they were sampled: graph (in llama.cpp's compute graph, only "
            "the token id copied back) or host (from the whole row of logits: grammars, logprobs, "
            "n > 1, speculation).",
            [MODEL, "where"],
            registry=r,
        )
        self.draft_tokens = Counter(
            "pendra_speculative_draft_tokens",
            "Tokens proposed by speculative decoding's draft (n-gram lookup or a draft model).",
            [MODEL],
            registry=r,
        )
        self.accepted_tokens = Counter(
            "pendra_speculative_accepted_tokens",
            "Drafted tokens the model accepted (each one a decode step saved).",
            [MODEL],
            registry=r,
        )
        self.acceptance = Gauge(
            "pendra_speculative_acceptance_ratio",
            "Drafted tokens accepted, 0 to 1, since a speculating model was loaded.",
            [MODEL],
            registry=r,
        )
        self.requests = Counter(
            "pendra_requests",
            "Finished requests by finish reason: stop, length, tool_calls, abort (the client left or "
            "the server stopped it), error.",
            [MODEL, "endpoint", "finish_reason"],
            registry=r,
        )
        self.running = Gauge(
            "pendra_requests_running", "Requests a model is generating.", [MODEL], registry=r
        )
        self.waiting = Gauge("pendra_requests_waiting", "Requests queued for a model.", [MODEL], registry=r)
        self.kv_usage = Gauge(
            "pendra_kv_cache_usage_ratio", "KV-cache cells in use, 0 to 1.", [MODEL], registry=r
        )
        self.kv_cells = Gauge(
            "pendra_kv_cache_cells", "KV-cache cells of a model's context.", [MODEL], registry=r
        )
        self.kv_used = Gauge(
            "pendra_kv_cache_cells_used",
            "KV-cache cells holding running and cached sequences.",
            [MODEL],
            registry=r,
        )
        self.prefix_queries = Counter(
            "pendra_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", [MODEL], registry=r
        )
        self.prefix_hits = Counter(
            "pendra_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (their KV cells shared, not decoded).",
            [MODEL],
            registry=r,
        )
        self.checkpoints = Counter(
            "pendra_checkpoints",
            "Checkpoints of recurrent and hybrid models' states and sliding-window models' last "
            "window: saved, restored (a prompt reused a cached prefix through one), evicted (pushed "
            "out of PENDRA_CHECKPOINT_BUDGET_BYTES).",
            [MODEL, "event"],
            registry=r,
        )
        self.checkpoint_bytes = Gauge(
            "pendra_checkpoint_bytes",
            "Host memory held by a model's checkpoints (recurrent states, sliding windows).",
            [MODEL],
            registry=r,
        )
        self.sequences = Gauge(
            "pendra_sequences",
            "Sequence ids of a chat model's context (each holds a recurrent state on recurrent and "
            "hybrid models).",
            [MODEL],
            registry=r,
        )
        self.prompt_seconds = Counter(
            "pendra_prompt_seconds",
            "Seconds from admission to the first token, summed over requests.",
            [MODEL],
            registry=r,
        )
        self.generation_seconds = Counter(
            "pendra_generation_seconds",
            "Seconds from the first to the last generated token, summed over requests.",
            [MODEL],
            registry=r,
        )
        self.ttft = Histogram(
            "pendra_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            [MODEL],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pendra_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            [MODEL],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "pendra_time_per_output_token_seconds",
            "Mean time per generated token of a request, after the first.",
            [MODEL],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pendra_e2e_request_latency_seconds",
            "Time from arrival to the end of a request.",
            [MODEL],
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "pendra_request_queue_time_seconds",
            "Time from arrival to admission.",
            [MODEL],
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_prompt = Histogram(
            "pendra_request_prompt_tokens", "Prompt tokens per request.", [MODEL], buckets=TOKEN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.request_generated = Histogram(
            "pendra_request_generation_tokens", "Generated tokens per request.", [MODEL],
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.loads = Counter(
            "pendra_model_loads", "Model loads: ok or failed.", [MODEL, "outcome"], registry=r
        )
        self.unloads = Counter(
            "pendra_model_unloads",
            "Model unloads: idle, room (another model needed the memory), replaced (its file changed "
            "or went), shutdown.",
            [MODEL, "reason"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "pendra_model_load_seconds", "Time to load a model.", [MODEL], buckets=DURATION_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.loaded_models = Gauge("pendra_loaded_models", "Models loaded in memory.", registry=r)
        # The whole server's gauges, with no labels, for the Gateway API Inference Extension's
        # endpoint picker (its model-server protocol; the picker's configuration names these
        # series: deploy/kubernetes/components/inference-gateway) and for autoscaling on requests
        # waiting per pod. A model loading for waiting requests is listed as running too: the
        # picker's affinity then sends its next requests to the one load under way.
        self.server_waiting = Gauge(
            "pendra_server_requests_waiting",
            "Requests waiting across every model: queued, or waiting for their model to load.",
            registry=r,
        )
        self.server_running = Gauge(
            "pendra_server_requests_running", "Requests running across every model.", registry=r
        )
        self.server_kv_usage = Gauge(
            "pendra_server_kv_cache_usage_ratio",
            "KV-cache cells in use over every loaded chat model's cells, 0 to 1.",
            registry=r,
        )
        self.server_models = Gauge(
            "pendra_server_models_info",
            "The models loaded or loading (running_lora_adapters) and those being loaded for waiting "
            "requests (waiting_lora_adapters), comma-separated, and how many may be loaded at once "
            "(max_lora), in the labels the endpoint picker reads adapters from; the value is when it "
            "was read (Unix seconds).",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        self.model_memory = Gauge(
            "pendra_model_memory_bytes",
            "Memory a loaded model holds (weights, KV cache, recurrent states and checkpoints), one "
            "series per loaded model.",
            [MODEL, "purpose"],
            registry=r,
        )

    # -- the engine ----------------------------------------------------------------------------

    def observer(self, model: str) -> Callable[[Result, Completion], None]:
        """The scheduler's observer for `model`."""

        def observe(result: Result, completion: Completion) -> None:
            self.finished(model, result, completion.endpoint)
            if completion.images:
                self.prompt_images.labels(model).inc(len(completion.images))
                self.prompt_image_tokens.labels(model).inc(sum(image.n_tokens for image in completion.images))

        return observe

    def finished(self, model: str, result: Result, endpoint: str = "chat") -> None:
        """A request the scheduler ended, with its timings (called on the scheduler's thread)."""
        generated = sum(result.completion_tokens)
        self.prompt_tokens.labels(model, endpoint).inc(result.prompt_tokens)
        self.generation_tokens.labels(model).inc(generated)
        self.prefix_queries.labels(model).inc(result.prompt_tokens)
        self.prefix_hits.labels(model).inc(result.cached_tokens)
        for event, count in (
            ("saved", result.checkpoints_saved),
            ("restored", result.checkpoints_restored),
            ("evicted", result.checkpoints_evicted),
        ):
            if count:
                self.checkpoints.labels(model, event).inc(count)
        self.sampled_tokens.labels(model, "graph").inc(result.graph_sampled)
        self.sampled_tokens.labels(model, "host").inc(generated - result.graph_sampled)
        if result.drafted:
            self.draft_tokens.labels(model).inc(result.drafted)
            self.accepted_tokens.labels(model).inc(result.accepted)
        self.queue_time.labels(model).observe(result.queue_s)
        self.e2e.labels(model).observe(result.end_s)
        if result.first_token_s is not None:
            self.ttft.labels(model).observe(result.first_token_s)
            self.prompt_seconds.labels(model).inc(max(0.0, result.first_token_s - result.queue_s))
            self.generation_seconds.labels(model).inc(result.decode_s)
        itl = self.itl.labels(model)
        for interval in result.intervals:
            itl.observe(interval)
        per_choice = max(result.completion_tokens, default=0)
        if per_choice > 1:
            self.tpot.labels(model).observe(result.decode_s / (per_choice - 1))
        self.request_prompt.labels(model).observe(result.prompt_tokens)
        self.request_generated.labels(model).observe(generated)

    def embedded(self, model: str, tokens: int, seconds: float) -> None:
        """An embeddings request's inputs, decoded in `seconds` from its arrival."""
        self.prompt_tokens.labels(model, "embeddings").inc(tokens)
        self.prompt_seconds.labels(model).inc(seconds)
        self.request_prompt.labels(model).observe(tokens)
        self.e2e.labels(model).observe(seconds)

    # -- the services --------------------------------------------------------------------------

    def request_done(self, model: str, endpoint: str, finish_reason: str) -> None:
        """One request that reached its model, and how it ended."""
        reason = finish_reason if finish_reason in FINISH_REASONS else "stop"
        self.requests.labels(model, endpoint, reason).inc()

    # -- the registry --------------------------------------------------------------------------

    def model_loaded(self, model: str, purpose: str, seconds: float) -> None:
        self.loads.labels(model, "ok").inc()
        self.load_seconds.labels(model).observe(seconds)
        # Every series a dashboard plots starts at zero, so the first request's tokens show as a
        # rate rather than as the series' first sample.
        endpoint = ENDPOINT_OF.get(purpose, purpose)
        self.prompt_tokens.labels(model, endpoint)
        self.requests.labels(model, endpoint, "stop")
        self.prompt_seconds.labels(model)
        if purpose == "chat":
            for counter in (self.generation_tokens, self.generation_seconds, self.prefix_queries):
                counter.labels(model)
            self.prefix_hits.labels(model)
            for where in ("graph", "host"):
                self.sampled_tokens.labels(model, where)

    def model_load_failed(self, model: str) -> None:
        self.loads.labels(model, "failed").inc()

    def model_unloaded(self, model: str, reason: str) -> None:
        self.unloads.labels(model, reason).inc()

    def set_loaded(
        self, loaded: Iterable[LoadedModel], loading: dict[str, int] | None = None, max_loaded: int = 0
    ) -> None:
        """The gauges, from the loaded models as they are now (and the requests waiting for a
        model to load)."""
        loaded = list(loaded)
        load = ServerLoad.of(loaded, loading or {})
        self.server_waiting.set(load.waiting)
        self.server_running.set(load.running)
        self.server_kv_usage.set(load.kv_cache_usage)
        self.server_models.clear()
        running = ",".join(sorted({*load.loaded, *load.loading}))
        self.server_models.labels(running, ",".join(load.loading), str(max_loaded)).set(time.time())
        for gauge in (
            self.waiting,
            self.running,
            self.kv_cells,
            self.kv_used,
            self.kv_usage,
            self.model_memory,
            self.checkpoint_bytes,
            self.sequences,
            self.acceptance,
        ):
            gauge.clear()
        count = 0
        for m in loaded:
            count += 1
            self.model_memory.labels(m.name, m.purpose).set(m.memory_bytes)
            stats = m.stats
            if stats is None:
                continue
            self.waiting.labels(m.name).set(stats.waiting)
            self.running.labels(m.name).set(stats.running)
            self.kv_cells.labels(m.name).set(stats.kv_cells)
            self.kv_used.labels(m.name).set(stats.kv_cells_used)
            self.kv_usage.labels(m.name).set(stats.kv_cells_used / stats.kv_cells if stats.kv_cells else 0)
            self.sequences.labels(m.name).set(stats.sequences)
            if stats.memory_kind in ("recurrent", "hybrid", "swa"):
                self.checkpoint_bytes.labels(m.name).set(stats.checkpoint_bytes)
            if stats.speculative:
                self.acceptance.labels(m.name).set(stats.accepted / stats.drafted if stats.drafted else 0)
        self.loaded_models.set(count)


@dataclass
class Outcome:
    """How a request ended, for `pendra_requests_total`."""

    reason: str = "abort"


@contextlib.contextmanager
def counted(metrics: InferenceMetrics, model: str, endpoint: str, keep: bool = False) -> Iterator[Outcome]:
    """Count the request once, with how the body ended: a server error, the client leaving
    (abort), or the reason the body set; a client error (a 4xx: a prompt too long, a bad
    parameter) is the client's answer, not a request the model ran, and is not counted. With
    `keep`, a body that ends normally counts nothing (the request goes on elsewhere, as a stream)."""
    outcome = Outcome("stop")
    try:
        yield outcome
    except (asyncio.CancelledError, ClientGone):
        metrics.request_done(model, endpoint, "abort")
        raise
    except APIError as exc:
        if exc.status >= 500:
            metrics.request_done(model, endpoint, "error")
        raise
    except BaseException:
        metrics.request_done(model, endpoint, "error")
        raise
    if not keep:
        metrics.request_done(model, endpoint, outcome.reason)
