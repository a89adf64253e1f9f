"""Multi-turn chats on a hybrid model (Qwen3.5/3.6's `qwen35`): time to first token per turn with
Pendra's recurrent-state checkpoints, with Pendra decoding every prompt whole, and with llama.cpp's
own llama-server (its context checkpoints), in one run.

Workload: --conversations conversations (8) of --turns turns (6), run at once, one client thread
each with its turns in order. Every conversation starts with the same system prompt of about 500
tokens (deterministic text); each turn appends a new user message of about 30 tokens (different per
conversation and turn) and resends the whole history to /v1/chat/completions (streaming,
max_tokens --tokens (32), temperature 0, `stream_options.include_usage`), then appends the answer
as the assistant message, as a chat client does. The Qwen3.5 template writes an earlier answer as
`<|im_start|>assistant\n{answer}` while the generation prompt ends `<|im_start|>assistant\n<think>\n`
(a real model's earlier thinking is dropped from the history), so a turn shares its prefix with
the previous turn's sequence only up to the start of the answer: a server restores a recurrent
state saved before that point and decodes the answer and the new message (about 80 tokens).

Time to first token: from sending a request to its first chunk with text; per turn index the
median over the conversations, and the median over all turns. Also printed: the wall time of the
workload, the mean prompt tokens and the sum of `usage.prompt_tokens_details.cached_tokens` per
turn, Pendra's checkpoint counters (/metrics), and the CPU seconds of the server, of this client and
of every other process during each workload (on a shared machine, other processes' load slows
llama.cpp's threads far more than their share: compare configurations only when it is near 0).

Model: a random-weight `qwen35` GGUF (Q8_0) with the real Qwen3.5 tokenizer and chat template,
written on the spot by the project's writer (`tests/support/hybrids.py`), in the --shape. Prefill
speed of a 500-token prompt, llama-bench pp500 on the 2-core development machine (AMD EPYC):

* small (default): n_embd 768, 8 layers (6 Gated DeltaNet, 2 attention), DeltaNet 4 query/key
  and 12 value heads of 64, FFN 2048: 900 tokens/s, about 0.55 s per 500 tokens, so prefill
  dominates a turn as with a real model.
* tiny: the tests' QWEN35_TINY (n_embd 64, 4 layers): 35,000 tokens/s (14 ms per 500 tokens);
  a turn is mostly fixed cost (HTTP, scheduling, the 248k-row output layer).
* medium: n_embd 1024, 16 layers, DeltaNet 8 query/key and 24 value heads of 64, FFN 3072: 236
  tokens/s (2.1 s per 500), for a faster machine.

Configurations, each a fresh server on a free loopback port with the same context per sequence
(--n-ctx) and the same threads (all usable cores):

* ckpt: `pendra serve` with its defaults for hybrid models (prefix cache on, checkpoint budget
  unset: two checkpoints per sequence id), PENDRA_PARALLEL=--conversations.
* full: the same with PENDRA_PREFIX_CACHE=false: every prompt is decoded whole.
* llama-server: `-np N -c N*n_ctx -t T -tb T`, all else its defaults (32 context checkpoints per
  slot, prompt cache in RAM, `cache_prompt`, split KV). Requests to both servers add
  `"reasoning_format": "none"`, so the text written after the template's `<think>` comes back as
  `content` (the default would move it to `reasoning_content`); that format also puts the prompt's
  own `<think>\n` back in front of the answer, which the client drops, so the histories are built
  the same way for both servers. Its binary: --llama-server, or
  ../shared/tools/build-llama-server.sh (the llama.cpp that llama-cpp-python vendors).

Each server gets one short warm-up request (another prompt) before the workload. Ratios:
ckpt / llama-server and ckpt / full (below 1: Pendra with checkpoints answers sooner).

    uv run --no-sync python bench/bench_multiturn.py [--shape small] [--configs ckpt,full,llama-server]
        [--conversations 8] [--turns 6] [--tokens 32] [--n-ctx 2048] [--llama-server PATH]

The answers are random-weight text and the servers may answer differently (their batches
differ), so the histories, and the prompt tokens printed per configuration, may differ a little.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pendra_inference.gguf_hybrid import QWEN35_TINY, HybridShape

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._load_clients import descendants, parse_metrics, prose  # noqa: E402
from bench.bench_concurrency import CORES, HEADERS, llama_server, pendra, ratio, take_usage  # noqa: E402
from bench.bench_inference import peer_binary  # noqa: E402
from tests.support.hybrids import write_hybrid  # noqa: E402

SHAPES = {
    "tiny": QWEN35_TINY,
    "small": HybridShape(
        n_embd=768, n_layer=8, n_head=12, n_head_kv=2, head_dim=64, n_ff=2048,
        linear_k_heads=4, linear_v_heads=12, linear_head_dim=64,
    ),
    "medium": HybridShape(
        n_embd=1024, n_layer=16, n_head=16, n_head_kv=4, head_dim=64, n_ff=3072,
        linear_k_heads=8, linear_v_heads=24, linear_head_dim=64,
    ),
}  # fmt: skip
CONFIGS = ("ckpt", "full", "llama-server")
MODEL = "bench:chat"
SYSTEM_WORDS = 440  # about 500 Qwen tokens of `prose`
USER_WORDS = 24  # about 30
THINK = "<think>\n"  # the end of the Qwen3.5 template's generation prompt
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --------------------------------------------------------------------------------------- workload


def system_prompt() -> str:
    rng = random.Random(20250611)
    return (
        "You are the assistant of the Harbour Town Public Library. Answer briefly, using only the "
        f"notes below.\n\n{prose(rng, SYSTEM_WORDS)}"
    )


def user_message(conversation: int, turn: int) -> str:
    rng = random.Random(1000 * conversation + turn)
    return f"Question {turn + 1}: {prose(rng, USER_WORDS)}"


@dataclass
class Turn:
    """One turn as the client saw it; times in seconds."""

    ttft: float = math.nan
    latency: float = math.nan
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    completion_tokens: int = 0
    text: str = ""


@dataclass
class Cpu:
    """CPU seconds during a workload: the server's (with its children), this client's, and every
    other process's on the machine (from /proc/stat), against the wall time."""

    server: float = math.nan
    client: float = math.nan
    others: float = math.nan


@dataclass
class Run:
    """One configuration's workload: turns[conversation][turn]."""

    turns: list[list[Turn]]
    wall: float
    cpu: Cpu = field(default_factory=Cpu)
    counters: dict[str, float] = field(default_factory=dict)  # Pendra's checkpoint counters

    def at(self, turn: int) -> list[Turn]:
        return [conversation[turn] for conversation in self.turns if len(conversation) > turn]

    def ttft(self, turn: int | None = None) -> float:
        """Median time to first token of one turn index over the conversations, or of all turns."""
        turns = [t for c in self.turns for t in c] if turn is None else self.at(turn)
        values = [t.ttft for t in turns if not math.isnan(t.ttft)]
        return statistics.median(values) if values else math.nan

    def prompt_tokens(self, turn: int | None = None) -> float:
        turns = [t for c in self.turns for t in c] if turn is None else self.at(turn)
        return statistics.fmean(t.prompt_tokens for t in turns) if turns else math.nan

    def cached(self, turn: int | None = None) -> int | None:
        turns = [t for c in self.turns for t in c] if turn is None else self.at(turn)
        values = [t.cached_tokens for t in turns if t.cached_tokens is not None]
        return sum(values) if values else None


def request(http: httpx.Client, url: str, messages: list[dict[str, str]], tokens: int) -> Turn:
    """Send one streaming chat completion; time its first text and read its usage."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body["reasoning_format"] = "none"  # both servers: the whole answer as `content`
    turn = Turn()
    parts: list[str] = []
    start = time.perf_counter()
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: error in stream: {chunk['error']}")
            take_usage(turn, chunk.get("usage"))
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
                if (text or delta.get("reasoning_content")) and math.isnan(turn.ttft):
                    turn.ttft = time.perf_counter() - start
                parts.append(text)
    turn.latency = time.perf_counter() - start
    turn.text = "".join(parts)
    return turn


def conversation(
    url: str, index: int, args: argparse.Namespace, go: threading.Barrier, out: list[Turn]
) -> None:
    messages = [{"role": "system", "content": system_prompt()}]
    with httpx.Client(timeout=httpx.Timeout(900, connect=60), headers=HEADERS) as http:
        go.wait()
        for turn in range(args.turns):
            messages.append({"role": "user", "content": user_message(index, turn)})
            got = request(http, url, messages, args.tokens)
            out.append(got)
            # The "none" format puts the prompt's own opening `<think>\n` back in front of the
            # answer; the history gets the generated text alone.
            answer = got.text.removeprefix(THINK)
            messages.append({"role": "assistant", "content": answer})


def listener(url: str) -> int | None:
    """The pid of the server process started with `--port <url's port>`."""
    port = url.rsplit(":", 1)[1].encode()
    for entry in os.listdir("/proc"):
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if entry.isdigit() else []
        except OSError:
            continue
        if any(a == b"--port" and b == port for a, b in zip(args, args[1:], strict=False)):
            return int(entry)
    return None


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of `pid` and its descendants; nan when it cannot be read."""
    total = 0
    for each in [pid, *descendants(pid)] if pid is not None else []:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS if pid is not None else math.nan


def machine_busy() -> float:
    """CPU seconds every process on the machine has spent, from /proc/stat (all but idle, iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / TICKS


def workload(url: str, args: argparse.Namespace) -> Run:
    """All conversations at once, one thread each; re-raises the first client's failure."""
    with httpx.Client(timeout=300, headers=HEADERS) as http:  # warm up (loads Pendra's model)
        request(http, url, [{"role": "user", "content": "Say hello."}], 4)
    results: list[list[Turn]] = [[] for _ in range(args.conversations)]
    errors: list[BaseException] = []
    go = threading.Barrier(args.conversations + 1)

    def client(index: int) -> None:
        try:
            conversation(url, index, args, go, results[index])
        except BaseException as exc:  # reported after the others finish
            errors.append(exc)
            go.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.conversations)]
    for thread in threads:
        thread.start()
    pid = listener(url)
    go.wait()
    start = time.perf_counter()
    before = (cpu_seconds(pid), time.process_time(), machine_busy())
    for thread in threads:
        thread.join()
    after = (cpu_seconds(pid), time.process_time(), machine_busy())
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    server, mine = after[0] - before[0], after[1] - before[1]
    others = max(0.0, after[2] - before[2] - server - mine)  # (clock ticks: may round below 0)
    return Run(results, wall, Cpu(server, mine, others))


def checkpoint_counters(url: str) -> dict[str, float]:
    """Pendra's pendra_checkpoints_total by event (saved, restored, evicted) for the model."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    return {
        labels.get("event", "?"): value
        for name, labels, value in parse_metrics(text)
        if name == "pendra_checkpoints_total" and labels.get("model_name") == MODEL
    }


# --------------------------------------------------------------------------------------- report


def seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.0f}"


def report(runs: dict[str, Run], args: argparse.Namespace, model: Path) -> None:
    names = [c for c in CONFIGS if c in runs]
    print(
        f"\n== {args.conversations} conversations x {args.turns} turns, shared system prompt, "
        f"max_tokens {args.tokens}, temperature 0; {model.name} ({args.shape}); {CORES} threads =="
    )
    head = f"{'turn':>5} | " + "".join(f"{n:>13}" for n in names)
    ratios = [(a, b) for a, b in (("ckpt", "llama-server"), ("ckpt", "full")) if a in runs and b in runs]
    head += " | " + "".join(f"{a + '/' + b:>18}" for a, b in ratios)
    print(f"{'':>5} | {'TTFT ms, median of the conversations':<{13 * len(names)}} |")
    print(head)
    print("-" * len(head))
    for turn in [*range(args.turns), None]:
        label = "all" if turn is None else str(turn + 1)
        row = f"{label:>5} | " + "".join(f"{seconds(runs[n].ttft(turn)):>13}" for n in names)
        row += " | " + "".join(f"{ratio(runs[a].ttft(turn), runs[b].ttft(turn)):>18}" for a, b in ratios)
        print(row)
    print(f"{'wall':>5} | " + "".join(f"{runs[n].wall:>12.1f}s" for n in names))
    print(
        f"\nCPU seconds during each workload (server / this client / every other process; "
        f"{CORES} cores x wall is the most there is):"
    )
    for n in names:
        cpu, wall = runs[n].cpu, runs[n].wall
        print(
            f"  {n:<13} {cpu.server:7.1f} / {cpu.client:5.1f} / {cpu.others:7.1f}   "
            f"(of {CORES * wall:.1f}; others {cpu.others / (CORES * wall):.0%} of the machine)"
        )

    print("\nprompt tokens per turn (mean) / cached tokens (sum over the conversations, from usage):")
    head = f"{'turn':>5} | " + "".join(f"{n:>20}" for n in names)
    print(head)
    print("-" * len(head))
    for turn in [*range(args.turns), None]:
        label = "all" if turn is None else str(turn + 1)
        cells = []
        for n in names:
            cached = runs[n].cached(turn)
            cells.append(f"{runs[n].prompt_tokens(turn):.0f} / {'n/a' if cached is None else cached}")
        print(f"{label:>5} | " + "".join(f"{cell:>20}" for cell in cells))
    for n in names:
        counters = runs[n].counters
        if counters:
            shown = ", ".join(f"{k} {v:.0f}" for k, v in sorted(counters.items()))
            print(f"{n}: checkpoints {shown}")
    generated = {n: sum(t.completion_tokens for c in runs[n].turns for t in c) for n in names}
    print("completion tokens: " + ", ".join(f"{n} {g}" for n, g in generated.items()))
    print("ratio = first / second time to first token (below 1: the first is faster)")


# --------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join((__doc__ or "").split("\n\n")[0].split()))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="the model's size")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which of ckpt,full,llama-server")
    parser.add_argument("--conversations", type=int, default=8, help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=6, help="turns per conversation")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens per answer")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context per sequence")
    parser.add_argument("--llama-server", help="llama-server binary (default: the ../shared build)")
    parser.add_argument("--keep-model", help="the model file: used if it exists, else written there and kept")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs: {', '.join(sorted(unknown))}")
    peer = peer_binary(args.llama_server) if "llama-server" in configs else None

    from pendra_shared.store import ModelStore

    runs: dict[str, Run] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pendra-multiturn-") as tmp_name:
        tmp = Path(tmp_name)
        model = Path(args.keep_model) if args.keep_model else tmp / f"qwen35-{args.shape}.gguf"
        if not model.exists():
            write_hybrid(model, "qwen35", SHAPES[args.shape])
        print(
            f"model {model} ({model.stat().st_size / 1e6:.0f} MB, shape {args.shape}), "
            f"llama-server {peer or '(not run)'}, {CORES} cores, n_ctx {args.n_ctx} per sequence",
            flush=True,
        )
        store = ModelStore(tmp / "models")
        store.import_file(model, name=MODEL, purpose="chat")
        base = {
            "PENDRA_MODELS_DIR": str(store.root),
            "PENDRA_CONFIG": str(tmp / "no-config.toml"),  # no config file: defaults and these
            "PENDRA_N_CTX": str(args.n_ctx),
            "PENDRA_KEEP_ALIVE": "-1",
            "PENDRA_MAX_LOADED_MODELS": "1",
            "PENDRA_PARALLEL": str(args.conversations),
        }
        for name in configs:
            if name == "llama-server":
                assert peer is not None
                flags = ["-np", str(args.conversations), "-c", str(args.conversations * args.n_ctx)]
                with llama_server(peer, model, flags, tmp, "multiturn") as url:
                    runs[name] = workload(url, args)
            else:
                env = {**base, "PENDRA_PREFIX_CACHE": "true" if name == "ckpt" else "false"}
                print(f"  [pendra {name}] PENDRA_PREFIX_CACHE={env['PENDRA_PREFIX_CACHE']}", flush=True)
                with pendra(env, tmp / f"pendra-{name}.log") as url:
                    runs[name] = workload(url, args)
                    runs[name].counters = checkpoint_counters(url)
            cpu = runs[name].cpu
            print(
                f"    {name}: wall {runs[name].wall:.1f} s, TTFT median {seconds(runs[name].ttft())} ms, "
                f"CPU s: server {cpu.server:.1f}, client {cpu.client:.1f}, other processes {cpu.others:.1f}",
                flush=True,
            )
    report(runs, args, model)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
