"""Prove that this host runs the llama.cpp build with one CPU variant: a decode in a child process.

A llama.cpp build that uses an instruction the CPU or OS refuses (AMX in a VM that reports it,
AVX-512 on an older CPU) does not fail politely: the process dies of SIGILL on the first request.
So before anything loads llama.cpp for serving, `python -m pendra_inference.selfcheck
--cpu-variant NAME` runs in a child:

1. it loads the backends as a server does, with that CPU variant (`backends.activate`);
2. it writes the self-check model (`gguf_writer.SELFCHECK_MODEL`: Q4_K, Q6_K, Q8_0, F16, BF16,
   Q4_0 and MXFP4 matrices, in attention and mixture-of-experts layers, every dimension one that
   llama.cpp's AMX and repacked kernels take) and loads it as serving does, so the weights land
   in the extra buffer types llama.cpp picks for this variant (AMX tiles, repacked blocks);
3. on the threads serving uses (at least two, so the thread pool's workers run kernels too) it
   decodes a prompt batch (matrix-matrix kernels, AMX tile code) and then single tokens
   (matrix-vector kernels), with and without flash attention, then offloaded to the GPU when
   there is one;
4. it prints its report as JSON: the build, where the weights went, the tokens it decoded.

`run_selfcheck` in the parent turns a death by a fault signal into `SelfCheckDied` (the variant
cannot run here: `cpu_choice` tries the next) and anything else that goes wrong into a
`BackendError` that names the cause.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pendra_shared import hostinfo

from pendra_inference.backends import FAULT_SIGNALS, BackendError, signal_name, usable_cores

REBUILD = (
    f"rebuild llama.cpp for this host: `{hostinfo.rebuild_command()}` in a Pendra checkout "
    "(add --gpu cpu to leave the GPU out), or use the image that matches it"
)
CHILD_REFUSED = 3  # the child's exit status for a clear BackendError
PROMPT = b"Pendra's self-check runs every kernel that serving runs, on this CPU, before it serves."
DECODE_TOKENS = 8
CPU_PASSES_DONE = "pendra-selfcheck: the CPU passes lived"
_BUFFER_RE = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")


@dataclass
class SelfCheck:
    report: dict[str, Any]  # backends.BackendReport.as_dict()
    tokens: int  # decoded one at a time, in each pass
    seconds: float
    gpu_layers: int
    weights_in: dict[str, float]  # llama.cpp's buffer types holding the weights: MiB in each
    threads: int
    prompt_tokens: int


class SelfCheckDied(BackendError):
    """The child died of a fault signal: llama.cpp cannot run here as it was loaded."""

    def __init__(self, variant: str | None, signal: str) -> None:
        super().__init__(crash_message(signal))
        self.variant = variant
        self.signal = signal


def serving_threads(configured: int | None = None) -> int:
    """The threads serving decodes on, and so the self-check: at least two, so that the thread
    pool's workers run kernels too."""
    return max(2, configured or usable_cores())


def _capture_buffers() -> tuple[dict[str, float], Any]:
    """Route llama.cpp's log through a callback that notes each model buffer's type and size
    (`CPU_REPACK model buffer size = 0.4 MiB`). Returns the dict it fills and the callback,
    which must stay referenced while llama.cpp may call it."""
    import llama_cpp

    sizes: dict[str, float] = {}

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        match = _BUFFER_RE.search(text.decode(errors="replace"))
        if match:
            sizes[match.group(1)] = sizes.get(match.group(1), 0.0) + float(match.group(2))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return sizes, callback


def _child(cpu_variant: str | None, threads: int) -> dict[str, Any]:
    """Runs in the child: load the backends, decode the self-check model, return the facts."""
    from pendra_inference.backends import activate

    report = activate(cpu_variant)
    from llama_cpp import Llama

    from pendra_inference.gguf_writer import write_selfcheck_model

    sizes, keep = _capture_buffers()
    gpu_layers = -1 if report.gpu_devices else 0
    # The CPU's kernels always (a partly offloaded model runs them), with flash attention and
    # without; the GPU's where there is one.
    passes = [(0, False), (0, True), *([(gpu_layers, False)] if gpu_layers else [])]
    weights_in: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pendra-selfcheck-") as tmp:
        path = write_selfcheck_model(Path(tmp) / "selfcheck.gguf")
        started = time.perf_counter()
        for layers, flash in passes:
            if layers:  # what dies from here on is the GPU's, not the CPU variant's
                sys.stderr.write(f"{CPU_PASSES_DONE}\n")
                sys.stderr.flush()
            sizes.clear()
            llm = Llama(
                str(path),
                n_ctx=512,
                n_batch=64,
                n_ubatch=64,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=layers,
                flash_attn=flash,
                verbose=False,
            )
            if layers == 0:
                weights_in = dict(sizes)
            prompt = llm.tokenize(PROMPT)
            llm.eval(prompt)  # batches of up to 64 tokens: matrix-matrix kernels, AMX tiles
            for _ in range(DECODE_TOKENS):  # one token a step: matrix-vector kernels
                llm.eval([llm.sample(temp=0.0)])
            llm.close()
        seconds = time.perf_counter() - started
    del keep
    return {
        "report": report.as_dict(),
        "tokens": DECODE_TOKENS,
        "seconds": seconds,
        "gpu_layers": gpu_layers,
        "weights_in": weights_in,
        "threads": threads,
        "prompt_tokens": len(prompt),
    }


def run_selfcheck(
    variant: str | None = None,
    *,
    threads: int | None = None,
    timeout_s: float = 180.0,
    command: list[str] | None = None,
) -> SelfCheck:
    """Run the self-check in a child process (`command`, default this module) with CPU variant
    `variant` (None: a build whose CPU backend is linked in). A death by a fault signal is
    `SelfCheckDied`; any other failure a BackendError naming the cause and the fix."""
    command = command or [sys.executable, "-m", "pendra_inference.selfcheck"]
    command = [*command, "--threads", str(serving_threads(threads))]
    if variant:
        command = [*command, "--cpu-variant", variant]
    # An abort must not make ggml attach gdb to print a backtrace (it does when gdb is installed).
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"llama.cpp's self-check did not finish in {timeout_s:.0f} s") from exc
    name = death_signal(child.returncode)
    if name is not None:
        if name not in FAULT_SIGNALS:
            raise BackendError(f"llama.cpp's self-check was killed by {name} (from outside: the OOM killer?)")
        if CPU_PASSES_DONE in child.stderr:  # the CPU variant ran everything; the GPU pass died
            raise BackendError(f"{crash_message(name)} (in its GPU pass, after the CPU's passes lived)")
        raise SelfCheckDied(variant, name)
    lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else f"exit status {child.returncode}"
    if child.returncode == CHILD_REFUSED:  # the child's own clear BackendError (a bad setting)
        raise BackendError(f"llama.cpp cannot run on this host: {detail}")
    if child.returncode != 0:
        raise BackendError(f"llama.cpp cannot run on this host: {detail}; {REBUILD}")
    try:
        data = json.loads(child.stdout.strip().splitlines()[-1])
        return SelfCheck(
            data["report"],
            data["tokens"],
            data["seconds"],
            data["gpu_layers"],
            data["weights_in"],
            data["threads"],
            data["prompt_tokens"],
        )
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"llama.cpp's self-check gave no report ({exc}); {REBUILD}") from exc


# Windows reports a crash as the exception's NTSTATUS in the exit code, not as a signal.
_NTSTATUS_SIGNALS = {
    0xC000001D: "SIGILL",  # STATUS_ILLEGAL_INSTRUCTION
    0xC0000096: "SIGILL",  # STATUS_PRIVILEGED_INSTRUCTION
    0xC0000005: "SIGSEGV",  # STATUS_ACCESS_VIOLATION
    0xC0000094: "SIGFPE",  # STATUS_INTEGER_DIVIDE_BY_ZERO
    0xC0000409: "SIGABRT",  # STATUS_STACK_BUFFER_OVERRUN (abort() and fast-fail)
}


def death_signal(returncode: int) -> str | None:
    """The signal a child died of, by its exit status (None: it exited)."""
    if returncode < 0:
        return signal_name(-returncode)
    if sys.platform == "win32":
        return _NTSTATUS_SIGNALS.get(returncode & 0xFFFFFFFF)
    return None


def crash_cause(name: str) -> str:
    """What a self-check child's death by signal `name` most likely means."""
    if name == "SIGILL":
        return (
            "this llama.cpp build uses a CPU instruction that this CPU or its OS does not allow "
            "(typical: a build made with -march=native on another machine, or AMX in a VM that "
            "reports it but does not enable it)"
        )
    if name in ("SIGSEGV", "SIGBUS", "SIGABRT"):
        return (
            "llama.cpp crashed loading or decoding a tiny model (a GPU driver or runtime library "
            "that does not match the build?)"
        )
    return "llama.cpp was killed during its self-check"


def crash_message(name: str) -> str:
    return f"llama.cpp died of {name} in its start-up self-check: {crash_cause(name)}; {REBUILD}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Decode a tiny model with this llama.cpp build.")
    parser.add_argument("--cpu-variant", default=None, help="the CPU variant to load")
    parser.add_argument("--threads", type=int, default=None, help="default: every usable core, at least 2")
    ns = parser.parse_args(argv)
    try:
        result = _child(ns.cpu_variant, serving_threads(ns.threads))
    except BackendError as exc:
        sys.stderr.write(f"{exc}\n")
        return CHILD_REFUSED
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
