"""Several inference services behind one api, as compose.replicas.yaml runs them: each inference
process and the api started with the command and environment compose gives them, on loopback
ports, over one model store. For the routing tests and bench/bench_routing.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.engines import RedisServer
from tests.support.server import free_port, stop_process
from tests.support.stack import service_process


@dataclass
class Process:
    name: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)


@dataclass
class Replicas:
    """`n` inference processes and an api routing between them."""

    workdir: Path
    store: Path
    redis: RedisServer
    n: int = 3
    inference_env: dict[str, str] = field(default_factory=dict)
    api_env: dict[str, str] = field(default_factory=dict)
    inference: list[Process] = field(default_factory=list)
    api: Process | None = None

    def variables(self) -> dict[str, str]:
        return {"PENDRA_REDIS_PASSWORD": self.redis.password, "PENDRA_GRAFANA_PASSWORD": "-"}

    def spawn(self, process: Process, service: str, env: dict[str, str]) -> None:
        mapping = {f"redis://:{self.redis.password}@redis:6379/0": self.redis.url, "0.0.0.0": "127.0.0.1"}
        command, base = service_process(service, self.variables(), mapping)
        base.update(PENDRA_MODELS_DIR=str(self.store), PENDRA_PORT=str(process.port), **env)
        with process.log_path.open("ab") as log:
            process.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HOME": str(self.workdir), **base},
            )

    def start_inference(self, i: int, wait: bool = True) -> Process:
        process = self.inference[i]
        self.spawn(process, "inference", {"PENDRA_KEEP_ALIVE": "-1", **self.inference_env})
        if wait:
            wait_ready(process)
        return process

    def start(self) -> Replicas:
        self.inference = [
            Process(f"inference-{i}", free_port(), self.workdir / f"inference-{i}.log") for i in range(self.n)
        ]
        for i in range(self.n):
            self.start_inference(i, wait=False)
        for process in self.inference:
            wait_ready(process)
        self.api = Process("api", free_port(), self.workdir / "api.log")
        urls = ",".join(p.url for p in self.inference)
        self.spawn(self.api, "api", {"PENDRA_INFERENCE_URL": urls, **self.api_env})
        wait_ready(self.api)
        return self

    def stop(self) -> None:
        for process in [*([self.api] if self.api else []), *self.inference]:
            process.stop()

    def logs(self) -> str:
        every = [*([self.api] if self.api else []), *self.inference]
        polls = re.compile(r'"GET /(status|metrics|ready) HTTP')
        quiet = ["\n".join(line for line in p.log().splitlines() if not polls.search(line)) for p in every]
        return "\n".join(f"--- {p.name}\n{text[-4000:]}" for p, text in zip(every, quiet, strict=True))


def wait_ready(process: Process, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.log()}")
        try:
            if httpx.get(f"{process.url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{process.name} did not become ready:\n{process.log()}")
