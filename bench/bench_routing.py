"""The api's routing between several inference replicas against plain round-robin: three inference
processes, three models, a multi-turn trace whose conversations share a long system prompt per
model. Time to first token, throughput, model loads and where the models end up, per arm.

Setup: one model store with one GGUF imported three times under three names (the Gemma 3 270M test
GGUF as gemma-a, gemma-b, gemma-c; with --quick the tests' tiny random llama as tiny-a/b/c), and
per arm a fresh set of processes as compose runs them (tests/support/replicas.py): three inference
services (PENDRA_N_CTX --n-ctx (4096), PENDRA_PARALLEL --parallel (4), PENDRA_KEEP_ALIVE -1,
PENDRA_MAX_LOADED_MODELS --max-loaded (3), PENDRA_N_THREADS --threads (1)) and the api with
PENDRA_INFERENCE_URL listing the three. Every arm starts cold: no model loaded, no prefix cached.
Threads: three llama.cpp processes share this machine's cores; one thread each (the default) keeps
them from oversubscribing two cores, where llama.cpp's spinning threads slow everyone down.

Trace (the same in both arms): --conversations conversations (24), each bound to one model in the
--mix proportions (50,30,20: 12/7/5 of 24), in a fixed shuffled order. Each model has its own
system prompt of about --system-tokens tokens (1000; deterministic prose), shared by all its
conversations; each conversation has --turns turns (4) of one-sentence user messages. At most
--concurrency conversations run at once (6; the next one starts when one ends); within one, each
turn waits for the previous answer and resends the whole history with the answer appended as the
assistant message. Requests: streaming /v1/chat/completions, max_tokens --max-tokens (32),
temperature 0, `stream_options.include_usage`.

Arms:

* routed: every request to the api, which picks the replica (services/api/pendra_api/routing.py:
  the conversation's prefix, else a replica with the model loaded and room, else the least loaded).
* round-robin: request i (in the order they are sent, over all conversations) straight to replica
  i mod 3, as a Kubernetes Service spreading requests evenly would. It bypasses the api: one hop
  fewer than routed, so the comparison is conservative for the api.

A 503 with Retry-After (a replica that cannot load a model now: every loaded one busy) is sent
again to the same place after that wait (at most 5 s, 30 times), as an OpenAI client would; the
wait counts in the turn's time to first token, and the retries are counted.

Figures per arm: time to first token (from first sending a request to the first chunk with text,
client side) p50/p95 over all turns, over turns >= 2 (where a conversation's own prefix can be
cached), over first turns and per turn index; the servers' own mean TTFT (arrival to first token,
pendra_time_to_first_token_seconds); completion tokens/s (every usage's completion tokens / the
trace's wall time); prompt tokens served from the prefix cache (usage's cached_tokens), and on
first turns alone (what the shared system prompt saved); turns >= 2 whose previous prompt was found
in the cache (cached_tokens at least 90% of the previous turn's prompt tokens: the conversation
came back to where it was); model loads (pendra_model_loads_total{outcome="ok"} summed over the
replicas) in total and per model, and on how many replicas each model was loaded; which replicas
hold each model at the end (/status); requests each replica served (pendra_requests_total); for
routed, the api's pendra_api_routed_requests_total by reason; 503s retried and requests failed.
Also the CPU seconds other processes on the machine used during each arm (on a shared machine,
compare arms only when that is near 0).

Goals (the issue): p95 time to first token (all turns) of routed at most half of round-robin's;
no model loaded on more replicas than its traffic needs, where a model's need is
ceil(peak requests for it in flight at once / --parallel) replicas (peak measured by this client),
and loaded once per replica (a second load on the same replica is an eviction and a reload).

    uv run --no-sync python bench/bench_routing.py [--conversations 24] [--turns 4]
        [--concurrency 6] [--max-tokens 32] [--system-tokens 1000] [--mix 50,30,20]
        [--max-loaded 3] [--parallel 4] [--threads 1] [--n-ctx 4096]
        [--arms routed,round-robin] [--quick] [--workdir DIR] [--json PATH]

How to read it: the last column is routed / round-robin (below 1: routed is faster or loads
less). Temperature 0 on a CPU gives the same answers whatever shares a batch, so both arms should
send the same prompts: "answers identical" under the table says how far that held. --workdir keeps
the store and every process's log (inference-0..2.log, api.log per arm) for a look afterwards.
--max-loaded 1 shows thrash: round-robin makes every replica load every model in turn. With
--turns 4 a quarter of the requests are first turns, which no routing serves from a conversation's
own cache (only, at best, from the system prompt another conversation left), so p95 over all turns
is a first turn's in both arms; the turns >= 2 rows are where keeping a conversation in place shows.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import math
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._load_clients import parse_metrics, prose  # noqa: E402
from bench.bench_concurrency import CORES, QUESTIONS, pct, plain, take_usage  # noqa: E402
from bench.bench_multiturn import TICKS, cpu_seconds, machine_busy  # noqa: E402
from tests.support.engines import RedisServer  # noqa: E402
from tests.support.replicas import Replicas  # noqa: E402

ARMS = ("routed", "round-robin")
REPLICAS = 3
PLACES = ("the Harbour Town Public Library", "the Riverside Bicycle Repair Shop", "the Old Mill Museum")
# `prose` words per token: Gemma 3's tokenizer (900 words: about 1010 tokens); the tiny llama's
# byte-level vocabulary (a token a byte: about ten a word).
WORDS_PER_TOKEN = {"gemma": 0.89, "tiny": 0.1}
KEPT = 0.9  # a turn kept its conversation's cache: cached >= KEPT x the previous turn's prompt
RETRIES = 30  # 503s with Retry-After sent again, at most, per request
RETRY_CAP_S = 5.0
QUICK = {"conversations": 6, "turns": 3, "system_tokens": 1000, "max_tokens": 16, "concurrency": 4}
FULL = {"conversations": 24, "turns": 4, "system_tokens": 1000, "max_tokens": 32, "concurrency": 6}


# --------------------------------------------------------------------------------------- trace


@dataclass(frozen=True)
class Conversation:
    index: int
    model: str
    system: str
    questions: tuple[str, ...]


def split(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainders), each part at least 1 when it can."""
    scale = total / sum(weights)
    parts = [int(w * scale) for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: weights[i] * scale - parts[i], reverse=True)
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    for i, part in enumerate(parts):  # a model with no conversation at all would not be measured
        if part == 0 and max(parts) > 1:
            parts[parts.index(max(parts))] -= 1
            parts[i] = 1
    return parts


def system_prompt(i: int, tokens: int, words_per_token: float) -> str:
    rng = random.Random(20250611 + i)
    return (
        f"You are the assistant of {PLACES[i % len(PLACES)]}. Answer briefly, using only the notes "
        f"below.\n\n{prose(rng, max(1, round(tokens * words_per_token)))}"
    )


def build_trace(models: list[str], args: argparse.Namespace) -> list[Conversation]:
    counts = split(args.conversations, args.mix)
    order = [m for m, n in zip(models, counts, strict=True) for _ in range(n)]
    random.Random(7).shuffle(order)
    per_token = WORDS_PER_TOKEN["tiny" if args.quick else "gemma"]
    systems = {m: system_prompt(i, args.system_tokens, per_token) for i, m in enumerate(models)}
    trace = []
    for c, model in enumerate(order):
        questions = tuple(
            f"I am visitor {c + 1}. {QUESTIONS[(5 * c + 3 * t) % len(QUESTIONS)]}" for t in range(args.turns)
        )
        trace.append(Conversation(c, model, systems[model], questions))
    return trace


# --------------------------------------------------------------------------------------- client


@dataclass
class Turn:
    """One request as the client saw it; times in seconds."""

    conversation: int
    turn: int
    model: str
    url: str
    ttft: float = math.nan
    latency: float = math.nan
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    completion_tokens: int = 0
    text: str = ""
    retries: int = 0  # 503s with Retry-After before it was served
    error: str | None = None


async def ask(http: httpx.AsyncClient, turn: Turn, messages: list[dict[str, str]], max_tokens: int) -> None:
    """One streaming chat completion: its first text timed from the first send, its usage read.
    A 503 with Retry-After (a replica that cannot load the model now) is sent again after that
    wait, as an OpenAI client does; the waiting counts in the turn's time to first token."""
    body = {
        "model": turn.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    while True:
        async with http.stream("POST", f"{turn.url}/v1/chat/completions", json=body) as response:
            if response.status_code == 503 and "retry-after" in response.headers and turn.retries < RETRIES:
                await response.aread()
                turn.retries += 1
                wait = float(response.headers["retry-after"] or 1)
            elif response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"{turn.url}: HTTP {response.status_code}: {text[:300]}")
            else:
                turn.text = await read_stream(response, turn, start)
                break
        await asyncio.sleep(min(RETRY_CAP_S, wait))
    turn.latency = time.perf_counter() - start


async def read_stream(response: httpx.Response, turn: Turn, start: float) -> str:
    parts: list[str] = []
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(f"{turn.url}: error in stream: {chunk['error']}")
        take_usage(turn, chunk.get("usage"))
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") or ""
            if text and math.isnan(turn.ttft):
                turn.ttft = time.perf_counter() - start
            parts.append(text)
    return "".join(parts)


@dataclass
class Drive:
    turns: list[Turn]
    wall: float
    peak: dict[str, int]  # per model: requests in flight at once, at most


async def drive(trace: list[Conversation], arm: str, replicas: Replicas, args: argparse.Namespace) -> Drive:
    """The trace against one arm: --concurrency conversations at a time, each turn after the last."""
    assert replicas.api is not None
    api = replicas.api.url
    direct = [p.url for p in replicas.inference]
    numbers = itertools.count()  # round-robin: the i-th request sent goes to replica i mod n
    gate = asyncio.Semaphore(args.concurrency)
    in_flight: collections.Counter[str] = collections.Counter()
    peak: collections.Counter[str] = collections.Counter()
    turns: list[Turn] = []
    limits = httpx.Limits(
        max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8
    )

    async def converse(http: httpx.AsyncClient, conversation: Conversation) -> None:
        async with gate:
            messages = [{"role": "system", "content": conversation.system}]
            for t, question in enumerate(conversation.questions):
                messages.append({"role": "user", "content": question})
                url = api if arm == "routed" else direct[next(numbers) % len(direct)]
                turn = Turn(conversation.index, t, conversation.model, url)
                turns.append(turn)
                in_flight[turn.model] += 1
                peak[turn.model] = max(peak[turn.model], in_flight[turn.model])
                try:
                    await ask(http, turn, messages, args.max_tokens)
                except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                    turn.error = f"{type(exc).__name__}: {exc}"
                    return  # the conversation cannot go on without its answer
                finally:
                    in_flight[turn.model] -= 1
                messages.append({"role": "assistant", "content": turn.text})

    timeout = httpx.Timeout(900, connect=60)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(converse(http, c) for c in trace))
        wall = time.perf_counter() - start
    return Drive(turns, wall, dict(peak))


# --------------------------------------------------------------------------------------- figures


@dataclass
class Arm:
    name: str
    drive: Drive
    loads: list[dict[str, int]]  # per replica, per model: pendra_model_loads_total{outcome="ok"}
    served: list[dict[str, int]]  # per replica, per model: pendra_requests_total
    held: list[list[str]]  # per replica: the models /status lists as loaded at the end
    server_ttft: tuple[float, float]  # pendra_time_to_first_token_seconds sum and count, all replicas
    reasons: dict[str, int] = field(default_factory=dict)  # the api's routed requests by reason
    others_cpu: float = math.nan  # CPU seconds of every process outside this bench during the trace
    checkpoints: dict[str, int] = field(default_factory=dict)  # pendra_checkpoints_total by event

    @property
    def turns(self) -> list[Turn]:
        return self.drive.turns

    def ttfts(self, which: str = "all") -> list[float]:
        chosen = [
            t
            for t in self.turns
            if which == "all" or (which == "first" and t.turn == 0) or (which == "later" and t.turn > 0)
        ]
        return [t.ttft for t in chosen if not math.isnan(t.ttft)]

    def ttft_at(self, turn: int) -> list[float]:
        return [t.ttft for t in self.turns if t.turn == turn and not math.isnan(t.ttft)]

    @property
    def tokens(self) -> int:
        return sum(t.completion_tokens for t in self.turns)

    @property
    def rate(self) -> float:
        return self.tokens / self.drive.wall if self.drive.wall else math.nan

    @property
    def errors(self) -> list[str]:
        return [t.error for t in self.turns if t.error]

    def cached_share(self) -> float:
        prompt = sum(t.prompt_tokens for t in self.turns)
        cached = sum(t.cached_tokens or 0 for t in self.turns)
        return cached / prompt if prompt else math.nan

    def kept(self) -> tuple[int, int]:
        """(turns >= 2 that found their previous prompt cached, turns >= 2)."""
        by_key = {(t.conversation, t.turn): t for t in self.turns}
        kept = total = 0
        for t in self.turns:
            before = by_key.get((t.conversation, t.turn - 1))
            if t.turn == 0 or before is None or t.error:
                continue
            total += 1
            kept += (t.cached_tokens or 0) >= KEPT * before.prompt_tokens
        return kept, total

    def model_loads(self, model: str) -> int:
        return sum(per.get(model, 0) for per in self.loads)

    def loaded_on(self, model: str) -> int:
        """Replicas that loaded the model at least once during the arm."""
        return sum(per.get(model, 0) > 0 for per in self.loads)

    def holding(self, model: str) -> int:
        return sum(model in held for held in self.held)


def metric_rows(url: str) -> list[tuple[str, dict[str, str], float]]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)


def collect(name: str, drive: Drive, replicas: Replicas) -> Arm:
    loads, served, held = [], [], []
    ttft_sum = ttft_count = 0.0
    checkpoints: collections.Counter[str] = collections.Counter()
    for process in replicas.inference:
        per_loads: dict[str, int] = collections.Counter()
        per_served: dict[str, int] = collections.Counter()
        for metric, labels, value in metric_rows(process.url):
            model = labels.get("model_name", "")
            if metric == "pendra_model_loads_total" and labels.get("outcome") == "ok":
                per_loads[model] += int(value)
            elif metric == "pendra_requests_total":
                per_served[model] += int(value)
            elif metric == "pendra_time_to_first_token_seconds_sum":
                ttft_sum += value
            elif metric == "pendra_time_to_first_token_seconds_count":
                ttft_count += value
            elif metric == "pendra_checkpoints_total":
                checkpoints[labels.get("event", "?")] += int(value)
        loads.append(dict(per_loads))
        served.append(dict(per_served))
        status = httpx.get(f"{process.url}/status", timeout=30).json()
        held.append(sorted(m["name"] for m in status.get("loaded", [])))
    reasons: dict[str, int] = {}
    if name == "routed" and replicas.api is not None:
        for metric, labels, value in metric_rows(replicas.api.url):
            if metric == "pendra_api_routed_requests_total" and value:
                reasons[labels.get("reason", "?")] = int(value)
    return Arm(
        name, drive, loads, served, held, (ttft_sum, ttft_count), reasons, checkpoints=dict(checkpoints)
    )


def need(arm: Arm, model: str, parallel: int) -> int:
    """Replicas the model's traffic needs: its peak requests in flight over what one runs at once."""
    return max(1, math.ceil(arm.drive.peak.get(model, 0) / max(1, parallel)))


def quotient(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


# --------------------------------------------------------------------------------------- report


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.0f}"


def pair(values: list[float]) -> str:
    return f"{ms(pct(values, 0.5))} / {ms(pct(values, 0.95))}"


def fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def goals(arm: Arm, models: list[str], parallel: int) -> dict[str, Any]:
    per_model = {}
    for model in models:
        on, loads, needed = arm.loaded_on(model), arm.model_loads(model), need(arm, model, parallel)
        per_model[model] = {
            "loads": loads,
            "replicas_loaded_on": on,
            "replicas_needed": needed,
            "peak_in_flight": arm.drive.peak.get(model, 0),
            "met": on <= needed and loads <= on,
        }
    return per_model


def report(
    arms: dict[str, Arm], models: list[str], args: argparse.Namespace, trace: list[Conversation]
) -> dict[str, Any]:
    names = [a for a in ARMS if a in arms]
    both = len(names) == 2
    counts = collections.Counter(c.model for c in trace)
    labels = {"routed": "routed (via api)", "round-robin": "round-robin (direct)"}
    print(
        f"\n== {len(trace)} conversations x {args.turns} turns "
        f"({', '.join(f'{m} {counts[m]}' for m in models)}), {args.concurrency} at once; system prompt "
        f"~{args.system_tokens} tokens per model; max_tokens {args.max_tokens}, temperature 0, streaming =="
    )
    print(
        f"{REPLICAS} inference processes: PENDRA_PARALLEL {args.parallel}, PENDRA_MAX_LOADED_MODELS "
        f"{args.max_loaded}, PENDRA_N_THREADS {args.threads}, PENDRA_N_CTX {args.n_ctx}, keep-alive -1, "
        f"no load probe (as for catalogue installs); {CORES} cores on this machine"
    )
    print("round-robin sends request i straight to replica i mod 3 (no api hop: conservative for the api)\n")

    head = (
        "| figure | " + " | ".join(labels[n] for n in names) + (" | routed / round-robin |" if both else " |")
    )
    print(head)
    print("|" + "---|" * (len(names) + 1 + both))

    def row(label: str, cells: list[str], ratio: float | None = None) -> None:
        tail = f" {fmt_ratio(ratio) if ratio is not None else ''} |" if both else ""
        print(f"| {label} | " + " | ".join(cells) + " |" + tail)

    def ratio_of(fn: Any) -> float | None:
        return quotient(fn(arms["routed"]), fn(arms["round-robin"])) if both else None

    for which, label in (("all", "all turns"), ("later", "turns >= 2"), ("first", "turn 1")):
        row(
            f"TTFT p50 / p95 ms, {label}",
            [pair(arms[n].ttfts(which)) for n in names],
            ratio_of(lambda a, w=which: pct(a.ttfts(w), 0.95)),
        )
    for t in range(1, args.turns):
        row(f"TTFT p50 / p95 ms, turn {t + 1}", [pair(arms[n].ttft_at(t)) for n in names])
    for m in models:
        row(
            f"TTFT p50 / p95 ms, {m} ({counts[m]} conversations)",
            [pair([t.ttft for t in arms[n].turns if t.model == m and not math.isnan(t.ttft)]) for n in names],
        )
    row(
        "server TTFT mean ms (arrival to first token)",
        [ms(quotient(*arms[n].server_ttft)) for n in names],
        ratio_of(lambda a: quotient(*a.server_ttft)),
    )
    row("completion tokens/s", [f"{arms[n].rate:.1f}" for n in names], ratio_of(lambda a: a.rate))
    row("wall s / completion tokens", [f"{arms[n].drive.wall:.1f} / {arms[n].tokens}" for n in names])
    row("prompt tokens from the prefix cache", [f"{arms[n].cached_share():.0%}" for n in names])
    first_cached = [[t.cached_tokens or 0 for t in arms[n].turns if t.turn == 0] or [0] for n in names]
    row(
        "turn 1: prompt tokens cached, mean (the system prompt)",
        [f"{statistics.fmean(c):.0f}" for c in first_cached],
    )
    row(
        "turns >= 2 that found their conversation cached",
        [f"{a} of {b}" for a, b in (arms[n].kept() for n in names)],
    )
    row(
        "model loads, total",
        [str(sum(arms[n].model_loads(m) for m in models)) for n in names],
        ratio_of(lambda a: float(sum(a.model_loads(m) for m in models))),
    )
    for m in models:
        row(
            f"{m}: loads / replicas loaded on / holding at end",
            [f"{arms[n].model_loads(m)} / {arms[n].loaded_on(m)} / {arms[n].holding(m)}" for n in names],
        )
    for i in range(REPLICAS):
        row(
            f"inference-{i}: requests served by model; loaded at end",
            [
                ", ".join(f"{m} {arms[n].served[i].get(m, 0)}" for m in models if arms[n].served[i].get(m))
                + f"; [{', '.join(arms[n].held[i])}]"
                for n in names
            ],
        )
    row(
        "checkpoints saved / restored / evicted (all replicas)",
        [
            "{saved} / {restored} / {evicted}".format_map(collections.defaultdict(int, arms[n].checkpoints))
            for n in names
        ],
    )
    row(
        "api routed requests by reason",
        [", ".join(f"{k} {v}" for k, v in sorted(arms[n].reasons.items())) or "n/a" for n in names],
    )
    row(
        "503 + Retry-After answers retried / requests failed",
        [f"{sum(t.retries for t in arms[n].turns)} / {len(arms[n].errors)}" for n in names],
    )
    row(
        "CPU s of other processes (share of the machine)",
        [
            f"{arms[n].others_cpu:.1f} ({quotient(arms[n].others_cpu, CORES * arms[n].drive.wall):.0%})"
            for n in names
        ],
    )

    figures: dict[str, Any] = {"arms": {}, "goals": {}}
    print()
    for n in names:
        arm = arms[n]
        per_model = goals(arm, models, args.parallel)
        figures["goals"][n] = {"models": per_model}
        shown = "; ".join(
            f"{m} on {g['replicas_loaded_on']} replica(s), {g['loads']} load(s), needs "
            f"{g['replicas_needed']} (peak {g['peak_in_flight']} in flight)"
            for m, g in per_model.items()
        )
        verdict = "met" if all(g["met"] for g in per_model.values()) else "not met"
        print(f"{n}: no model loaded on more replicas than its traffic needs: {verdict} ({shown})")
        figures["goals"][n]["no_excess_loads"] = verdict == "met"
    if both:
        p95 = quotient(pct(arms["routed"].ttfts(), 0.95), pct(arms["round-robin"].ttfts(), 0.95))
        verdict = "met" if p95 <= 0.5 else "not met"
        print(
            f"p95 TTFT (all turns) <= 0.5 x round-robin: {verdict} (routed / round-robin = {fmt_ratio(p95)})"
        )
        figures["goals"]["p95_ttft_ratio"] = p95
        figures["goals"]["p95_ttft_half"] = verdict == "met"
        same = sum(
            a.text == b.text
            for a in arms["routed"].turns
            for b in arms["round-robin"].turns
            if (a.conversation, a.turn) == (b.conversation, b.turn)
        )
        print(f"answers identical in both arms: {same} of {len(arms['routed'].turns)}")
        figures["identical_answers"] = same
    for n in names:
        for error in arms[n].errors[:3]:
            print(f"{n} error: {error}")
        arm = arms[n]
        figures["arms"][n] = {
            "ttft_s": {
                which: {"p50": pct(arm.ttfts(which), 0.5), "p95": pct(arm.ttfts(which), 0.95)}
                for which in ("all", "later", "first")
            },
            "ttft_s_per_turn": [
                {"p50": pct(arm.ttft_at(t), 0.5), "p95": pct(arm.ttft_at(t), 0.95)} for t in range(args.turns)
            ],
            "server_ttft_mean_s": quotient(*arm.server_ttft),
            "completion_tokens_per_s": arm.rate,
            "completion_tokens": arm.tokens,
            "wall_s": arm.drive.wall,
            "cached_prompt_share": arm.cached_share(),
            "first_turn_cached_mean": statistics.fmean(
                [t.cached_tokens or 0 for t in arm.turns if t.turn == 0] or [0]
            ),
            "later_turns_cached": list(arm.kept()),
            "loads": {m: arm.model_loads(m) for m in models},
            "loads_per_replica": arm.loads,
            "served_per_replica": arm.served,
            "held_at_end": arm.held,
            "routed_reasons": arm.reasons,
            "peak_in_flight": arm.drive.peak,
            "retries": sum(t.retries for t in arm.turns),
            "errors": arm.errors,
            "others_cpu_s": arm.others_cpu,
            "mean_prompt_tokens": statistics.fmean(t.prompt_tokens for t in arm.turns) if arm.turns else None,
            "requests": [
                {
                    "conversation": t.conversation,
                    "turn": t.turn,
                    "model": t.model,
                    "url": t.url,
                    "ttft_s": t.ttft,
                    "latency_s": t.latency,
                    "prompt_tokens": t.prompt_tokens,
                    "cached_tokens": t.cached_tokens,
                    "completion_tokens": t.completion_tokens,
                    "retries": t.retries,
                }
                for t in arm.turns
            ],
        }
    first = [t.prompt_tokens for n in names for t in arms[n].turns if t.turn == 0 and t.prompt_tokens]
    if first:
        print(
            f"prompt tokens of a first turn (system prompt + question): "
            f"{statistics.fmean(first):.0f} on average"
        )
    print("ratio = routed / round-robin (below 1: routed is faster, or loads less)")
    return figures


# --------------------------------------------------------------------------------------- main


def reaped_cpu(pid: int) -> float:
    """CPU seconds of `pid`'s children that ended and were waited for (a load probe's process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / TICKS


def our_cpu(replicas: Replicas) -> float:
    """CPU seconds of this bench: its processes (the api, the inference services, their children
    alive or ended) and itself."""
    pids = [p.proc.pid for p in [*replicas.inference, *([replicas.api] if replicas.api else [])] if p.proc]
    return sum(cpu_seconds(pid) + reaped_cpu(pid) for pid in pids) + time.process_time()


def run_arm(
    name: str,
    trace: list[Conversation],
    store: Path,
    redis: RedisServer,
    workdir: Path,
    args: argparse.Namespace,
) -> Arm:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        "PENDRA_N_CTX": str(args.n_ctx),
        "PENDRA_PARALLEL": str(args.parallel),
        "PENDRA_KEEP_ALIVE": "-1",
        "PENDRA_MAX_LOADED_MODELS": str(args.max_loaded),
        "PENDRA_N_THREADS": str(args.threads),
        # The three files stand in for catalogue installs, whose pinned sha256 spares them the
        # child-process load probe an imported file gets before its first load.
        "PENDRA_UNTRUSTED_PROBE": "false",
        "PENDRA_CONFIG": str(workdir / "no-config.toml"),  # no config file: defaults and these
    }
    redis.flush()
    replicas = Replicas(workdir, store, redis, n=REPLICAS, inference_env=env)
    try:
        started = time.perf_counter()
        replicas.start()
        print(
            f"  [{name}] {REPLICAS} inference processes and the api up in "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        before = (our_cpu(replicas), machine_busy())
        drive_result = asyncio.run(drive(trace, name, replicas, args))
        after = (our_cpu(replicas), machine_busy())
        arm = collect(name, drive_result, replicas)
        arm.others_cpu = max(0.0, (after[1] - before[1]) - (after[0] - before[0]))
        print(
            f"  [{name}] wall {arm.drive.wall:.1f} s, TTFT p50/p95 {pair(arm.ttfts())} ms, "
            f"{arm.rate:.1f} tok/s, loads {sum(sum(per.values()) for per in arm.loads)}, "
            f"errors {len(arm.errors)}",
            flush=True,
        )
        if arm.errors:
            print(replicas.logs(), file=sys.stderr)
        return arm
    except Exception:
        print(replicas.logs(), file=sys.stderr)
        raise
    finally:
        replicas.stop()


def model_files(tmp: Path, quick: bool) -> tuple[Path, list[str]]:
    """The GGUF imported three times, and the three names."""
    if quick:
        from pendra_inference.gguf_writer import write_llama_gguf

        from tests.inference.conftest import TINY_SHAPE

        return write_llama_gguf(tmp / "tiny.gguf", TINY_SHAPE, name="tiny"), ["tiny-a", "tiny-b", "tiny-c"]
    from bench.bench_inference import gemma

    return gemma(), ["gemma-a", "gemma-b", "gemma-c"]


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    parser.add_argument(
        "--conversations", type=int, help=f"conversations in the trace ({FULL['conversations']})"
    )
    parser.add_argument("--turns", type=int, help=f"turns per conversation ({FULL['turns']})")
    parser.add_argument("--concurrency", type=int, help=f"conversations at once ({FULL['concurrency']})")
    parser.add_argument("--max-tokens", type=int, help=f"max_tokens per answer ({FULL['max_tokens']})")
    parser.add_argument(
        "--system-tokens", type=int, help=f"system prompt per model, about ({FULL['system_tokens']})"
    )
    parser.add_argument("--mix", default="50,30,20", help="share of the conversations per model (50,30,20)")
    parser.add_argument("--max-loaded", type=int, default=3, help="PENDRA_MAX_LOADED_MODELS per replica (3)")
    parser.add_argument("--parallel", type=int, default=4, help="PENDRA_PARALLEL per replica (4)")
    parser.add_argument("--threads", type=int, default=1, help="PENDRA_N_THREADS per replica (1)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="PENDRA_N_CTX (4096)")
    parser.add_argument("--arms", default=",".join(ARMS), help="which of routed,round-robin")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny random llama models and a smaller trace "
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    parser.add_argument("--workdir", help="keep the store and the logs here (default: a temporary directory)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.mix = [float(part) for part in args.mix.split(",")]
    if len(args.mix) != REPLICAS or min(args.mix) < 0 or not sum(args.mix):
        parser.error("--mix takes three non-negative shares")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - set(ARMS):
        parser.error(f"--arms takes {', '.join(ARMS)}")

    from pendra_shared.store import ModelStore

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)  # stopped from outside: every process stopped too
    started = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pendra-routing-"))
    workdir.mkdir(parents=True, exist_ok=True)
    redis: RedisServer | None = None
    results: dict[str, Arm] = {}
    try:
        source, models = model_files(workdir, args.quick)
        store = ModelStore(workdir / "models")
        present = {m.name for m in store.scan().valid}  # a kept --workdir has them already
        for model in models:
            if model not in present:
                store.import_file(source, name=model, purpose="chat")
        trace = build_trace(models, args)
        print(
            f"models {', '.join(models)} (each {source.name}, {source.stat().st_size / 1e6:.0f} MB); "
            f"{REPLICAS} replicas x {args.threads} thread(s) on {CORES} cores; logs under {workdir}",
            flush=True,
        )
        redis = RedisServer(workdir / "redis").start()
        for name in arms:
            results[name] = run_arm(name, trace, store.root, redis, workdir / name, args)
        figures = report(results, models, args, trace)
        if args.json:
            settings = {k: v for k, v in vars(args).items() if k != "json"}
            document = {"settings": settings, "models": models, "cores": CORES, **figures}
            Path(args.json).write_text(json.dumps(plain(document), indent=2) + "\n")
            print(f"figures written to {args.json}")
    finally:
        if redis is not None:
            redis.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
