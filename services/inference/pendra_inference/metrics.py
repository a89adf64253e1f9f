"""The inference service's Prometheus metrics (the basics: token counts and what is loaded).

Each app keeps its own `CollectorRegistry`, so two apps in one process (tests, `pendra serve`)
never share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class InferenceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.prompt_tokens = Counter(
            "pendra_prompt_tokens", "Prompt tokens processed.", ["model", "endpoint"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "pendra_completion_tokens", "Tokens generated.", ["model"], registry=self.registry
        )
        self.requests = Counter(
            "pendra_inference_requests",
            "Completed generation and embedding requests.",
            ["model", "endpoint"],
            registry=self.registry,
        )
        self.loaded_models = Gauge("pendra_loaded_models", "Models loaded in memory.", registry=self.registry)

    def chat_done(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.labels(model, "chat").inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        self.requests.labels(model, "chat").inc()

    def embeddings_done(self, model: str, tokens: int) -> None:
        self.prompt_tokens.labels(model, "embeddings").inc(tokens)
        self.requests.labels(model, "embeddings").inc()

    def render(self, loaded_models: int) -> bytes:
        self.loaded_models.set(loaded_models)
        return generate_latest(self.registry)
