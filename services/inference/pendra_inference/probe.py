"""Load an untrusted GGUF in a child process first, so a file that crashes llama.cpp marks the model
invalid instead of killing the server.

llama.cpp aborts (GGML_ASSERT), divides by zero or reads out of bounds on some inputs that are
structurally valid GGUF (inconsistent hyperparameters, for one), and in-process that kills every
request the server is serving. So before the registry loads a file that no pinned catalogue
install verified (hand-dropped, imported, or changed since it was verified), it runs
`python -m pendra_inference.probe`, a fresh interpreter, never a fork of the server. The child
loads the file through `LlamaEngine` with the registry's own `EngineConfig` (same GPU layers,
context, batch, threads; memory-mapped), decodes one token (an embedding model embeds one input)
and exits 0. The parent maps what happened to a `ProbeResult`:

- exit 0: the file loads; the registry loads it in-process;
- death by a signal (SIGSEGV, SIGFPE, SIGABRT, SIGBUS, ...): "llama.cpp crashed loading it: SIGABRT
  (the assertion it printed)";
- a clean error: "llama.cpp could not load it: (its last error line)";
- killed from outside (SIGKILL: the OOM killer?): refused for now, not remembered on disk;
- no answer within `probe_timeout_s`: the child is killed and the file is refused for now.

The child loads the CPU variant its parent serves with (`--cpu-variant`), never a choice of its
own. The parent passes the file as an inherited descriptor where it can (`/proc/self/fd/N`), so the
child probes the very file the registry then loads, even if its name is replaced meanwhile.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pendra_inference.backends import FAULT_SIGNALS, activate, signal_name
from pendra_inference.engine import EngineConfig

CHILD_FAILED = 3  # the child's exit status for a clean load or decode error
LOG_TAIL_BYTES = 8 * 1024  # of the child's output, kept for the reason
_CAUSE_RE = re.compile(r"GGML_ASSERT|GGML_ABORT|error loading model|terminate called|what\(\)")
_DETAIL_RE = re.compile(r"error|failed|exception", re.IGNORECASE)


@dataclass(frozen=True)
class ProbeResult:
    """`reason` is None when the file loaded. `lasting`: the failure is the file's own (a crash or
    a load error), so it holds until the file changes; a timeout or an outside kill may not."""

    reason: str | None
    seconds: float
    lasting: bool = True

    @property
    def ok(self) -> bool:
        return self.reason is None


def probe(
    path: Path,
    config: EngineConfig,
    *,
    timeout_s: float,
    pass_fds: tuple[int, ...] = (),
    command: list[str] | None = None,
    projector: Path | None = None,
) -> ProbeResult:
    """Load `path` with `config` and decode one token in a child process (`command`, default this
    module); with `projector`, also load that vision projector and encode one small image with it.
    Blocks; run it in a thread."""
    command = command or [sys.executable, "-m", "pendra_inference.probe"]
    argv = [*command, "--path", str(path), "--config", json.dumps(dataclasses.asdict(config))]
    if projector is not None:
        argv += ["--projector", str(projector)]
    variant = activate().cpu_variant  # the child loads what this process serves with
    if variant:
        argv += ["--cpu-variant", variant]
    # An abort must not make ggml attach gdb to print a backtrace (it does when gdb is installed).
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    started = time.monotonic()
    with tempfile.TemporaryFile(prefix="pendra-probe-") as log:
        try:
            child = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                env=env,
                pass_fds=pass_fds,
            )
        except subprocess.TimeoutExpired:  # run() has killed the child
            return ProbeResult(
                f"loading it took longer than {timeout_s:g} s in the probe (PENDRA_PROBE_TIMEOUT_S); "
                "refused for now",
                time.monotonic() - started,
                lasting=False,
            )
        log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
        tail = log.read().decode("utf-8", errors="replace")
    seconds = time.monotonic() - started
    code = child.returncode
    if code == 0:
        return ProbeResult(None, seconds)
    detail = _detail(tail)
    if code < 0:
        name = signal_name(-code)
        if name not in FAULT_SIGNALS:  # killed from outside: the OOM killer, an operator
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            return ProbeResult(f"the load probe was killed by {name}{hint}", seconds, lasting=False)
        reason = f"llama.cpp crashed loading it: {name}" + (f" ({detail})" if detail else "")
        return ProbeResult(reason, seconds)
    if code == CHILD_FAILED:
        # Running out of memory (host or GPU) says nothing about the file: try again later.
        short = next((line for line in tail.splitlines() if RESOURCE_FAILURE.search(line)), None)
        if short is not None:
            return ProbeResult(f"out of memory loading it ({short.strip()[:200]})", seconds, lasting=False)
        return ProbeResult(f"llama.cpp could not load it: {detail or 'no reason given'}", seconds)
    return ProbeResult(
        f"the load probe failed (exit status {code}){': ' + detail if detail else ''}", seconds, lasting=False
    )


RESOURCE_FAILURE = re.compile(
    r"failed to allocate|out of memory|cudaMalloc|ErrorOutOfDeviceMemory|cannot allocate memory",
    re.IGNORECASE,
)


def _detail(output: str) -> str:
    """The last line of the child's output that looks like the cause, shortened."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    causes = [line for line in lines if _CAUSE_RE.search(line)]
    causes = causes or [line for line in lines if _DETAIL_RE.search(line)]
    line = (causes or lines or [""])[-1]
    line = re.sub(r"^\S*/(\S+:\d+: )", r"\1", line)  # the build's source path says nothing useful
    return re.sub(r"\s+", " ", line)[:300]


# -- the child ---------------------------------------------------------------------------------


class _Loud:
    """Stands in for llama-cpp-python's suppress_stdout_stderr, which sends the loader's own
    error lines (and GGML_ASSERT's message) to /dev/null; the probe wants them."""

    def __init__(self, disable: bool = True) -> None:
        self.disable = disable

    def __enter__(self) -> _Loud:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _child(path: Path, config: dict[str, Any], recent: deque[str], projector: Path | None = None) -> None:
    import llama_cpp
    import llama_cpp._internals
    import llama_cpp.llama

    from pendra_inference.engine import LlamaEngine

    for module in (llama_cpp._internals, llama_cpp.llama):
        setattr(module, "suppress_stdout_stderr", _Loud)  # noqa: B010 (a typed module's attribute)

    # llama-cpp-python drops the loader's error lines (it maps ggml's log levels wrongly); keep the
    # last few, to say why on a clean failure.
    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def keep(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        recent.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    engine = LlamaEngine(path, EngineConfig(**config))
    try:
        tokens = engine.tokenize("Hello", add_bos=True)[:8] or [0]
        if engine.config.embedding:
            engine.embed([tokens])
        else:
            engine.llm.eval(tokens)
        if projector is not None:
            _encode_one_image(projector, engine)
    finally:
        engine.close()


def _encode_one_image(path: Path, engine: Any) -> None:
    """Load the projector beside the model and encode a small grey picture with it (a projector
    the server would refuse anyway passes: it is never loaded)."""
    from llama_cpp import mtmd_cpp

    from pendra_inference.vision import Picture, Projector, ProjectorRefused

    try:
        projector = Projector(
            path,
            engine.model,
            engine.n_embd,
            n_threads=engine.config.n_threads or 1,
            gpu=engine.config.n_gpu_layers != 0,
        )
    except ProjectorRefused:
        return
    try:
        picture = Picture(32, 32, bytes([128]) * 32 * 32 * 3, bytes(32))
        _, images = projector.tokenize(projector.marker, [picture])
        for image in images:
            if mtmd_cpp.mtmd_encode_chunk(projector.ctx, image.chunk) != 0:
                raise RuntimeError("the projector could not encode an image")
    finally:
        projector.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load a GGUF with llama.cpp and decode one token.")
    parser.add_argument("--path", required=True, help="the GGUF (or /proc/self/fd/N)")
    parser.add_argument("--config", required=True, help="the registry's EngineConfig as JSON")
    parser.add_argument("--cpu-variant", default=None, help="the CPU variant the parent serves with")
    parser.add_argument("--projector", default=None, help="a vision projector to load beside it")
    ns = parser.parse_args(argv)
    recent: deque[str] = deque(maxlen=40)
    try:
        activate(ns.cpu_variant)
        _child(Path(ns.path), json.loads(ns.config), recent, Path(ns.projector) if ns.projector else None)
    except Exception as exc:  # a clean failure: what llama.cpp logged last, then the exception
        sys.stderr.write("".join(recent) + f"\nerror: {type(exc).__name__}: {exc}\n")
        return CHILD_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
