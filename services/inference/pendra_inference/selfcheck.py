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

from pendra_shared import hostinfo
from pendra_shared.config import Settings

from pendra_inference.backends import BackendError, signal_name

REBUILD = (
    f"rebuild llama.cpp for this host: `{hostinfo.rebuild_command()}` in a Pendra checkout "
    "(add --gpu cpu to leave the GPU out), or use the image that matches it"
)


CHILD_REFUSED = 3  # the child's exit status for a clear BackendError


@dataclass
class SelfCheck:
    report: dict[str, Any]  # backends.BackendReport.as_dict()
    tokens: int
    seconds: float
    gpu_layers: int


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a llama-architecture model."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rope_base: float = 10000.0
    context: int = 256


PROBE = LlamaShape(n_embd=64, n_layer=1, n_head=2, n_head_kv=2, n_ff=128, n_vocab=320)


def write_llama_gguf(
    path: Path, shape: LlamaShape, *, name: str, weights: str = "q8_0", seed: int = 0
) -> Path:
    """A complete llama GGUF of `shape` with random weights and a byte-level vocabulary padded to
    `n_vocab`: matrices in `weights` ("q8_0", so quantized kernels run, or "f16"), embeddings tied
    to the output. The self-check's probe, and the real-model shapes the GPU tests and benchmark
    make where weights cannot be copied."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    f16 = weights == "f16"
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens = [b"<unk>", b"<s>", b"</s>", *(f"<0x{i:02X}>".encode() for i in range(256))]
    tokens += [f"w{i}".encode() for i in range(shape.n_vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3, *([6] * 256), *([1] * (len(tokens) - 259))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def random(rows: int, cols: int) -> Any:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float32)

    def matrix(tensor: str, rows: int, cols: int) -> None:
        data = random(rows, cols)
        if f16:
            writer.add_tensor(tensor, data.astype(np.float16))
        else:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(tensor, gguf.quants.quantize(data, q8), raw_dtype=q8)

    ones = np.ones(shape.n_embd, dtype=np.float32)
    kv = shape.n_head_kv * (shape.n_embd // shape.n_head)
    embeddings = random(shape.n_vocab, shape.n_embd)
    writer.add_tensor("token_embd.weight", embeddings.astype(np.float16) if f16 else embeddings)
    writer.add_tensor("output_norm.weight", ones)
    for i in range(shape.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        matrix(f"blk.{i}.attn_q.weight", shape.n_embd, shape.n_embd)
        matrix(f"blk.{i}.attn_k.weight", kv, shape.n_embd)
        matrix(f"blk.{i}.attn_v.weight", kv, shape.n_embd)
        matrix(f"blk.{i}.attn_output.weight", shape.n_embd, shape.n_embd)
        matrix(f"blk.{i}.ffn_gate.weight", shape.n_ff, shape.n_embd)
        matrix(f"blk.{i}.ffn_up.weight", shape.n_ff, shape.n_embd)
        matrix(f"blk.{i}.ffn_down.weight", shape.n_embd, shape.n_ff)
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
        path = write_llama_gguf(Path(tmp) / "probe.gguf", PROBE, name="pendra self-check")
        started = time.perf_counter()
        # The CPU's kernels always (a partly offloaded model runs them), the GPU's where there is one.
        for layers in sorted({0, gpu_layers}):
            llm = Llama(str(path), n_ctx=256, n_batch=64, n_gpu_layers=layers, verbose=False)
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
    lines = [line for line in child.stderr.strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else f"exit status {child.returncode}"
    if child.returncode == CHILD_REFUSED:  # the child's own clear BackendError (a bad setting)
        raise BackendError(f"llama.cpp cannot run on this host: {detail}")
    if child.returncode != 0:
        raise BackendError(f"llama.cpp cannot run on this host: {detail}; {REBUILD}")
    try:
        data = json.loads(child.stdout.strip().splitlines()[-1])
        return SelfCheck(data["report"], data["tokens"], data["seconds"], data["gpu_layers"])
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"llama.cpp's self-check gave no report ({exc}); {REBUILD}") from exc


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
        result = _child(ns.cpu_variant)  # None: activate() takes the settings' variant
    except BackendError as exc:
        sys.stderr.write(f"{exc}\n")
        return CHILD_REFUSED
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
