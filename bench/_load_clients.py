"""What bench_load.py's scenarios share: prompts, one request as the client saw it (classified),
/metrics scraping, /proc sampling of the server process, and percentiles.

Every request ends as exactly one outcome:

    ok           the answer is whole: a stream ended with [DONE], a finish_reason and consistent usage
    overloaded   503 with Retry-After (the server's admission control: PENDRA_MAX_QUEUE, queue timeout)
    reset        the connection failed: refused, reset, closed mid-response, malformed HTTP
    status       any other HTTP status (500, 503 without Retry-After, 4xx)
    invalid      a 200 whose body is wrong: an error event in the stream, no [DONE], no finish_reason,
                 usage that does not add up, an embedding of the wrong shape
    hung         no byte for --hang-s, or not finished by the end of the run plus its grace time

Streams are read with httpx and parsed by hand (one `data:` line per event), so a reset or a cut
stream is an exception of its own class here rather than something a client library papers over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

OK, OVERLOADED, RESET, STATUS, INVALID, HUNG = "ok", "overloaded", "reset", "status", "invalid", "hung"
OUTCOMES = {
    OK: "completed",
    OVERLOADED: "503 + Retry-After",
    RESET: "reset / protocol error",
    STATUS: "500 / other status",
    INVALID: "bad stream / error event",
    HUNG: "hung",
}
FAILURES = (RESET, STATUS, INVALID, HUNG)

WORDS = (
    "harbour lantern river engine garden violin market bridge comet teacher storm mountain letter "
    "window forest candle island meadow clock anchor painter village library orchard tower valley "
    "signal winter summer journey harvest whisper thunder silver shadow morning evening"
).split()
TOPICS = (
    "a lighthouse keeper|a lost robot|a baker in Paris|a time-travelling cat|a pirate afraid of water|"
    "a detective in Tokyo|an old clockmaker|a friendly ghost|a library that moves|a talking river"
).split("|")


# --------------------------------------------------------------------------------------- prompts


def prose(rng: random.Random, words: int) -> str:
    """Deterministic filler sentences of about `words` words (roughly as many tokens)."""
    sentences: list[str] = []
    count = 0
    while count < words:
        picked = [rng.choice(WORDS) for _ in range(rng.randint(6, 12))]
        sentences.append(" ".join(picked).capitalize() + ".")
        count += len(picked)
    return " ".join(sentences)


def mixed_prompt(rng: random.Random) -> tuple[str, str]:
    """(length class, text): half short, a third medium (~60 words), the rest long (~300 words)."""
    draw = rng.random()
    topic = rng.choice(TOPICS)
    if draw < 0.5:
        return "short", f"Write a story about {topic}."
    if draw < 0.85:
        return "medium", f"{prose(rng, 60)}\n\nNow write a story about {topic}."
    return "long", f"Summarise the following notes.\n\n{prose(rng, 300)}"


def chat_body(model: str, text: str, max_tokens: int, seed: int, stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


# --------------------------------------------------------------------------------------- requests


@dataclass
class Record:
    """One request as the client saw it; times in seconds on the perf_counter clock."""

    kind: str  # chat-short, chat-medium, chat-long, chat, embed
    started: float
    outcome: str = OK
    ended: float = math.nan
    ttft: float = math.nan  # to the first content (or to the finish when there is none)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    detail: str = ""

    @property
    def latency(self) -> float:
        return self.ended - self.started

    def fail(self, outcome: str, detail: str) -> Record:
        self.outcome, self.detail = outcome, detail[:300]
        return self

    def row(self, origin: float) -> dict[str, Any]:
        """For the JSON file: times relative to the run's start, rounded."""
        out = asdict(self)
        for key in ("started", "ended"):
            out[key] = round(out[key] - origin, 4)
        out["ttft"] = None if math.isnan(self.ttft) else round(self.ttft, 4)
        return out


def client(hang_s: float, connections: int = 1, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """An httpx client whose every timeout (connect, each read, write, pool) is `hang_s`; with
    connections=1, one persistent connection."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=httpx.Timeout(hang_s), limits=limits, headers=headers)


def _refused(record: Record, response: httpx.Response) -> Record:
    text = response.text[:200]
    if response.status_code == 503 and response.headers.get("retry-after"):
        return record.fail(OVERLOADED, f"503 Retry-After {response.headers['retry-after']}: {text}")
    return record.fail(STATUS, f"HTTP {response.status_code}: {text}")


def _transport(record: Record, exc: BaseException) -> Record:
    if isinstance(exc, httpx.TimeoutException):
        return record.fail(HUNG, f"no byte within the timeout ({type(exc).__name__})")
    if isinstance(exc, TimeoutError):
        return record.fail(HUNG, "not finished by the end of the run plus its grace time")
    return record.fail(RESET, f"{type(exc).__name__}: {exc}")


def _check_usage(record: Record, usage: Any, finish: str | None, max_tokens: int) -> str | None:
    """Why a finished answer's usage is wrong, or None."""
    if not isinstance(usage, dict):
        return "no usage"
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return f"usage without token counts: {usage}"
    record.prompt_tokens, record.completion_tokens = prompt, completion
    if prompt <= 0 or not 0 <= completion <= max_tokens:
        return f"usage out of range (max_tokens {max_tokens}): {usage}"
    if usage.get("total_tokens") != prompt + completion:
        return f"total_tokens is not prompt + completion: {usage}"
    if finish not in ("stop", "length"):
        return f"finish_reason {finish!r}"
    if finish == "length" and completion != max_tokens:
        return f"finish_reason length after {completion} of max_tokens {max_tokens}"
    return None


async def _read_sse(response: httpx.Response, record: Record, max_tokens: int, leave: bool) -> Record:
    finish: str | None = None
    usage: Any = None
    done = False
    async for line in response.aiter_lines():
        if not line or line.startswith(":"):
            continue
        if done:
            return record.fail(INVALID, f"data after [DONE]: {line[:100]}")
        if not line.startswith("data:"):
            return record.fail(INVALID, f"not an SSE data line: {line[:100]}")
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            return record.fail(INVALID, f"event is not JSON: {payload[:100]}")
        if "error" in chunk:
            return record.fail(INVALID, f"error event: {json.dumps(chunk['error'])}")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content") and math.isnan(record.ttft):
                record.ttft = time.perf_counter() - record.started
                if leave:
                    record.ended = time.perf_counter()
                    return record
            finish = choice.get("finish_reason") or finish
    record.ended = time.perf_counter()
    if not done:
        return record.fail(INVALID, "the stream ended without [DONE]")
    if math.isnan(record.ttft):
        record.ttft = record.latency
    problem = _check_usage(record, usage, finish, max_tokens)
    return record.fail(INVALID, problem) if problem else record


def _left(deadline: float | None) -> float | None:
    """Seconds to `deadline` (perf_counter clock) for asyncio.timeout; None: no deadline."""
    return None if deadline is None else max(0.0, deadline - time.perf_counter())


async def stream_chat(
    http: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    kind: str,
    deadline: float | None = None,
    leave: bool = False,
) -> Record:
    """One streaming chat completion, classified; hung when not done by `deadline`. With `leave`,
    the client closes the response (and so its connection) at the first content token, which
    then counts as ok. Never raises (but for cancellation)."""
    record = Record(kind, time.perf_counter())
    try:
        async with (
            asyncio.timeout(_left(deadline)),
            http.stream("POST", f"{url}/v1/chat/completions", json=body) as response,
        ):
            if response.status_code != 200:
                await response.aread()
                return _refused(record, response)
            return await _read_sse(response, record, body["max_tokens"], leave)
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        return _transport(record, exc)
    finally:
        if math.isnan(record.ended):
            record.ended = time.perf_counter()


async def plain_chat(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], deadline: float | None = None
) -> Record:
    """One non-streaming chat completion, classified."""
    record = Record("chat", time.perf_counter())
    try:
        async with asyncio.timeout(_left(deadline)):
            response = await http.post(f"{url}/v1/chat/completions", json=body)
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        return _transport(record, exc)
    finally:
        record.ended = time.perf_counter()
    if response.status_code != 200:
        return _refused(record, response)
    try:
        answer = response.json()
        finish = answer["choices"][0]["finish_reason"]
    except (ValueError, KeyError, IndexError, TypeError):
        return record.fail(INVALID, f"not a chat completion: {response.text[:200]}")
    record.ttft = record.latency
    problem = _check_usage(record, answer.get("usage"), finish, body["max_tokens"])
    return record.fail(INVALID, problem) if problem else record


async def embed(
    http: httpx.AsyncClient, url: str, model: str, inputs: list[str], deadline: float | None = None
) -> Record:
    """One /v1/embeddings request, classified: one finite vector per input, all of one size."""
    record = Record("embed", time.perf_counter())
    try:
        async with asyncio.timeout(_left(deadline)):
            response = await http.post(f"{url}/v1/embeddings", json={"model": model, "input": inputs})
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        return _transport(record, exc)
    finally:
        record.ended = time.perf_counter()
    if response.status_code != 200:
        return _refused(record, response)
    try:
        data = response.json()["data"]
        vectors = [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]
    except (ValueError, KeyError, TypeError):
        return record.fail(INVALID, f"not an embedding list: {response.text[:200]}")
    sizes = {len(v) for v in vectors}
    if len(vectors) != len(inputs) or len(sizes) != 1 or 0 in sizes:
        return record.fail(INVALID, f"{len(vectors)} vectors of sizes {sorted(sizes)} for {len(inputs)}")
    if not all(isinstance(x, float | int) and math.isfinite(x) for v in vectors for x in v):
        return record.fail(INVALID, "an embedding holds a non-finite value")
    record.ttft = record.latency
    return record


async def wait_until(at: float) -> None:
    delay = at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


# --------------------------------------------------------------------------------------- /metrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format as (name, labels, value) rows."""
    rows = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(_LABEL.findall(match.group(3) or ""))
            rows.append((match.group(1), labels, float(match.group(4))))
    return rows


@dataclass
class Gauges:
    """The scheduler gauges of one model (pendra_inference.metrics); nan when the model is not loaded."""

    running: float = math.nan  # pendra_requests_running
    waiting: float = math.nan  # pendra_requests_waiting
    kv_used: float = math.nan  # pendra_kv_cache_cells_used (finished, cached sequences included)
    kv_cells: float = math.nan  # pendra_kv_cache_cells
    loaded: float = math.nan  # pendra_loaded_models (all models)


async def scrape(http: httpx.AsyncClient, url: str, model: str) -> Gauges:
    """The model's gauges from /metrics; all nan when /metrics cannot be read."""
    try:
        response = await http.get(f"{url}/metrics")
        response.raise_for_status()
    except httpx.HTTPError:
        return Gauges()
    names = {
        "pendra_requests_running": "running",
        "pendra_requests_waiting": "waiting",
        "pendra_kv_cache_cells_used": "kv_used",
        "pendra_kv_cache_cells": "kv_cells",
    }
    gauges = Gauges()
    for name, labels, value in parse_metrics(response.text):
        if name == "pendra_loaded_models":
            gauges.loaded = value
        elif name in names and labels.get("model_name") == model:
            setattr(gauges, names[name], value)
    return gauges


# --------------------------------------------------------------------------------------- /proc


@dataclass
class ProcSample:
    """The server process as /proc shows it: RSS summed over it and its descendants."""

    rss_mib: float
    fds: int
    sockets: int  # of the fds
    threads: int
    children: int = 0
    pids: list[int] = field(default_factory=list)


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from each /proc/N/stat's parent field)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def sample_process(pid: int) -> ProcSample:
    """RSS of `pid` and its descendants, and `pid`'s own open descriptors and threads."""
    status = _status(pid)
    rss_kib = int(status.get("VmRSS", "0 kB").split()[0])
    children = descendants(pid)
    for child in children:
        try:
            rss_kib += int(_status(child).get("VmRSS", "0 kB").split()[0])
        except (OSError, ValueError):
            pass  # gone meanwhile, or a zombie
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    sockets = sum(link.startswith("socket:") for link in links)
    return ProcSample(
        rss_kib / 1024, len(links), sockets, int(status["Threads"]), len(children), [pid, *children]
    )


# --------------------------------------------------------------------------------------- figures


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan for no values."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.0f}"


def counts(records: Sequence[Record]) -> dict[str, int]:
    tally = dict.fromkeys(OUTCOMES, 0)
    for record in records:
        tally[record.outcome] += 1
    return tally


def print_outcomes(records: Sequence[Record], title: str, examples: int = 3) -> None:
    """The outcome table, and a few details of each failure kind."""
    tally = counts(records)
    total = max(1, len(records))
    print(f"{title:<28}{'count':>8}{'share':>9}")
    for outcome, label in OUTCOMES.items():
        print(f"  {label:<26}{tally[outcome]:>8}{tally[outcome] / total:>9.1%}")
    print(f"  {'total':<26}{len(records):>8}")
    for outcome in FAILURES:
        shown = [r for r in records if r.outcome == outcome][:examples]
        for record in shown:
            print(f"    {outcome}: {record.kind}: {record.detail}")
