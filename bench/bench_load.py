"""Load and soak runs against `pendra serve` (hardening checklist §3 E1, E3, E4, E5), with numbers.

Not timed tests: each subcommand prints a summary table, writes a JSON file (--out) and exits 1
when its verdict fails.

* streams (E1): --clients concurrent streaming chat clients, each on one persistent connection,
  looping for --duration seconds over mixed prompts (half short, a third ~60 words, the rest ~300
  words) with max_tokens drawn from --min-tokens..--max-tokens. Every request is classified (see
  `_load_clients`): completed, 503 + Retry-After (allowed: PENDRA_MAX_QUEUE and
  PENDRA_QUEUE_TIMEOUT_S), reset / protocol error, 500 / other status, bad stream, hung (no byte for
  --hang-s, or not done --grace seconds after the run). Reports requests/s, output tokens/s, TTFT
  p50/p90/p99 and end-to-end p50/p99. Fails on any reset, bad status, bad stream or hung request.
* leavers (E3): --clients streams of up to --max-tokens tokens whose clients hang up at their first
  token; then /metrics is polled (pendra_requests_running and pendra_requests_waiting of the model)
  until both are 0. Fails when that takes longer than --limit-s after the last client left.
* slowloris (E5): a baseline phase of --normal-clients streaming chat clients (--baseline-s), then
  the same clients for --duration while --sockets raw connections each send one header byte every
  --byte-every seconds. Reports the normal clients' latency in both phases and how many slow
  sockets the server closed after how long (PENDRA_RECEIVE_TIMEOUT_S, default 30 s). Fails on a
  normal-client error, a slowdown of the median past --max-slowdown, or a slow socket held open
  longer than the receive timeout plus 5 s.
* soak (E4): open-loop arrivals at --rate requests/s for --duration seconds: short chat completions,
  streamed and not in turn, every --embed-every-th request an embeddings request. Every --sample-s
  seconds one line: the server's RSS (with its children), open descriptors and threads from /proc,
  and the model's /metrics gauges; also written as CSV (--csv). After --warmup-s, RSS, descriptors
  and threads must stay within --tolerance (max vs min) with no upward trend (mean of the last fifth
  vs the first, --trend-tol; descriptors and threads may also move by --count-slack, as in-flight
  connections come and go); no request may fail, and the queue must be empty at the end.

By default each run starts its own `pendra serve` on a free port with a temporary store holding the
Gemma 3 270M test model (assembled from its PyPI package and cached, as the tests do) as
--model-name for chat and --embed-model-name for embeddings (mean pooling), with PENDRA_N_CTX
--n-ctx, PENDRA_KEEP_ALIVE=-1, PENDRA_MAX_LOADED_MODELS=2 and any --server-env KEY=VAL; it is
stopped with SIGTERM at the end and must exit 0. --url targets a running server instead (the soak
then needs its --pid). Examples, full length:

    uv run --no-sync python bench/bench_load.py streams --clients 64 --duration 60 \\
        --server-env PENDRA_MAX_QUEUE=32 --server-env PENDRA_QUEUE_TIMEOUT_S=30 --out streams-64.json
    uv run --no-sync python bench/bench_load.py leavers --clients 200 --out leavers.json
    uv run --no-sync python bench/bench_load.py slowloris --sockets 200 --byte-every 4 --duration 60
    uv run --no-sync python bench/bench_load.py soak --duration 1800 --rate 1 --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import random
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._load_clients import (  # noqa: E402
    FAILURES,
    OK,
    OUTCOMES,
    OVERLOADED,
    TOPICS,
    Gauges,
    Record,
    chat_body,
    client,
    counts,
    embed,
    mixed_prompt,
    ms,
    pct,
    plain_chat,
    print_outcomes,
    prose,
    sample_process,
    scrape,
    stream_chat,
    wait_until,
)
from bench.bench_inference import gemma  # noqa: E402
from tests.support.server import ServerProcess, start_server, stop_process  # noqa: E402

Report = dict[str, Any]


# --------------------------------------------------------------------------------------- server


@dataclass
class Target:
    """The server under load, started here or given by --url."""

    url: str
    pid: int | None
    model: str
    embed_model: str
    headers: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    server: ServerProcess | None = None
    shutdown: dict[str, Any] = field(default_factory=dict)

    @property
    def clean_exit(self) -> bool:
        return self.server is None or self.shutdown.get("exit_code") == 0


def server_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--server-env wants KEY=VAL, not {pair!r}")
        env[key] = value
    return env


@contextlib.contextmanager
def target(args: argparse.Namespace) -> Iterator[Target]:
    """The server for the run: --url, or a `pendra serve` of our own, stopped at the end."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    names = (args.model_name, args.embed_model_name)
    if args.url:
        yield Target(args.url.rstrip("/"), args.pid, *names, headers)
        return
    from pendra_shared.store import ModelStore

    with tempfile.TemporaryDirectory(prefix="pendra-load-") as tmp:
        model = Path(args.model) if args.model else gemma()
        store = ModelStore(Path(tmp) / "models")
        store.import_file(model, name=args.model_name)
        embed_model = Path(args.embed_model) if args.embed_model else model
        store.import_file(embed_model, name=args.embed_model_name, purpose="embedding")
        env = {
            "PENDRA_MODELS_DIR": str(store.root),
            "PENDRA_N_CTX": str(args.n_ctx),
            "PENDRA_KEEP_ALIVE": "-1",
            "PENDRA_MAX_LOADED_MODELS": "2",
            **server_env(args.server_env),
        }
        queue_timeout = float(env.get("PENDRA_QUEUE_TIMEOUT_S", 300))
        if queue_timeout >= args.hang_s:
            print(
                f"note: a request may wait {queue_timeout:g} s in the queue (PENDRA_QUEUE_TIMEOUT_S) "
                f"without a byte, longer than --hang-s {args.hang_s:g}: such a wait counts as hung"
            )
        log = Path(args.server_log) if args.server_log else Path(tmp) / "serve.log"
        print(f"starting pendra serve ({model.name}); log {log}", flush=True)
        server = start_server(env, log, timeout_s=args.start_timeout)
        found = Target(server.base_url, server.proc.pid, *names, headers, env, server)
        try:
            yield found
        finally:
            found.shutdown = stop(server, args.stop_timeout)
            if found.shutdown["exit_code"] != 0:
                print(f"pendra serve log tail:\n{tail(log)}", file=sys.stderr)


def stop(server: ServerProcess, timeout: float) -> dict[str, Any]:
    """SIGTERM, and how the server took it: exit code and seconds (killed past `timeout`)."""
    early = server.proc.poll()
    started = time.perf_counter()
    stop_process(server.proc, signal.SIGTERM, timeout=timeout)
    return {
        "exited_before_stop": early is not None,
        "exit_code": server.proc.returncode,
        "seconds": round(time.perf_counter() - started, 2),
    }


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def plain(value: Any) -> Any:
    """`value` with NaN and infinities as None, so the JSON file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def raise_fd_limit() -> None:
    """Many sockets at once: the soft descriptor limit up to the hard one (the child inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def warm_up(t: Target, embeddings: bool) -> Gauges:
    """Load the model(s) before measuring (a first load runs a probe child: minutes at worst)."""
    async with client(600, 1, t.headers) as http:
        record = await plain_chat(http, t.url, chat_body(t.model, "Say hello.", 4, 1, stream=False))
        if record.outcome != OK:
            raise SystemExit(f"warm-up chat failed: {record.outcome}: {record.detail}")
        if embeddings:
            record = await embed(http, t.url, t.embed_model, ["warm-up sentence"])
            if record.outcome != OK:
                raise SystemExit(f"warm-up embeddings failed: {record.outcome}: {record.detail}")
        return await scrape(http, t.url, t.model)


def proc_now(t: Target) -> dict[str, Any] | None:
    if t.pid is None:
        return None
    try:
        return asdict(sample_process(t.pid))
    except OSError:
        return None


# --------------------------------------------------------------------------------------- clients


async def client_loop(
    t: Target,
    seed: int,
    stop_at: float,
    deadline: float,
    records: list[Record],
    make_body: Callable[[random.Random], tuple[str, dict[str, Any]]],
    args: argparse.Namespace,
) -> None:
    """One client on one persistent connection: request after request until `stop_at`; after a
    refusal or an error it waits --backoff seconds first."""
    rng = random.Random(seed)
    async with client(args.hang_s, 1, t.headers) as http:
        while time.perf_counter() < stop_at:
            kind, body = make_body(rng)
            record = await stream_chat(http, t.url, body, kind, deadline)
            records.append(record)
            if record.outcome != OK:
                await asyncio.sleep(min(args.backoff, max(0.0, stop_at - time.perf_counter())))


async def watch_gauges(t: Target, every: float, into: list[tuple[float, Gauges]]) -> None:
    """Scrape the model's gauges every `every` seconds until cancelled."""
    async with client(30, 1, t.headers) as http:
        while True:
            into.append((time.perf_counter(), await scrape(http, t.url, t.model)))
            await asyncio.sleep(every)


async def cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def peak(samples: list[tuple[float, Gauges]], name: str) -> float:
    values = [getattr(g, name) for _, g in samples if not math.isnan(getattr(g, name))]
    return max(values, default=math.nan)


def latency_figures(records: list[Record]) -> dict[str, float]:
    done = [r for r in records if r.outcome == OK]
    return {
        "ttft_p50": pct([r.ttft for r in done], 0.5),
        "ttft_p90": pct([r.ttft for r in done], 0.9),
        "ttft_p99": pct([r.ttft for r in done], 0.99),
        "e2e_p50": pct([r.latency for r in done], 0.5),
        "e2e_p99": pct([r.latency for r in done], 0.99),
    }


# --------------------------------------------------------------------------------------- streams


async def progress(start: float, records: list[Record], gauges: list[tuple[float, Gauges]]) -> None:
    """A line every 10 s while clients run: outcomes so far and the latest gauges."""
    while True:
        await asyncio.sleep(10)
        tally = counts(records)
        g = gauges[-1][1] if gauges else Gauges()
        print(
            f"  t={time.perf_counter() - start:>5.0f}s  completed {tally[OK]}  503 {tally[OVERLOADED]}  "
            f"failed {sum(tally[o] for o in FAILURES)}  running {g.running:g}  waiting {g.waiting:g}",
            flush=True,
        )


async def run_streams(args: argparse.Namespace, t: Target) -> tuple[Report, list[str]]:
    def body(rng: random.Random) -> tuple[str, dict[str, Any]]:
        length, text = mixed_prompt(rng)
        tokens = rng.randint(args.min_tokens, args.max_tokens)
        return f"chat-{length}", chat_body(t.model, text, tokens, rng.randrange(2**31))

    records: list[Record] = []
    gauges: list[tuple[float, Gauges]] = []
    start = time.perf_counter()
    stop_at, deadline = start + args.duration, start + args.duration + args.grace
    watcher = asyncio.create_task(watch_gauges(t, 0.5, gauges))
    reporter = asyncio.create_task(progress(start, records, gauges))
    print(f"{args.clients} clients for {args.duration:g} s ...", flush=True)
    await asyncio.gather(
        *(
            client_loop(t, args.seed * 100_003 + i, stop_at, deadline, records, body, args)
            for i in range(args.clients)
        )
    )
    await cancel(reporter)
    await cancel(watcher)
    wall = max((r.ended for r in records), default=start) - start
    done = [r for r in records if r.outcome == OK]
    figures = {
        "wall_s": wall,
        "requests_per_s": len(done) / wall if wall else math.nan,
        "output_tokens_per_s": sum(r.completion_tokens for r in done) / wall if wall else math.nan,
        **latency_figures(records),
        "peak_running": peak(gauges, "running"),
        "peak_waiting": peak(gauges, "waiting"),
    }
    by_length = {
        kind: latency_figures([r for r in records if r.kind == kind])
        | {"completed": sum(r.kind == kind for r in done)}
        for kind in ("chat-short", "chat-medium", "chat-long")
    }

    print(
        f"\n== streams: {args.clients} clients, {args.duration:g} s, max_tokens {args.min_tokens}-"
        f"{args.max_tokens} =="
    )
    print_outcomes(records, "outcome")
    print(
        f"completed/s {figures['requests_per_s']:.2f}   output tokens/s "
        f"{figures['output_tokens_per_s']:.1f}   wall {wall:.1f} s   peak running "
        f"{figures['peak_running']:g}, waiting {figures['peak_waiting']:g}"
    )
    print(
        f"{'prompt':<14}{'completed':>10}{'TTFT p50':>10}{'p90':>8}{'p99':>8}{'e2e p50':>9}{'p99':>8}  (ms)"
    )
    for kind, f in [("all", figures), *((k.removeprefix("chat-"), v) for k, v in by_length.items())]:
        completed = len(done) if kind == "all" else f["completed"]
        print(
            f"{kind:<14}{completed:>10}{ms(f['ttft_p50']):>10}{ms(f['ttft_p90']):>8}"
            f"{ms(f['ttft_p99']):>8}{ms(f['e2e_p50']):>9}{ms(f['e2e_p99']):>8}"
        )
    tally = counts(records)
    problems = [f"{tally[o]} {OUTCOMES[o]}" for o in FAILURES if tally[o]]
    report = {"counts": tally, "figures": figures, "by_prompt_length": by_length}
    report["requests"] = [r.row(start) for r in records]
    return report, problems


# --------------------------------------------------------------------------------------- leavers


async def leavers_round(args: argparse.Namespace, t: Target, number: int) -> tuple[Report, list[str]]:
    """One round: all clients at once, each gone at its first token; then the gauges to zero."""
    gauges: list[tuple[float, Gauges]] = []
    watcher = asyncio.create_task(watch_gauges(t, args.poll_s, gauges))

    async def leaver(i: int) -> Record:
        text = f"Write a very long story about {TOPICS[i % len(TOPICS)]}."
        body = chat_body(t.model, text, args.max_tokens, args.seed * 1000 + i)
        async with client(args.hang_s, 1, t.headers) as http:
            record = await stream_chat(http, t.url, body, "chat", leave=True)
        record.ended = time.perf_counter()  # the connection is closed now
        return record

    records = list(await asyncio.gather(*(leaver(i) for i in range(args.clients))))
    last_left = max(r.ended for r in records)
    settle = last_left + args.settle_s
    while time.perf_counter() < settle:
        if gauges and gauges[-1][0] > last_left and gauges[-1][1].running == 0 == gauges[-1][1].waiting:
            break
        await asyncio.sleep(args.poll_s)
    await cancel(watcher)

    def zero_after(name: str) -> float:
        return next(
            (at - last_left for at, g in gauges if at > last_left and getattr(g, name) == 0), math.nan
        )

    running_zero, waiting_zero = zero_after("running"), zero_after("waiting")
    async with client(args.hang_s, 1, t.headers) as http:
        check = await plain_chat(http, t.url, chat_body(t.model, "Say hello.", 8, 7, stream=False))
    final = gauges[-1][1] if gauges else Gauges()
    tally = counts(records)
    print(f"\n== leavers round {number}: {args.clients} clients leave at their first token ==")
    print_outcomes(records, "outcome (completed = left)")
    print(
        f"TTFT p50/p99 {ms(pct([r.ttft for r in records if r.outcome == OK], 0.5))}/"
        f"{ms(pct([r.ttft for r in records if r.outcome == OK], 0.99))} ms   peak running "
        f"{peak(gauges, 'running'):g}, waiting {peak(gauges, 'waiting'):g}"
    )
    print(
        f"after the last client left: running 0 after {ms(running_zero)} ms, waiting 0 after "
        f"{ms(waiting_zero)} ms (limit {args.limit_s * 1000:.0f} ms, polled every "
        f"{args.poll_s * 1000:.0f} ms); KV cells used {final.kv_used:g} of {final.kv_cells:g} "
        f"(cached prefixes included); a request afterwards: {check.outcome}"
    )
    problems = [f"round {number}: {tally[o]} {OUTCOMES[o]}" for o in FAILURES if tally[o]]
    for name, value in (("running", running_zero), ("waiting", waiting_zero)):
        if not value <= args.limit_s:  # nan (never 0) fails too
            problems.append(f"round {number}: {name} not 0 within {args.limit_s:g} s of the last leave")
    if check.outcome != OK:
        problems.append(f"round {number}: a request afterwards failed: {check.outcome} {check.detail}")
    report = {
        "counts": tally,
        "running_zero_s": running_zero,
        "waiting_zero_s": waiting_zero,
        "peak_running": peak(gauges, "running"),
        "peak_waiting": peak(gauges, "waiting"),
        "final_gauges": asdict(final),
        "request_after": check.outcome,
        "gauges": [{"t": round(at - last_left, 3), **asdict(g)} for at, g in gauges],
    }
    return report, problems


async def run_leavers(args: argparse.Namespace, t: Target) -> tuple[Report, list[str]]:
    rounds, problems = [], []
    for number in range(1, args.rounds + 1):
        report, found = await leavers_round(args, t, number)
        rounds.append(report)
        problems += found
    return {"rounds": rounds}, problems


# --------------------------------------------------------------------------------------- slowloris


@dataclass
class SlowConnection:
    opened: float
    closed: float = math.nan
    how: str = ""  # eof, an exception's name, or the start of what the server answered
    sent: int = 0
    connected: bool = False


def slow_byte(index: int, host: str) -> bytes:
    """The index-th byte of a request whose headers never end."""
    head = f"GET /health HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode()
    return head[index : index + 1] if index < len(head) else b"a"


async def slow_socket(
    host: str, port: int, every: float, stop_at: float, reconnect: bool, into: list[SlowConnection]
) -> None:
    """Send one header byte every `every` seconds until the server closes the connection (then,
    with `reconnect`, open another) or `stop_at`."""
    while time.perf_counter() < stop_at:
        conn = SlowConnection(time.perf_counter())
        into.append(conn)
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            conn.closed, conn.how = time.perf_counter(), f"connect: {type(exc).__name__}"
            await asyncio.sleep(every)
            continue
        conn.connected = True
        answer = asyncio.create_task(reader.read(200))
        try:
            while time.perf_counter() < stop_at:
                writer.write(slow_byte(conn.sent, host))
                await writer.drain()
                conn.sent += 1
                await asyncio.wait({answer}, timeout=min(every, max(0.0, stop_at - time.perf_counter())))
                if answer.done():
                    data = answer.result()
                    conn.closed, conn.how = time.perf_counter(), ("eof" if not data else repr(data[:40]))
                    break
        except OSError as exc:
            conn.closed, conn.how = time.perf_counter(), type(exc).__name__
        finally:
            answer.cancel()
            if answer.done() and not answer.cancelled():
                answer.exception()  # retrieved: it was reported above, or is moot now
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not reconnect or math.isnan(conn.closed):
            return


async def normal_phase(args: argparse.Namespace, t: Target, seconds: float) -> list[Record]:
    def body(rng: random.Random) -> tuple[str, dict[str, Any]]:
        text = f"Write a story about {rng.choice(TOPICS)}."
        return "chat", chat_body(t.model, text, args.max_tokens, rng.randrange(2**31))

    records: list[Record] = []
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(
        *(
            client_loop(t, args.seed * 7919 + i, stop_at, stop_at + args.hang_s, records, body, args)
            for i in range(args.normal_clients)
        )
    )
    return records


async def run_slowloris(args: argparse.Namespace, t: Target) -> tuple[Report, list[str]]:
    parts = urlsplit(t.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    receive_s = args.receive_timeout_s or float(
        server_env(args.server_env).get("PENDRA_RECEIVE_TIMEOUT_S", 30.0)
    )
    print(f"baseline: {args.normal_clients} clients for {args.baseline_s:g} s ...", flush=True)
    baseline = await normal_phase(args, t, args.baseline_s)
    print(
        f"attack: {args.sockets} slow sockets, 1 byte / {args.byte_every:g} s, {args.duration:g} s ...",
        flush=True,
    )
    conns: list[SlowConnection] = []
    start = time.perf_counter()
    stop_at = start + args.duration
    sockets = [
        asyncio.create_task(slow_socket(host, port, args.byte_every, stop_at, args.reconnect, conns))
        for _ in range(args.sockets)
    ]
    attack = await normal_phase(args, t, args.duration)
    await asyncio.gather(*sockets)
    end = time.perf_counter()

    failed = [c for c in conns if not c.connected]
    conns = [c for c in conns if c.connected]
    closed = [c for c in conns if not math.isnan(c.closed)]
    held = [c.closed - c.opened for c in closed]
    limit = receive_s + 5
    overdue = [c for c in conns if (end if math.isnan(c.closed) else c.closed) - c.opened > limit]
    phases = {"baseline": baseline, "attack": attack}
    figures = {name: latency_figures(records) | counts(records) for name, records in phases.items()}
    base_p50, attack_p50 = figures["baseline"]["e2e_p50"], figures["attack"]["e2e_p50"]
    slowdown = attack_p50 / base_p50 if base_p50 else math.nan

    print(
        f"\n== slowloris: {args.sockets} sockets x 1 byte / {args.byte_every:g} s; "
        f"{args.normal_clients} normal clients =="
    )
    print(
        f"{'phase':<10}{'completed':>10}{'errors':>8}{'503':>6}{'TTFT p50':>10}{'p99':>8}"
        f"{'e2e p50':>9}{'p99':>8}  (ms)"
    )
    for name, f in figures.items():
        errors = sum(f[o] for o in FAILURES)
        print(
            f"{name:<10}{f[OK]:>10}{errors:>8}{f[OVERLOADED]:>6}{ms(f['ttft_p50']):>10}"
            f"{ms(f['ttft_p99']):>8}{ms(f['e2e_p50']):>9}{ms(f['e2e_p99']):>8}"
        )
    print(f"e2e p50 under attack / baseline: {slowdown:.2f} (limit {args.max_slowdown:g})")
    hows = sorted({c.how for c in closed})
    print(
        f"slow connections: {len(conns)} opened, {len(closed)} closed by the server "
        f"({', '.join(hows) or '-'}), {len(conns) - len(closed)} open at the end; held "
        f"min/p50/max {pct(held, 0):.1f}/{pct(held, 0.5):.1f}/{pct(held, 1):.1f} s "
        f"(receive timeout {receive_s:g} s); {len(failed)} connects failed"
    )
    for name, records in phases.items():
        for record in [r for r in records if r.outcome in FAILURES][:3]:
            print(f"    {name}: {record.outcome}: {record.detail}")

    problems = []
    for name, f in figures.items():
        errors = sum(f[o] for o in FAILURES)
        if errors:
            problems.append(f"{errors} normal-client errors in the {name} phase")
    if baseline and not slowdown <= args.max_slowdown:
        problems.append(f"normal clients {slowdown:.2f}x slower under attack")
    if overdue:
        problems.append(f"{len(overdue)} slow connections held longer than {limit:g} s")
    if failed:
        problems.append(f"{len(failed)} slow connections could not connect")
    report = {
        "phases": figures,
        "slowdown_e2e_p50": slowdown,
        "receive_timeout_s": receive_s,
        "slow_connections": {
            "opened": len(conns),
            "closed_by_server": len(closed),
            "open_at_end": len(conns) - len(closed),
            "held_s_min": pct(held, 0),
            "held_s_p50": pct(held, 0.5),
            "held_s_max": pct(held, 1),
            "how_closed": hows,
            "connect_failures": len(failed),
        },
        "requests": {n: [r.row(start) for r in records] for n, records in phases.items()},
    }
    return report, problems


# --------------------------------------------------------------------------------------- soak


@dataclass
class SoakSample:
    t: float
    rss_mib: float
    fds: int
    sockets: int
    threads: int
    children: int
    running: float
    waiting: float
    kv_used: float
    done: int
    errors: int
    in_flight: int


def flat(values: list[float], tolerance: float, trend_tol: float, slack: float = 0) -> dict[str, Any]:
    """Spread (max vs min) and trend (mean of the last fifth vs the first) of a steady series.
    `slack`: an absolute difference that passes whatever its share (descriptors and threads are
    small counts, and in-flight connections come and go)."""
    fifth = max(1, len(values) // 5)
    low, high = min(values), max(values)
    first, last = statistics.fmean(values[:fifth]), statistics.fmean(values[-fifth:])
    spread = (high - low) / low if low else math.inf
    trend = (last - first) / first if first else math.inf
    return {
        "min": low,
        "max": high,
        "spread": spread,
        "first_fifth": first,
        "last_fifth": last,
        "trend": trend,
        "ok": high - low <= max(tolerance * low, slack) and last - first <= max(trend_tol * first, slack / 2),
    }


async def run_soak(args: argparse.Namespace, t: Target) -> tuple[Report, list[str]]:
    assert t.pid is not None
    pid = t.pid
    records: list[Record] = []
    samples: list[SoakSample] = []
    in_flight: set[asyncio.Task[None]] = set()
    csv_path = Path(args.csv or Path(args.out).with_suffix(".csv"))
    start = time.perf_counter()
    stop_at = start + args.duration
    deadline = stop_at + args.grace

    async def one(http: httpx.AsyncClient, i: int) -> None:
        rng = random.Random(args.seed * 1_000_003 + i)
        if args.embed_every and i % args.embed_every == args.embed_every - 1:
            inputs = [prose(rng, 12) for _ in range(rng.randint(1, 8))]
            records.append(await embed(http, t.url, t.embed_model, inputs, deadline))
            return
        _, text = mixed_prompt(rng)
        body = chat_body(t.model, text, args.max_tokens, rng.randrange(2**31), stream=i % 2 == 0)
        if body["stream"]:
            records.append(await stream_chat(http, t.url, body, "chat-stream", deadline))
        else:
            records.append(await plain_chat(http, t.url, body, deadline))

    gone: list[str] = []

    async def sample(probe: httpx.AsyncClient, writer: Any) -> None:
        try:
            proc = sample_process(pid)
        except (OSError, KeyError, ValueError) as exc:
            if not gone:
                print(f"  cannot read /proc/{pid}: {exc}", flush=True)
                gone.append(f"the server process could not be read: {exc}")
            return
        g = await scrape(probe, t.url, t.model)
        s = SoakSample(
            t=round(time.perf_counter() - start, 1),
            rss_mib=round(proc.rss_mib, 1),
            fds=proc.fds,
            sockets=proc.sockets,
            threads=proc.threads,
            children=proc.children,
            running=g.running,
            waiting=g.waiting,
            kv_used=g.kv_used,
            done=len(records),
            errors=sum(r.outcome in FAILURES for r in records),
            in_flight=len(in_flight),
        )
        samples.append(s)
        writer.writerow(asdict(s))
        print(
            f"  t={s.t:>7.0f}s  rss {s.rss_mib:>8.1f} MiB  fds {s.fds:>4} ({s.sockets:>3} sockets)  "
            f"threads {s.threads:>3}  "
            f"running {s.running:>3g}  waiting {s.waiting:>3g}  kv {s.kv_used:>6g}  "
            f"done {s.done:>6}  errors {s.errors:>3}  in flight {s.in_flight:>3}",
            flush=True,
        )

    async def sampler(probe: httpx.AsyncClient, writer: Any) -> None:
        while True:
            await sample(probe, writer)
            await asyncio.sleep(args.sample_s)

    print(
        f"soak: {args.rate:g} requests/s for {args.duration:g} s; samples every {args.sample_s:g} s "
        f"to {csv_path}",
        flush=True,
    )
    with csv_path.open("w", newline="", buffering=1) as file:  # a line at a time: kept on a crash
        writer = csv.DictWriter(file, fieldnames=[f.name for f in fields(SoakSample)])
        writer.writeheader()
        async with client(args.hang_s, 64, t.headers) as http, client(30, 1, t.headers) as probe:
            task = asyncio.create_task(sampler(probe, writer))
            sent = 0
            while (at := start + sent / args.rate) < stop_at:
                await wait_until(at)  # open loop: arrivals do not wait for answers
                job = asyncio.create_task(one(http, sent))
                in_flight.add(job)
                job.add_done_callback(in_flight.discard)
                sent += 1
            if in_flight:
                await asyncio.wait(set(in_flight))
            await cancel(task)
            await asyncio.sleep(1)  # let the scheduler notice the last finish
            await sample(probe, writer)

    report, problems = judge_soak(args, samples, records, time.perf_counter() - start)
    report["csv"] = str(csv_path)
    report["requests"] = [r.row(start) for r in records]
    return report, problems + gone


def judge_soak(
    args: argparse.Namespace, samples: list[SoakSample], records: list[Record], wall: float
) -> tuple[Report, list[str]]:
    """The soak's summary and verdict: outcomes, latency by kind, and the process curves after the
    warm-up (shortened to none when the run is too short for it)."""
    tally = counts(records)
    print(
        f"\n== soak: {len(records)} requests in {wall:.0f} s ({len(records) / wall:.2f}/s), "
        f"{sum(r.kind == 'embed' for r in records)} of them embeddings =="
    )
    print_outcomes(records, "outcome")
    print(f"{'kind':<14}{'completed':>10}{'TTFT p50':>10}{'p99':>8}{'e2e p50':>9}{'p99':>8}  (ms)")
    for kind in ("chat-stream", "chat", "embed"):
        mine = [r for r in records if r.kind == kind]
        f = latency_figures(mine)
        print(
            f"{kind:<14}{sum(r.outcome == OK for r in mine):>10}{ms(f['ttft_p50']):>10}"
            f"{ms(f['ttft_p99']):>8}{ms(f['e2e_p50']):>9}{ms(f['e2e_p99']):>8}"
        )
    problems = [f"{tally[o]} {OUTCOMES[o]}" for o in FAILURES if tally[o]]
    report: Report = {
        "counts": tally,
        "figures": latency_figures(records) | {"requests_per_s": len(records) / wall},
        "samples": [asdict(s) for s in samples],
    }
    if not samples:
        return report, [*problems, "no process samples"]

    warmup = args.warmup_s if args.duration > args.warmup_s * 1.5 else 0.0
    steady = [s for s in samples if s.t >= warmup] or samples
    # Sockets come and go with the requests in flight; a leak shows as files (every descriptor
    # but sockets) or as sockets beyond the connections in flight.
    series = {
        "rss_mib": ([s.rss_mib for s in steady], 0.0),
        "files": ([float(s.fds - s.sockets) for s in steady], args.count_slack),
        "sockets-in_flight": ([float(s.sockets - s.in_flight) for s in steady], args.count_slack),
        "threads": ([float(s.threads) for s in steady], args.count_slack),
    }
    verdicts = {
        name: flat(values, args.tolerance, args.trend_tol, slack) for name, (values, slack) in series.items()
    }
    print(
        f"after a {warmup:g} s warm-up, {len(steady)} samples (spread = max/min - 1, trend = last "
        f"fifth / first fifth - 1; limits {args.tolerance:.0%} and {args.trend_tol:.0%}; for counts "
        f"a spread of {args.count_slack:g} and a rise of {args.count_slack / 2:g} also pass):"
    )
    print(f"  {'':<18}{'min':>10}{'max':>10}{'spread':>9}{'first 1/5':>11}{'last 1/5':>10}{'trend':>8}")
    for name, v in verdicts.items():
        print(
            f"  {name:<18}{v['min']:>10.1f}{v['max']:>10.1f}{v['spread']:>9.1%}{v['first_fifth']:>11.1f}"
            f"{v['last_fifth']:>10.1f}{v['trend']:>8.1%}  {'flat' if v['ok'] else 'NOT FLAT'}"
        )
    last = samples[-1]
    print(f"  at the end: running {last.running:g}, waiting {last.waiting:g}")
    problems += [f"{name} not flat" for name, v in verdicts.items() if not v["ok"]]
    if last.running != 0 or last.waiting != 0:
        problems.append(f"gauges not 0 at the end: running {last.running:g}, waiting {last.waiting:g}")
    return report | {"warmup_s": warmup, "verdicts": verdicts}, problems


# --------------------------------------------------------------------------------------- main

SCENARIOS = {"streams": run_streams, "leavers": run_leavers, "slowloris": run_slowloris, "soak": run_soak}


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="a running server to load instead of starting one")
    common.add_argument("--pid", type=int, help="with --url: the server's process id (/proc sampling)")
    common.add_argument("--api-key", help="sent as a Bearer token (a server with PENDRA_API_KEYS)")
    common.add_argument("--model", help="chat GGUF to serve (default: the Gemma 3 270M test model)")
    common.add_argument("--embed-model", help="embedding GGUF to serve (default: --model)")
    common.add_argument("--model-name", default="bench:chat", help="chat model name in requests")
    common.add_argument("--embed-model-name", default="bench:embed", help="embedding model name")
    common.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VAL",
        help="environment for the started server, e.g. PENDRA_MAX_QUEUE=32 (repeatable)",
    )
    common.add_argument("--n-ctx", type=int, default=1024, help="PENDRA_N_CTX of the started server")
    common.add_argument("--server-log", help="keep the started server's log here")
    common.add_argument("--start-timeout", type=float, default=180, help="seconds for the server to be ready")
    common.add_argument("--stop-timeout", type=float, default=60, help="seconds for it to exit on SIGTERM")
    common.add_argument("--hang-s", type=float, default=120, help="no byte for this long: hung")
    common.add_argument("--backoff", type=float, default=1.0, help="a client's pause after a refusal")
    common.add_argument("--seed", type=int, default=1)
    common.add_argument("--out", help="JSON result file (default: load-<subcommand>-<time>.json)")

    top = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("streams", parents=[common], help="E1: many concurrent streaming chats")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--grace", type=float, help="seconds after --duration for the last answers (default --hang-s)"
    )
    p = sub.add_parser("leavers", parents=[common], help="E3: clients gone after their first token")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=256, help="what each stream would generate")
    p.add_argument("--limit-s", type=float, default=1.0, help="gauges back to 0 within this")
    p.add_argument("--settle-s", type=float, default=30, help="longest wait for the gauges")
    p.add_argument("--poll-s", type=float, default=0.05, help="/metrics polling interval")
    p.add_argument("--rounds", type=int, default=1)
    p = sub.add_parser("slowloris", parents=[common], help="E5: slow header senders beside normal clients")
    p.add_argument("--sockets", type=int, default=200)
    p.add_argument("--byte-every", type=float, default=4)
    p.add_argument("--duration", type=float, default=60, help="seconds of the attack phase")
    p.add_argument("--baseline-s", type=float, default=30, help="seconds of the baseline phase")
    p.add_argument("--normal-clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--reconnect", action="store_true", help="a closed slow socket opens another")
    p.add_argument("--receive-timeout-s", type=float, help="the server's (default: from --server-env, or 30)")
    p.add_argument("--max-slowdown", type=float, default=2.0, help="e2e p50 attack/baseline limit")
    p = sub.add_parser("soak", parents=[common], help="E4: steady open-loop load, process figures sampled")
    p.add_argument("--duration", type=float, default=1800)
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (open loop)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--embed-every", type=int, default=10, help="every Nth request embeds (0: none)")
    p.add_argument("--sample-s", type=float, default=10)
    p.add_argument("--warmup-s", type=float, default=120)
    p.add_argument("--tolerance", type=float, default=0.10, help="max vs min spread allowed")
    p.add_argument("--trend-tol", type=float, default=0.05, help="last vs first fifth rise allowed")
    p.add_argument(
        "--count-slack", type=float, default=4, help="fds/threads: a spread this small passes (trend: half)"
    )
    p.add_argument(
        "--grace", type=float, help="seconds after --duration for the last answers (default --hang-s)"
    )
    p.add_argument("--csv", help="samples as CSV (default: --out with .csv)")
    return top


def main() -> None:
    top = parser()
    args = top.parse_args()
    if args.command == "soak" and args.url and not args.pid:
        top.error("soak with --url needs --pid (the server's process, for /proc)")
    if getattr(args, "grace", None) is None:
        args.grace = args.hang_s
    args.out = args.out or f"load-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    raise_fd_limit()
    started = time.time()
    with target(args) as t:
        gauges = asyncio.run(warm_up(t, embeddings=args.command == "soak"))
        print(f"server {t.url} (pid {t.pid}); KV cells {gauges.kv_cells:g}; env {t.env or '(not ours)'}")
        before = proc_now(t)
        report, problems = asyncio.run(SCENARIOS[args.command](args, t))
        after = proc_now(t)
    if not t.clean_exit:
        problems.append(f"the server did not stop cleanly on SIGTERM: {t.shutdown}")
    report = {
        "subcommand": args.command,
        "args": {k: v for k, v in vars(args).items() if k != "api_key"},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "server": {"url": t.url, "pid": t.pid, "env": t.env, "shutdown": t.shutdown},
        "process_before": before,
        "process_after": after,
        **report,
        "passed": not problems,
        "problems": problems,
    }
    Path(args.out).write_text(json.dumps(plain(report), indent=1, default=str) + "\n")
    if t.shutdown:
        print(f"server stopped: exit {t.shutdown['exit_code']} after {t.shutdown['seconds']} s")
    print(f"\n{'PASS' if not problems else 'FAIL: ' + '; '.join(problems)}   (results: {args.out})")
    sys.exit(0 if not problems else 1)


if __name__ == "__main__":
    main()
