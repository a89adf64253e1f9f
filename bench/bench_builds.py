"""Pendra's llama.cpp build (every CPU variant as a module, the best loaded at run time) next to a
native build of the same llama.cpp (`GGML_NATIVE=ON`: -march=native, tied to this CPU, with only
AMX switched off where the CPU reports it), on the same machine, in the same run.

Prints single-stream decode tokens/s and embeddings/s (one request of 256 inputs) for each build,
and the ratio to the native build. `--variants` adds runs of the project's build pinned to other
CPU variants (PENDRA_CPU_VARIANT), e.g. `haswell` to see what AVX-512 is worth here.

    uv run --no-sync python bench/bench_builds.py [--model PATH] [--runs 3] [--variants haswell,x64]

The native build is made once with uv (cached by its settings) into ~/.cache/pendra-bench.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_inference import chat_figures, embed_rate, gemma  # noqa: E402
from tests.support.server import start_server  # noqa: E402


def native_settings() -> dict[str, str]:
    settings = {"cmake.define.GGML_NATIVE": "ON", "cmake.define.LLAVA_BUILD": "OFF"}
    from pendra_shared.hostinfo import cpu_flags

    if "amx_tile" in cpu_flags():
        # -march=native would enable AMX; explicit -mno flags win over it in GCC and Clang.
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        settings |= {"cmake.define.CMAKE_C_FLAGS": no_amx, "cmake.define.CMAKE_CXX_FLAGS": no_amx}
    return settings


def native_build() -> Path:
    """llama-cpp-python, same version, built natively, in a folder of its own."""
    version = importlib.metadata.version("llama_cpp_python")
    settings = native_settings()
    key = hashlib.sha256(json.dumps([version, settings], sort_keys=True).encode()).hexdigest()[:12]
    target = Path.home() / ".cache" / "pendra-bench" / f"native-{version}-{key}"
    if not (target / "llama_cpp").is_dir():
        print(f"building llama-cpp-python {version} natively (minutes, once) into {target}", file=sys.stderr)
        args = [a for k, v in settings.items() for a in ("-C", f"{k}={v}")]
        # --no-config: the project's own build settings (pyproject.toml) must not be merged in.
        subprocess.run(
            ["uv", "pip", "install", "--no-config", "--python", sys.executable, "--target", str(target)]
            + ["--no-deps", "--no-binary", "llama-cpp-python", *args, f"llama-cpp-python=={version}"],
            check=True,
        )
    record = next(target.glob("llama_cpp_python-*.dist-info/uv_build.json"))
    built = json.loads(record.read_text())["config_settings"]
    if built != settings:
        sys.exit(f"the native build in {target} was built with {built}, not {settings}")
    return target


@dataclass
class Row:
    build: str
    variant: str
    tps: float
    eps: float


def measure(label: str, env: dict[str, str], store: Path, args: argparse.Namespace) -> Row:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(
            {
                "PENDRA_MODELS_DIR": str(store),
                "PENDRA_N_CTX": str(args.n_ctx),
                "PENDRA_KEEP_ALIVE": "-1",
                "PENDRA_MAX_LOADED_MODELS": "1",
                **env,
            },
            Path(tmp) / "serve.log",
            timeout_s=120,
        )
        try:
            health = httpx.get(f"{server.base_url}/health").json()
            _, tps = chat_figures(server.base_url, "bench:chat", args.tokens, args.runs)
            eps = embed_rate(server.base_url, "bench:embed", args.embed_batch, args.runs)
        finally:
            server.stop()
    return Row(label, health.get("cpu_variant") or "(linked in)", tps, eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", help="GGUF file (default: the Gemma 3 270M test model)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--variants", default="", help="more CPU variants of Pendra's build, comma-separated")
    args = parser.parse_args()
    model = Path(args.model) if args.model else gemma()
    native = native_build()

    from pendra_shared.store import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp) / "models")
        store.import_file(model, name="bench:chat")
        store.import_file(model, name="bench:embed", purpose="embedding")
        path = os.pathsep.join(filter(None, [str(native), os.environ.get("PYTHONPATH", "")]))
        rows = [
            measure("native (-march=native)", {"PYTHONPATH": path}, store.root, args),
            measure("pendra (all variants)", {}, store.root, args),
        ]
        for variant in filter(None, (v.strip() for v in args.variants.split(","))):
            rows.append(measure("pendra, pinned", {"PENDRA_CPU_VARIANT": variant}, store.root, args))

    base = rows[0]
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    print(f"model: {model.name}; CPU: {cpu}, {os.cpu_count()} threads; {args.runs} runs, medians")
    print(f"{'build':<26}{'variant':<16}{'decode tok/s':>13}{'ratio':>7}{'embeddings/s':>14}{'ratio':>7}")
    for row in rows:
        print(
            f"{row.build:<26}{row.variant:<16}{row.tps:>13.1f}{row.tps / base.tps:>7.2f}"
            f"{row.eps:>14.1f}{row.eps / base.eps:>7.2f}"
        )
    print("ratio = this build / the native build (higher is better)")


if __name__ == "__main__":
    main()
