"""The inference service's Prometheus metrics: tokens, requests, and what the schedulers know.

Counters and histograms are recorded when a request finishes, from the scheduler's own timings
(queue time, time to first token, time per output token, cached prompt tokens); the gauges
(requests waiting and running, KV-cache cells) are read from each loaded model's scheduler when
`/metrics` is scraped. Bucket boundaries follow vLLM's, the reference operators know.

Each app keeps its own `CollectorRegistry`, so two apps in one process (tests, `pendra serve`)
never share counters.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pendra_inference.scheduler import SchedulerStats
from pendra_inference.sequence import Result

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
QUEUE_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class InferenceMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.prompt_tokens = Counter(
            "pendra_prompt_tokens", "Prompt tokens processed.", ["model", "endpoint"], registry=r
        )
        self.completion_tokens = Counter(
            "pendra_completion_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "pendra_prefix_cache_hit_tokens",
            "Prompt tokens whose KV cells were shared from the prefix cache instead of decoded.",
            ["model"],
            registry=r,
        )
        self.requests = Counter(
            "pendra_inference_requests",
            "Completed generation and embedding requests.",
            ["model", "endpoint"],
            registry=r,
        )
        self.loaded_models = Gauge("pendra_loaded_models", "Models loaded in memory.", registry=r)
        self.waiting = Gauge("pendra_requests_waiting", "Requests queued for a model.", ["model"], registry=r)
        self.running = Gauge(
            "pendra_requests_running", "Requests a model is generating.", ["model"], registry=r
        )
        self.kv_cells = Gauge(
            "pendra_kv_cache_cells", "KV-cache cells of a model's context.", ["model"], registry=r
        )
        self.kv_used = Gauge(
            "pendra_kv_cache_cells_used",
            "KV-cache cells holding running and cached sequences.",
            ["model"],
            registry=r,
        )
        self.kv_usage = Gauge(
            "pendra_kv_cache_usage_ratio", "KV-cache cells in use, 0 to 1.", ["model"], registry=r
        )
        self.queue_time = Histogram(
            "pendra_queue_time_seconds",
            "Time from arrival to admission.",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "pendra_time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "pendra_time_per_output_token_seconds",
            "Mean time between generated tokens of a request, after the first.",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.request_prompt = Histogram(
            "pendra_request_prompt_tokens",
            "Prompt tokens per request.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generated = Histogram(
            "pendra_request_generation_tokens",
            "Generated tokens per request.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )

    def chat_done(self, model: str, result: Result) -> None:
        generated = sum(result.completion_tokens)
        self.prompt_tokens.labels(model, "chat").inc(result.prompt_tokens)
        self.completion_tokens.labels(model).inc(generated)
        self.cached_tokens.labels(model).inc(result.cached_tokens)
        self.requests.labels(model, "chat").inc()
        self.queue_time.labels(model).observe(result.queue_s)
        if result.first_token_s is not None:
            self.ttft.labels(model).observe(result.first_token_s)
        per_choice = max(result.completion_tokens, default=0)
        if per_choice > 1:
            self.tpot.labels(model).observe(result.decode_s / (per_choice - 1))
        self.request_prompt.labels(model).observe(result.prompt_tokens)
        self.request_generated.labels(model).observe(generated)

    def embeddings_done(self, model: str, tokens: int) -> None:
        self.prompt_tokens.labels(model, "embeddings").inc(tokens)
        self.requests.labels(model, "embeddings").inc()

    def render(self, loaded: Iterable[tuple[str, SchedulerStats | None]]) -> bytes:
        count = 0
        for gauge in (self.waiting, self.running, self.kv_cells, self.kv_used, self.kv_usage):
            gauge.clear()
        for name, stats in loaded:
            count += 1
            if stats is None:
                continue
            self.waiting.labels(name).set(stats.waiting)
            self.running.labels(name).set(stats.running)
            self.kv_cells.labels(name).set(stats.kv_cells)
            self.kv_used.labels(name).set(stats.kv_cells_used)
            self.kv_usage.labels(name).set(stats.kv_cells_used / stats.kv_cells if stats.kv_cells else 0)
        self.loaded_models.set(count)
        return generate_latest(self.registry)
