"""The service set as separate OS processes, started the way compose.yaml starts them.

Each service's `command` and `environment` are read from compose.yaml itself, its variables
interpolated as compose would, and the hostnames compose gives (redis:6379, minio:9000,
inference:8081, the /models volume) mapped to the loopback ports and directories of this test.
`EmbeddedStack` is the same surface served by `pendra serve` alone.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.engines import RedisServer, S3Server
from tests.support.server import ServerProcess, free_port, start_server, stop_process

ROOT = Path(__file__).resolve().parents[2]
_VAR_RE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's `!reset` tag (used by the CPU override file)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: (
        {"__override__": loader.construct_sequence(node, deep=True)}
        if isinstance(node, yaml.SequenceNode)
        else {"__override__": loader.construct_mapping(node, deep=True)}
    ),
)


def load_compose(*files: str) -> dict[str, Any]:
    """compose.yaml, merged with override files the way `docker compose -f a -f b` merges them
    for the keys Pendra uses (mappings merged, `!reset` removing a key, `!override` replacing
    one, a service's `extends` of another file's service resolved first)."""
    merged: dict[str, Any] = {}
    for name in files or ("compose.yaml",):
        with (ROOT / name).open(encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass
        for service in data.get("services", {}).values():
            if isinstance(service, dict) and "extends" in service:
                base = copy.deepcopy(
                    load_compose(service["extends"]["file"])["services"][service["extends"]["service"]]
                )
                own = {k: v for k, v in service.items() if k != "extends"}
                service.clear()
                _merge(service, base)
                _merge(service, own)
        _merge(merged, data)
    return merged


def _merge(into: dict[str, Any], data: dict[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, dict) and value.get("__reset__"):
            into.pop(key, None)
        elif isinstance(value, dict) and "__override__" in value:
            into[key] = value["__override__"]
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$`."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = variables.get(name)
        empty = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-") and empty:
            return arg or ""
        if op in (":?", "?") and empty:
            raise ValueError(f"compose would refuse to start: {name}: {arg}")
        return current or ""

    return _VAR_RE.sub(one, value)


def service_process(
    name: str, variables: dict[str, str], mapping: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The command and environment compose gives service `name`, with `mapping` applied to values
    (compose hostnames and paths to this machine's)."""
    service = load_compose()["services"][name]
    command = [interpolate(str(part), variables) for part in service["command"]]
    if command[0] == "python":
        command[0] = sys.executable
    env = {}
    for key, raw in service.get("environment", {}).items():
        value = interpolate(str(raw), variables)
        for old, new in mapping.items():
            value = value.replace(old, new)
        env[key] = value
    return command, env


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        stop_process(self.proc, sig, timeout)


@dataclass
class ComposeStack:
    """redis, an S3 server, fetcher, inference and api as compose runs them, on loopback."""

    workdir: Path
    redis: RedisServer
    s3: S3Server | None
    extra_env: dict[str, str] = field(default_factory=dict)
    api_port: int = field(default_factory=free_port)
    inference_port: int = field(default_factory=free_port)
    fetcher_port: int = field(default_factory=free_port)
    services: dict[str, Service] = field(default_factory=dict)
    starts: int = 0

    @property
    def store(self) -> Path:
        return self.workdir / "models"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def fetcher_url(self) -> str:
        """The fetcher's /metrics server."""
        return f"http://127.0.0.1:{self.fetcher_port}"

    def variables(self) -> dict[str, str]:
        """What the operator's .env would hold."""
        return {
            "PENDRA_MIRROR_ACCESS_KEY": "pendra-test",
            "PENDRA_MIRROR_SECRET_KEY": "pendra-test-secret",
            "PENDRA_REDIS_PASSWORD": self.redis.password,
            "PENDRA_CATALOGUE": self.extra_env.get("PENDRA_CATALOGUE", ""),
            "PENDRA_API_KEYS": self.extra_env.get("PENDRA_API_KEYS", ""),
            "PENDRA_GRAFANA_PASSWORD": "pendra-test-grafana",
        }

    def mapping(self) -> dict[str, str]:
        mapping = {
            # compose's URL, password included, to the test's Redis (which has the same password)
            f"redis://:{self.redis.password}@redis:6379/0": self.redis.url,
            "http://inference:8081": self.inference_url,
            "0.0.0.0": "127.0.0.1",
        }
        if self.s3 is not None:
            mapping["http://minio:9000/pendra-models"] = self.s3.mirror_url
        return mapping

    def start_service(self, name: str, wait: bool = True) -> Service:
        command, env = service_process(name, self.variables(), self.mapping())
        env["PENDRA_MODELS_DIR"] = str(self.store)  # the named volume `models`
        if name == "api":
            env["PENDRA_PORT"] = str(self.api_port)
        if name == "inference":
            env.update(PENDRA_PORT=str(self.inference_port), PENDRA_N_CTX="2048", PENDRA_KEEP_ALIVE="-1")
        if name == "fetcher":
            running = self.services.get("fetcher")
            # A second fetcher beside a live one (takeover tests) gets a port of its own.
            port = free_port() if running and running.alive() else self.fetcher_port
            env["PENDRA_FETCHER_PORT"] = str(port)
            if self.s3 is None:
                env.pop("PENDRA_MIRROR_URL", None)
        env.update({k: v for k, v in self.extra_env.items() if k not in ("PENDRA_CATALOGUE",)})
        self.starts += 1
        log_path = self.workdir / f"{name}-{self.starts}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HOME": str(self.workdir), **env},
            )
        service = Service(name, proc, log_path)
        self.services[name] = service
        if wait:
            self._wait(service)
        return service

    def _wait(self, service: Service, timeout_s: float = 60) -> None:
        url = {"api": f"{self.api_url}/ready", "inference": f"{self.inference_url}/ready"}.get(service.name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not service.alive():
                raise RuntimeError(f"{service.name} exited with {service.proc.returncode}:\n{service.log()}")
            if url is None:
                if "fetcher ready" in service.log():
                    return
            else:
                try:
                    if httpx.get(url, timeout=1).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"{service.name} did not become ready:\n{service.log()}")

    def start(self) -> ComposeStack:
        self.store.mkdir(parents=True, exist_ok=True)
        # All at once, as compose would once redis is healthy; the API copes with inference
        # coming up after it (503 until then), and each is waited for before the test goes on.
        started = [self.start_service(name, wait=False) for name in ("fetcher", "inference", "api")]
        for service in started:
            self._wait(service)
        return self

    def stop(self) -> None:
        for service in reversed(list(self.services.values())):
            service.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.log()[-4000:]}" for s in self.services.values())


@dataclass
class EmbeddedStack:
    """The same API from `pendra serve`: one process, an in-process queue, no Redis, no S3."""

    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    server: ServerProcess | None = None

    @property
    def store(self) -> Path:
        return self.workdir / "models"

    @property
    def api_url(self) -> str:
        assert self.server is not None
        return self.server.base_url

    def start(self) -> EmbeddedStack:
        self.store.mkdir(parents=True, exist_ok=True)
        env = {
            "PENDRA_MODELS_DIR": str(self.store),
            "PENDRA_N_CTX": "2048",
            "PENDRA_KEEP_ALIVE": "-1",
            "HOME": str(self.workdir),
            **self.extra_env,
        }
        self.server = start_server(env, self.workdir / "serve.log")
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def logs(self) -> str:
        return self.server.log()[-6000:] if self.server is not None else ""
