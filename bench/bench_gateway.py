"""The API gateway's hop, measured: streamed chat completions sent to the inference service
directly and through the gateway (`python -m pendra_api`, which passes the bytes through), in the
same run, on the same loaded model.

Prints, for one stream and for --concurrency streams at once, the time to first token and the
decode tokens/s, direct and through the gateway, and the ratio gateway / direct.

    uv run --no-sync python bench/bench_gateway.py [--model PATH] [--tokens 96] [--runs 3] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_inference import gemma, stream_once  # noqa: E402
from tests.support.server import free_port  # noqa: E402


def start(module: str, env: dict[str, str], log: Path, ready: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{module} exited:\n{log.read_text()}")
        try:
            if httpx.get(ready, timeout=1).status_code < 500:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"{module} did not start:\n{log.read_text()}")


def round_of(url: str, streams: int, tokens: int) -> tuple[float, float]:
    """(median time to first token, total decode tokens/s over all streams) for `streams` at once."""
    with ThreadPoolExecutor(streams) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda _i: stream_once(url, "bench:chat", tokens), range(streams)))
        elapsed = time.perf_counter() - start
    return statistics.median(r[0] for r in results), sum(r[2] for r in results) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file (default: the Gemma 3 270M test model)")
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    model = Path(args.model) if args.model else gemma()

    from pendra_shared.store import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "models")
        store.import_file(model, name="bench:chat")
        inference_port, api_port = free_port(), free_port()
        direct, gateway = f"http://127.0.0.1:{inference_port}", f"http://127.0.0.1:{api_port}"
        common = {"PENDRA_MODELS_DIR": str(store.root), "HOME": tmp}
        inference = start(
            "pendra_inference",
            {**common, "PENDRA_PORT": str(inference_port), "PENDRA_KEEP_ALIVE": "-1", "PENDRA_N_CTX": "2048"},
            Path(tmp) / "inference.log",
            f"{direct}/ready",
        )
        api = start(
            "pendra_api",
            {
                **common,
                "PENDRA_PORT": str(api_port),
                "PENDRA_INFERENCE_URL": direct,
                "PENDRA_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # the proxy needs no queue
            },
            Path(tmp) / "api.log",
            f"{gateway}/health",
        )
        try:
            stream_once(direct, "bench:chat", 8)  # load the model
            stream_once(gateway, "bench:chat", 8)  # open the gateway's upstream connection
            figures: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for _ in range(args.runs):  # alternate, so drift hits both sides alike
                for streams in (1, args.concurrency):
                    for name, url in (("direct", direct), ("gateway", gateway)):
                        figures.setdefault((name, streams), []).append(round_of(url, streams, args.tokens))
        finally:
            for proc in (api, inference):
                proc.terminate()
                proc.wait(30)

    print(f"model: {model.name}  ({args.runs} runs, medians; {args.tokens} tokens per stream)")
    print(f"{'metric':<40}{'direct':>10}{'gateway':>10}{'ratio':>8}")
    for streams in (1, args.concurrency):
        d = figures[("direct", streams)]
        g = figures[("gateway", streams)]
        ttft_d, ttft_g = (statistics.median(r[0] for r in x) * 1000 for x in (d, g))
        tps_d, tps_g = (statistics.median(r[1] for r in x) for x in (d, g))
        rows = [
            (f"time to first token, ms ({streams} streams)", ttft_d, ttft_g),
            (f"tokens/s, all streams ({streams} streams)", tps_d, tps_g),
        ]
        for label, mine, theirs in rows:
            print(f"{label:<40}{mine:>10.1f}{theirs:>10.1f}{theirs / mine:>8.2f}")
    print("ratio = gateway / direct (1.00: the hop costs nothing)")


if __name__ == "__main__":
    main()
