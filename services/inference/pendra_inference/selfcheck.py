"""Prove, before serving, that this host can run the llama.cpp build: a tiny decode in a child.

A llama.cpp build that uses an instruction the CPU or OS refuses (AMX in a VM that reports it,
AVX-512 on an older CPU) does not fail politely: the process dies of SIGILL on the first
request. So `pendra serve` and the inference service run `python -m pendra_inference.selfcheck`
first. The child loads the backends as the server will (`backends.activate`), writes a tiny
llama-architecture GGUF with Q8_0 weights (so quantized matrix kernels run), offloads it to the
GPU when there is one, decodes a few tokens and prints its report as JSON. If it dies, the
parent raises a `BackendError` that names the signal, the likely cause and the fix, and the
server never starts. `pendra doctor` shows the same report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pendra_shared.config import Settings, load_settings

from pendra_inference.backends import BackendError, signal_name

REBUILD = (
    "rebuild llama.cpp for this host: `python3 scripts/llama_build.py sync` in a Pendra checkout "
    "(add --gpu cpu to leave the GPU out), or use the image that matches it"
)


@dataclass
class SelfCheck:
    report: dict[str, Any]  # backends.BackendReport.as_dict()
    tokens: int
    seconds: float
    gpu_layers: int


def write_probe_model(path: Path) -> Path:
    """A tiny but complete llama GGUF: one block, 64-wide, Q8_0 matrices, a byte-level vocab."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    n_embd, n_ff, n_head = 64, 128, 2
    tokens = [b"<unk>", b"<s>", b"</s>", *(f"<0x{i:02X}>".encode() for i in range(256))]
    tokens += [f"p{i}".encode() for i in range(320 - len(tokens))]
    types = [2, 3, 3, *([6] * 256), *([1] * (320 - 259))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("pendra self-check")
    writer.add_context_length(256)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    ones = np.ones(n_embd, dtype=np.float32)
    writer.add_tensor(
        "token_embd.weight", (rng.standard_normal((len(tokens), n_embd)) * 0.1).astype(np.float32)
    )
    writer.add_tensor("output_norm.weight", ones)
    matrix("output.weight", len(tokens), n_embd)
    writer.add_tensor("blk.0.attn_norm.weight", ones)
    writer.add_tensor("blk.0.ffn_norm.weight", ones)
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        matrix(f"blk.0.{name}.weight", n_embd, n_embd)
    matrix("blk.0.ffn_gate.weight", n_ff, n_embd)
    matrix("blk.0.ffn_up.weight", n_ff, n_embd)
    matrix("blk.0.ffn_down.weight", n_embd, n_ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _child(cpu_variant: str | None) -> dict[str, Any]:
    """Runs in the child: load the backends, decode the probe model, return the facts."""
    from pendra_inference.backends import activate

    report = activate(cpu_variant)
    from llama_cpp import Llama

    gpu_layers = -1 if report.gpu_devices else 0
    with tempfile.TemporaryDirectory(prefix="pendra-selfcheck-") as tmp:
        path = write_probe_model(Path(tmp) / "probe.gguf")
        started = time.perf_counter()
        llm = Llama(str(path), n_ctx=256, n_batch=64, n_gpu_layers=gpu_layers, verbose=False)
        llm.eval(llm.tokenize(b"pendra self-check"))  # a prompt batch, then one decode a token
        tokens = 0
        for _ in range(8):
            llm.eval([llm.sample(temp=0.0)])
            tokens += 1
        llm.close()
        seconds = time.perf_counter() - started
    return {"report": report.as_dict(), "tokens": tokens, "seconds": seconds, "gpu_layers": gpu_layers}


def run_selfcheck(
    settings: Settings, timeout_s: float = 180.0, command: list[str] | None = None
) -> SelfCheck:
    """Run the self-check in a child process (`command`, default this module); a failure is a
    BackendError naming the cause and the fix."""
    command = command or [sys.executable, "-m", "pendra_inference.selfcheck"]
    if settings.cpu_variant:
        command = [*command, "--cpu-variant", settings.cpu_variant]
    try:
        child = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy()
        )
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"llama.cpp's self-check did not finish in {timeout_s:.0f} s") from exc
    if child.returncode < 0:
        raise BackendError(_crash_message(-child.returncode))
    if child.returncode != 0:
        lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit status {child.returncode}"
        raise BackendError(f"llama.cpp cannot run on this host: {detail}; {REBUILD}")
    data = json.loads(child.stdout.strip().splitlines()[-1])
    return SelfCheck(data["report"], data["tokens"], data["seconds"], data["gpu_layers"])


def _crash_message(signum: int) -> str:
    name = signal_name(signum)
    if name == "SIGILL":
        cause = (
            "this llama.cpp build uses a CPU instruction that this CPU or its OS does not allow "
            "(typical: a build made with -march=native on another machine, or AMX in a VM that "
            "reports it but does not enable it)"
        )
    elif name in ("SIGSEGV", "SIGBUS", "SIGABRT"):
        cause = (
            "llama.cpp crashed loading or decoding a tiny model (a GPU driver or runtime library "
            "that does not match the build?)"
        )
    else:
        cause = "llama.cpp was killed during its self-check"
    return f"llama.cpp died of {name} in its start-up self-check: {cause}; {REBUILD}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Decode a tiny model with this llama.cpp build.")
    parser.add_argument("--cpu-variant", default=None, help="default: the settings' (PENDRA_CPU_VARIANT)")
    ns = parser.parse_args(argv)
    try:
        result = _child(ns.cpu_variant or load_settings().cpu_variant or None)
    except BackendError as exc:
        sys.stderr.write(f"{exc}\n")
        return 3
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
