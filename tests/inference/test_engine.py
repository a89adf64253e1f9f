"""The llama.cpp engine in-process: batching of embedding inputs into few decode calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pendra_inference.engine import POOLING, EngineConfig, LlamaEngine


def test_many_inputs_share_decode_calls(gemma_path: Path) -> None:
    engine = LlamaEngine(
        gemma_path,
        EngineConfig(
            n_ctx=1024,
            n_batch=1024,
            n_ubatch=1024,
            n_threads=None,
            n_gpu_layers=0,
            embedding=True,
            pooling=POOLING["mean"],
        ),
    )
    try:
        inputs = [engine.tokenize(f"sentence number {i} about cats") for i in range(100)]
        vectors = engine.embed(inputs)
        # 100 short sequences (about 800 tokens, within one 1024-token batch): as many decodes as
        # the sequence limit asks for, not a hundred.
        assert sum(len(t) for t in inputs) <= 1024
        assert engine.decode_calls == -(-100 // int(engine.llm.context_params.n_seq_max))
        assert engine.decode_calls <= 2
        assert len(vectors) == 100 and len(vectors[0]) == 640
        # Batching does not change the result: the same input alone gives the same vector (up to
        # the last bits flash attention's different summing order leaves).
        alone = engine.embed([inputs[37]])
        assert float(np.dot(alone[0], vectors[37])) > 0.999
    finally:
        engine.close()
