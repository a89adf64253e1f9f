"""Start the real `pendra serve` as a separate process on a free loopback port, and stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


def stop_process(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 20
) -> None:
    """Stop `proc` with `sig`, killing it when it has not ended after `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def set_options(path: Path, options: dict[str, Any]) -> None:
    """Set the `options` of a stored model's sidecar (what a user edits by hand)."""
    from pendra_shared.sidecar import read_sidecar, write_sidecar

    sidecar, problem = read_sidecar(path, path.stat().st_size)
    assert sidecar is not None, problem
    write_sidecar(path, sidecar.model_copy(update={"options": options}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT)


def start_server(
    env: dict[str, str], log_path: Path, *args: str, timeout_s: float = 60, ready_path: str = "/ready"
) -> ServerProcess:
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pendra", "serve", "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pendra serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}{ready_path}", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"pendra serve did not become ready:\n{server.log()}")
