"""What the inference app keeps for its lifetime, on `app.state.pendra`."""

from __future__ import annotations

from dataclasses import dataclass

from pendra_inference.chat import ChatService
from pendra_inference.completions import CompletionService
from pendra_inference.embeddings import EmbeddingService
from pendra_inference.metrics import InferenceMetrics
from pendra_inference.registry import ModelRegistry
from pendra_inference.rerank import RerankService
from pendra_inference.responses import ResponseService
from pendra_inference.tokens import TokenService


@dataclass
class AppState:
    registry: ModelRegistry
    chat: ChatService
    embeddings: EmbeddingService
    metrics: InferenceMetrics
    tokens: TokenService
    completions: CompletionService
    rerank: RerankService
    responses: ResponseService
    ready: bool = False
