"""The service set under test: compose's processes (real Redis, a real S3 server, fetcher,
inference, api) or `pendra serve` alone, over a catalogue served by a local HTTP server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import gemma_entry
from tests.support.engines import RedisServer, S3Server
from tests.support.stack import ComposeStack, EmbeddedStack

Stack = ComposeStack | EmbeddedStack

# Quick takeover and retries, so the failure tests run in seconds rather than minutes.
FAST = {"PENDRA_JOB_LEASE_S": "2", "PENDRA_DOWNLOAD_BACKOFF_S": "0.2", "PENDRA_DOWNLOAD_RETRIES": "3"}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def catalogue(served_gemma: str, write_catalogue: Callable[..., Path]) -> Path:
    embedder = gemma_entry(served_gemma, name="gemma-embed:270m", purpose="embedding")
    return write_catalogue([gemma_entry(served_gemma), embedder])


@pytest.fixture
def make_stack(
    tmp_path: Path, catalogue: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Stack]]:
    """Start a stack of one kind: `make_stack("compose", s3=..., env=...)` or `("embedded")`."""
    started: list[Stack] = []

    def make(kind: str, s3: S3Server | None = None, env: dict[str, str] | None = None) -> Stack:
        extra = {**FAST, "PENDRA_CATALOGUE": str(catalogue), **(env or {})}
        workdir = tmp_path / f"{kind}-{len(started)}"
        workdir.mkdir()
        stack: Stack
        if kind == "compose":
            redis_server: RedisServer = request.getfixturevalue("redis_server")
            redis_server.flush()
            stack = ComposeStack(workdir, redis_server, s3, extra_env=extra)
        else:
            stack = EmbeddedStack(workdir, extra_env=extra)
        started.append(stack)
        return stack.start()

    yield make
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
    for stack in started:
        stack.stop()
        if failed:
            print(stack.logs())


@pytest.fixture(params=["compose", "embedded"])
def stack(request: pytest.FixtureRequest, make_stack: Callable[..., Stack]) -> Stack:
    """Each test that takes `stack` runs against both shapes."""
    return make_stack(request.param)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
