"""`hf.co/OWNER/REPO:QUANT` installs for real, against a loopback stand-in for the Hugging Face Hub:
from the CLI (allowed unless PENDRA_ALLOW_HF=false) and through the API (refused unless
PENDRA_ALLOW_HF=true), pinned to the sha256 the Hub reports, so a file that does not match it is
refused and nothing is stored."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GEMMA_SHA256, GEMMA_SIZE, run_cli
from tests.support.api import wait_job
from tests.support.hfhub import FakeHub
from tests.support.httpserver import link_or_copy
from tests.topology.conftest import Stack

REPO = "/api/models/unsloth/gemma-3-270m-it-GGUF/tree/main"
BAD_REPO = "/api/models/someone/Bad-GGUF/tree/main"


def lfs(path: str, sha: str, size: int) -> dict[str, Any]:
    return {"type": "file", "oid": "1" * 40, "size": size, "path": path, "lfs": {"oid": sha, "size": size}}


@pytest.fixture
def hub(tmp_path: Path, gemma_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    root = tmp_path / "hub"
    served = root / "unsloth" / "gemma-3-270m-it-GGUF" / "resolve" / "main"
    served.mkdir(parents=True)
    link_or_copy(gemma_path, served / "gemma-3-270m-it-Q4_K_M.gguf")
    bad = root / "someone" / "Bad-GGUF" / "resolve" / "main"
    bad.mkdir(parents=True)
    link_or_copy(gemma_path, bad / "bad-Q4_K_M.gguf")  # served bytes: Gemma; the Hub's pin: not
    server = FakeHub(root)
    server.tree(
        lfs("gemma-3-270m-it-Q4_K_M.gguf", GEMMA_SHA256, GEMMA_SIZE),
        lfs("gemma-3-270m-it-Q8_0.gguf", "ab" * 32, 300_000_000),
        {"type": "file", "oid": "2" * 40, "size": 10, "path": "README.md"},
        path=REPO,
    )
    server.tree(lfs("bad-Q4_K_M.gguf", "cd" * 32, GEMMA_SIZE), path=BAD_REPO)
    monkeypatch.setenv("PENDRA_HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("PENDRA_ALLOW_PRIVATE_SOURCES", "true")  # the stand-in is on loopback
    yield server
    server.stop()


def test_the_cli_installs_from_hf_pinned_to_the_hubs_sha256(hub: FakeHub, store_dir: Path) -> None:
    result = run_cli("models", "install", "hf.co/unsloth/gemma-3-270m-it-GGUF:Q4_K_M", timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"sha256 {GEMMA_SHA256} from the Hub" in result.stderr
    listing = run_cli("models", "show", "gemma-3-270m-it:q4_k_m", "--json")
    assert listing.returncode == 0, listing.stderr
    shown = json.loads(listing.stdout)
    assert shown["sha256"] == GEMMA_SHA256 and shown["verified"] is True
    assert (
        shown["source_url"]
        == f"{hub.endpoint}/unsloth/gemma-3-270m-it-GGUF/resolve/main/gemma-3-270m-it-Q4_K_M.gguf"
    )

    mismatch = run_cli("models", "install", "huggingface.co/someone/Bad-GGUF", timeout=300)
    assert mismatch.returncode != 0 and "Traceback" not in mismatch.stderr
    assert "checksum" in mismatch.stderr.lower()
    assert not list(store_dir.glob("bad*"))

    missing = run_cli("models", "install", "hf.co/unsloth/gemma-3-270m-it-GGUF:IQ2_XXS")
    assert missing.returncode != 0 and "Q4_K_M" in missing.stderr and "Q8_0" in missing.stderr
    refused = run_cli(
        "models", "install", "hf.co/unsloth/gemma-3-270m-it-GGUF", env={"PENDRA_ALLOW_HF": "false"}
    )
    assert refused.returncode != 0 and "PENDRA_ALLOW_HF=false" in refused.stderr


@pytest.mark.parametrize("kind", ["embedded", "compose"])
def test_the_api_installs_from_hf_only_where_allowed(
    hub: FakeHub, make_stack: Callable[..., Stack], kind: str
) -> None:
    if kind == "embedded":  # unset means off for the API: the same code in both shapes
        closed = make_stack(kind)
        answer = httpx.post(
            f"{closed.api_url}/api/models/install", json={"model": "hf.co/unsloth/gemma-3-270m-it-GGUF"}
        )
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "hf_not_allowed"
        assert "PENDRA_ALLOW_HF=true" in answer.json()["error"]["message"]
        assert hub.api_requests == []  # refused before asking the Hub anything
        closed.stop()

    stack = make_stack(kind, env={"PENDRA_ALLOW_HF": "true"})
    started = httpx.post(
        f"{stack.api_url}/api/models/install", json={"model": "hf.co/unsloth/gemma-3-270m-it-GGUF"}
    )
    assert started.status_code == 202, started.text
    job = wait_job(stack.api_url, started.json()["id"], timeout_s=180)
    assert job["state"] == "done" and job["model"] == "gemma-3-270m-it:q4_k_m"
    assert (stack.store / "gemma-3-270m-it-q4_k_m.gguf.meta.json").is_file()
    # Served at once, through the gateway too: its tokenizer answers /tokenize and /detokenize.
    body = {"model": "gemma-3-270m-it:q4_k_m", "content": "Hello, sea"}
    tokens = httpx.post(f"{stack.api_url}/tokenize", json=body, timeout=120)
    assert tokens.status_code == 200, tokens.text
    back = httpx.post(
        f"{stack.api_url}/detokenize",
        json={"model": body["model"], "tokens": tokens.json()["tokens"]},
        timeout=60,
    )
    assert back.json() == {"content": "Hello, sea"}

    bad = httpx.post(f"{stack.api_url}/api/models/install", json={"model": "hf.co/someone/Bad-GGUF:Q4_K_M"})
    failed = wait_job(stack.api_url, bad.json()["id"], timeout_s=180)
    assert failed["state"] == "failed" and failed["error_code"] == "checksum_mismatch"
    assert not list(stack.store.glob("bad*.gguf"))
    unknown = httpx.post(f"{stack.api_url}/api/models/install", json={"model": "hf.co/nobody/Nothing-GGUF"})
    assert unknown.status_code == 404
    malformed = httpx.post(f"{stack.api_url}/api/models/install", json={"model": "hf.co/a..b/c"})
    assert malformed.status_code == 400
