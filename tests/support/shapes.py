"""GGUF files with the shape of real models and random weights.

Model weights cannot travel to a GPU machine lent for a check; a file of a real model's shape can
be made there in seconds (with the same writer as the start-up self-check's probe). It loads,
offloads and decodes exactly like the real model (the same tensor sizes, so the same memory
traffic and tokens/s); only the text it writes is noise.
"""

from __future__ import annotations

from pathlib import Path

from pendra_inference.gguf_writer import LlamaShape, write_llama_gguf

SHAPES = {
    # meta-llama/Llama-3.2-1B (config.json): 1.24 B parameters, tied embeddings.
    "llama-3.2-1b": LlamaShape(2048, 16, 32, 8, 8192, 128256, 500000.0, 131072),
    # meta-llama/Llama-3.1-8B: 8.0 B parameters.
    "llama-3.1-8b": LlamaShape(4096, 32, 32, 8, 14336, 128256, 500000.0, 131072),
}


def write_shaped_gguf(path: Path, shape_name: str, *, seed: int = 0) -> Path:
    """A llama GGUF of `shape_name`'s exact dimensions, F16 weights."""
    return write_llama_gguf(
        path,
        SHAPES[shape_name],
        name=f"random weights in the shape of {shape_name}",
        weights="f16",
        seed=seed,
    )
