"""Pendra on a GPU: the same model with every layer offloaded and with none (the CPU), in one run.

The model is a GGUF of a real model's shape with random weights (tests/support/shapes.py), made
where the benchmark runs: weights cannot be copied to a lent GPU machine, shapes can. It prints
single-stream decode tokens/s, time to first token and embeddings/s for each, and the ratio.

    uv run --no-sync python bench/bench_gpu.py [--shape llama-3.2-1b] [--runs 3] [--tokens 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_inference import chat_figures, embed_rate  # noqa: E402
from tests.support.server import start_server  # noqa: E402
from tests.support.shapes import SHAPES, write_shaped_gguf  # noqa: E402


def figures(url: str, tokens: int, runs: int, batch: int) -> tuple[float, float, float]:
    """(decode tokens/s, time to first token, embeddings/s), measured as bench_inference does."""
    ttft, tps = chat_figures(url, "shape:chat", tokens, runs)
    return tps, ttft, embed_rate(url, "shape:embed", batch, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--embed-batch", type=int, default=64)
    args = parser.parse_args()

    from pendra_shared.store import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        model = write_shaped_gguf(Path(tmp) / f"{args.shape}.gguf", args.shape)
        store = ModelStore(Path(tmp) / "models")
        store.import_file(model, name="shape:chat")
        store.import_file(model, name="shape:embed", purpose="embedding")
        rows = {}
        for label, layers in (("gpu (all layers)", "-1"), ("cpu (0 layers)", "0")):
            env = {
                "PENDRA_MODELS_DIR": str(store.root),
                "PENDRA_N_CTX": "2048",
                "PENDRA_KEEP_ALIVE": "-1",
                "PENDRA_N_GPU_LAYERS": layers,
            }
            # The inference service alone, as the compose stack runs it on the GPU host.
            server = start_server(env, Path(tmp) / f"serve-{layers}.log", "inference", timeout_s=300)
            try:
                health = httpx.get(f"{server.base_url}/health").json()
                rows[label] = (*figures(server.base_url, args.tokens, args.runs, args.embed_batch), health)
            finally:
                server.stop()
    gpu, cpu = rows["gpu (all layers)"], rows["cpu (0 layers)"]
    device = ", ".join(d["description"] for d in gpu[3]["devices"])
    print(f"model: {args.shape} shape, F16, random weights; backend {gpu[3]['backend']} on {device}")
    print(f"CPU variant: {gpu[3]['cpu_variant']}; {args.runs} runs, medians; {args.tokens} tokens")
    print(f"{'metric':<28}{'gpu':>12}{'cpu':>12}{'ratio':>9}")
    for i, name in enumerate(
        ("decode tokens/s (1 stream)", "time to first token (ms)", "embeddings/s (batch)")
    ):
        scale = 1000 if i == 1 else 1
        print(f"{name:<28}{gpu[i] * scale:>12.1f}{cpu[i] * scale:>12.1f}{gpu[i] / cpu[i]:>9.2f}")
    print("ratio = gpu / cpu")


if __name__ == "__main__":
    main()
