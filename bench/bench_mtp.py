"""Speculative decoding with a model's own MTP block: Pendra next to llama.cpp's own llama-server
(`--spec-type draft-mtp`) on the same GGUF, one stream, with and without the block drafting.

The model is a Qwen3.5-style hybrid (Gated DeltaNet and gated attention layers, one MTP block)
with random weights, written here by the project's writer with Qwen's real tokenizer, in two
weight sets:

* `agreeing`: the trunk's blocks add nothing and the MTP block passes the next token's embedding
  through (tests/support/hybrids.agreeing_mtp_weights), so the block predicts exactly what the
  model then picks: every draft is accepted, the most speculation can give;
* `random`: the block predicts nothing the model picks: every draft is rejected, what speculation
  costs when it does not pay.

Each server gets one warm-up request and then --runs requests of --tokens tokens (greedy,
`ignore_eos`, a short raw prompt on /v1/completions, not streamed); tokens/s is completion tokens
over the request's wall time, median over the runs. Both servers use every usable core and draft
up to --draft tokens a step. Ratio = Pendra / llama-server in the same configuration.

    uv run --no-sync python bench/bench_mtp.py [--llama-server PATH] [--tokens 128] [--runs 3]
        [--draft 3] [--embd 1024] [--layers 12] [--weights agreeing,random]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_inference import llama_server, peer_binary  # noqa: E402
from tests.support.hybrids import agreeing_mtp_weights, write_qwen35  # noqa: E402
from tests.support.server import set_options, start_server  # noqa: E402

PROMPT = "The history of the harbour town begins"


def complete(url: str, model: str, tokens: int) -> tuple[float, int]:
    """(wall seconds, completion tokens) of one greedy completion of exactly `tokens` tokens."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    answer.raise_for_status()
    return time.perf_counter() - start, int(answer.json()["usage"]["completion_tokens"])


def rate(url: str, model: str, tokens: int, runs: int) -> float:
    complete(url, model, 8)  # warm up: load the model, fill caches
    results = [complete(url, model, tokens) for _ in range(runs)]
    return statistics.median(n / wall for wall, n in results)


def pendra(directory: Path, model: Path, draft: int, tokens: int, runs: int) -> dict[str, float]:
    from pendra_shared.store import ModelStore

    store = ModelStore(directory / "models")
    for name, options in (
        ("bench:plain", {}),
        ("bench:mtp", {"speculative": {"kind": "mtp", "draft_tokens": draft}}),
    ):
        set_options(store.import_file(model, name=name, purpose="chat").path, options)
    env = {
        "PENDRA_MODELS_DIR": str(store.root),
        "PENDRA_N_CTX": "1024",
        "PENDRA_PARALLEL": "1",
        "PENDRA_KEEP_ALIVE": "-1",
        "PENDRA_MAX_LOADED_MODELS": "1",
        "HOME": str(directory),
    }
    server = start_server(env, directory / "serve.log")
    try:
        return {
            "off": rate(server.base_url, "bench:plain", tokens, runs),
            "mtp": rate(server.base_url, "bench:mtp", tokens, runs),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--llama-server", help="llama-server binary (default: ../shared's build script)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--draft", type=int, default=3, help="tokens drafted a step")
    parser.add_argument("--embd", type=int, default=1024, help="the model's width")
    parser.add_argument("--layers", type=int, default=12, help="the trunk's layers (every 4th attends)")
    parser.add_argument("--weights", default="agreeing,random", help="weight sets: agreeing, random")
    args = parser.parse_args()

    from pendra_inference.gguf_hybrid import QWEN35_TINY

    binary = peer_binary(args.llama_server)
    shape = dataclasses.replace(
        QWEN35_TINY,
        n_embd=args.embd,
        n_layer=args.layers,
        n_head=8,
        n_head_kv=2,
        head_dim=128,
        n_ff=args.embd * 11 // 4,
        linear_k_heads=8,
        linear_v_heads=16,
        linear_head_dim=64,
        nextn_layers=1,
    )
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for weights in args.weights.split(","):
            directory = Path(tmp) / weights
            directory.mkdir()
            fixed = agreeing_mtp_weights(shape) if weights == "agreeing" else None
            started = time.perf_counter()
            model = write_qwen35(directory / "model.gguf", shape=shape, fixed=fixed)
            size = model.stat().st_size / 1e6
            print(f"[{weights}] wrote {size:.0f} MB in {time.perf_counter() - started:.0f} s", flush=True)
            mine = pendra(directory, model, args.draft, args.tokens, args.runs)
            cores = str(len(os.sched_getaffinity(0)))
            threads = ["-t", cores, "-tb", cores]
            with llama_server(binary, model, 1024, False, threads) as url:
                peer_off = rate(url, "model", args.tokens, args.runs)
            spec = [*threads, "--spec-type", "draft-mtp", "--spec-draft-n-max", str(args.draft)]
            with llama_server(binary, model, 1024, False, spec) as url:
                peer_mtp = rate(url, "model", args.tokens, args.runs)
            rows[weights] = {
                "pendra off": mine["off"],
                "pendra mtp": mine["mtp"],
                "ls off": peer_off,
                "ls mtp": peer_mtp,
            }
            print(f"[{weights}] " + ", ".join(f"{k} {v:.1f}" for k, v in rows[weights].items()), flush=True)

    print(
        f"\nqwen35-style hybrid, n_embd {args.embd}, {args.layers} layers + 1 MTP block, Q8_0, random "
        f"weights; {args.tokens} tokens, greedy, one stream, up to {args.draft} drafts a step; "
        f"tokens/s (median of {args.runs})"
    )
    heads = ("pendra off", "pendra mtp", "mtp/off", "ls off", "ls mtp", "mtp/off", "ratio off", "ratio mtp")
    print(f"{'weights':<10}" + "".join(f"{h:>11}" for h in heads))
    for weights, r in rows.items():
        values = (
            r["pendra off"],
            r["pendra mtp"],
            r["pendra mtp"] / r["pendra off"],
            r["ls off"],
            r["ls mtp"],
            r["ls mtp"] / r["ls off"],
            r["pendra off"] / r["ls off"],
            r["pendra mtp"] / r["ls mtp"],
        )
        print(f"{weights:<10}" + "".join(f"{v:>11.2f}" for v in values))
    print(
        "ratio = pendra / llama-server, same configuration (off: no speculation; mtp: the MTP block drafts)"
    )


if __name__ == "__main__":
    main()
