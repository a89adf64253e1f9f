"""Where a decode step's milliseconds go: llama_decode against sampling, with sampling on the host
and in llama.cpp's graph, in-process (no HTTP), on the same GGUF.

For each sampling profile (greedy; temperature 0.8 seeded; the catalogue's recommended Qwen3.6
settings, seeded) and each stream count, one scheduler per mode runs the streams once to warm up,
then again measured, and prints per step: ms in llama_decode, ms choosing tokens and handing them
out (the scheduler's own counters), generated tokens/s, and the graph mode's total step time as a
ratio to the host mode's (below 1: the graph is faster).

    uv run --no-sync python bench/bench_sampling.py [--model PATH] [--streams 1,16] [--tokens 64]
        [--sequence-ids 256]

Without --model it uses the Gemma 3 270M test GGUF (262,144-entry vocabulary). --sequence-ids is
the context's sequence count (llama.cpp's 256 for attention models, as the server gives them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from pendra_inference.engine import EngineConfig, LlamaEngine
from pendra_inference.sampling import SamplingParams
from pendra_inference.scheduler import Scheduler, SchedulerConfig
from pendra_inference.sequence import Completion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_inference import gemma  # noqa: E402

PROFILES: dict[str, dict[str, float]] = {
    "greedy": {"temperature": 0.0},
    "temperature 0.8": {"temperature": 0.8},
    "recommended": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5},
}


def run(
    engine: LlamaEngine, graph: bool, streams: int, tokens: int, sampling: dict[str, float], ids: int
) -> dict[str, float]:
    config = SchedulerConfig(
        n_ctx=1024,
        parallel=max(streams, 1),
        n_batch=512,
        n_ubatch=512,
        prefill_budget=128,
        max_queue=256,
        queue_timeout_s=600,
        n_threads=os.cpu_count() or 1,
        backend_sampling=graph,
        gpu=True,  # every chain in the graph in graph mode, whatever the device
        n_seq_max=ids,
    )
    scheduler = Scheduler(engine.model, engine.vocab, config, "bench")

    async def one(i: int) -> None:
        prompt = engine.tokenize_prompt(f"Write a story about topic {i}")
        params = SamplingParams(**sampling, seed=i)  # type: ignore[arg-type]
        ticket = scheduler.submit(Completion(prompt, tokens, params))
        await ticket.admitted
        async for _ in ticket.deltas():
            pass

    async def all_streams() -> None:
        await asyncio.gather(*(one(i) for i in range(streams)))

    try:
        asyncio.run(all_streams())  # warm-up
        before = scheduler.stats()
        steps, decode, sample = before.steps, before.decode_seconds, before.sample_seconds
        started = time.perf_counter()
        asyncio.run(all_streams())
        wall = time.perf_counter() - started
        after = scheduler.stats()
        n = max(after.steps - steps, 1)
        return {
            "decode_ms": (after.decode_seconds - decode) / n * 1000,
            "sample_ms": (after.sample_seconds - sample) / n * 1000,
            "tok_s": streams * tokens / wall,
        }
    finally:
        scheduler.close()


def row(figures: dict[str, float]) -> str:
    return f"{figures['decode_ms']:>13.1f} / {figures['sample_ms']:>9.2f} {figures['tok_s']:>6.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sequence-ids", type=int, default=256)
    args = parser.parse_args()
    path = args.model or gemma()
    engine = LlamaEngine(path, EngineConfig(1024, 512, 512, os.cpu_count() or 1, 0, False))
    cores = os.cpu_count()
    print(f"{path.name}, {cores} threads, {args.sequence_ids} sequence ids, {args.tokens} tokens a stream")
    head = "decode / sample ms  tok/s"
    print(f"profile          streams |  host: {head} | graph: {head} | graph/host")
    try:
        for name, sampling in PROFILES.items():
            for streams in (int(s) for s in args.streams.split(",")):
                host = run(engine, False, streams, args.tokens, sampling, args.sequence_ids)
                graph = run(engine, True, streams, args.tokens, sampling, args.sequence_ids)
                ratio = (graph["decode_ms"] + graph["sample_ms"]) / (host["decode_ms"] + host["sample_ms"])
                print(f"{name:<16} {streams:>7} | {row(host)} | {row(graph)} | {ratio:.2f}", flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
