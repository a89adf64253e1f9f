"""Per-model speed and sampling choices through a real server: sampling in llama.cpp's graph (and
the host path where a request needs the logits), n-gram speculative decoding chosen in a model's
sidecar, and a model's recommended sampling from its sidecar or catalogue entry, on small llamas."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pendra_inference.gguf_writer import write_llama_gguf
from pendra_inference.model_memory import memory_shape
from pendra_inference.registry import ModelRegistry, sampling_defaults, speculation_for, state_copies
from pendra_inference.speculation import Speculation
from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.config import load_settings
from pendra_shared.sidecar import read_sidecar, write_sidecar
from pendra_shared.store import ModelStore
from pydantic import ValidationError

from tests.inference.conftest import TINY_SHAPE
from tests.support.server import ServerProcess, set_options, start_server

PLAIN = "tiny:plain"
SPECULATING = "tiny:ngram"
RECOMMENDED = "tiny:recommended"
BROKEN = "tiny:bad-option"
DRAFTING = "tiny:drafting"  # speculates with DRAFT, the same file under another name
DRAFT = "tiny:draft"
MISSING_DRAFT = "tiny:no-draft"  # names a draft model the store lacks
# The tiny model's pieces are w<id>: a prompt that repeats itself, as quoted code does.
PROMPT = "w300w301w302w303w304w305w306w307" * 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("speed")
    root = base / "models"
    store = ModelStore(root)
    tiny = write_llama_gguf(base / "tiny.gguf", TINY_SHAPE, name="tiny")
    options = {
        PLAIN: {},
        SPECULATING: {"speculative": {"kind": "ngram", "draft_tokens": 6}},
        RECOMMENDED: {"sampling": {"temperature": 0.0, "top_p": 0.9}},
        BROKEN: {"speculative": {"kind": "ngram", "draft_tokens": 0}},
        DRAFTING: {"speculative": {"kind": "draft", "model": DRAFT, "draft_tokens": 4}},
        DRAFT: {},
        MISSING_DRAFT: {"speculative": {"kind": "draft", "model": "nothing:here"}},
    }
    for name, chosen in options.items():
        set_options(store.import_file(tiny, name=name, purpose="chat").path, chosen)
    env = {
        "PENDRA_MODELS_DIR": str(root),
        "PENDRA_N_CTX": "512",
        "PENDRA_BACKEND_SAMPLING": "on",  # (auto is off on a CPU)
        "PENDRA_KEEP_ALIVE": "-1",
        "HOME": str(base),
    }
    proc = start_server(env, base / "serve.log")
    yield proc
    proc.stop()


def complete(server: ServerProcess, model: str, **body: Any) -> dict[str, Any]:
    answer = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": 40, **body},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def metric(server: ServerProcess, name: str, model: str, **labels: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    extra = "".join(f',{k}="{v}"' for k, v in labels.items())
    match = re.search(rf'^{name}{{model_name="{re.escape(model)}"{extra}}} ([0-9.e+-]+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_graph_sampling_serves_plain_requests_and_the_host_the_rest(server: ServerProcess) -> None:
    graph = "pendra_sampled_tokens_total"
    complete(server, PLAIN, temperature=0.8, seed=1)
    in_graph = metric(server, graph, PLAIN, where="graph")
    assert in_graph == 40 and metric(server, graph, PLAIN, where="host") == 0
    logprobs = complete(server, PLAIN, temperature=0.8, seed=1, logprobs=2)
    assert (
        metric(server, graph, PLAIN, where="host") == 40 and metric(server, graph, PLAIN, where="graph") == 40
    )
    # same seed, same text, whichever side sampled it
    assert (
        logprobs["choices"][0]["text"]
        == complete(server, PLAIN, temperature=0.8, seed=1)["choices"][0]["text"]
    )


def test_a_sidecar_turns_speculation_on_and_the_text_stays(server: ServerProcess) -> None:
    plain = complete(server, PLAIN, temperature=0)
    fast = complete(server, SPECULATING, temperature=0)
    assert fast["choices"][0]["text"] == plain["choices"][0]["text"]
    assert fast["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    drafted = metric(server, "pendra_speculative_draft_tokens_total", SPECULATING)
    accepted = metric(server, "pendra_speculative_accepted_tokens_total", SPECULATING)
    assert drafted > 0 and 0 < accepted <= drafted
    assert metric(server, "pendra_speculative_draft_tokens_total", PLAIN) == 0
    # A sidecar option that does not parse: the model serves, without speculation.
    broken = complete(server, BROKEN, temperature=0)
    assert broken["choices"][0]["text"] == plain["choices"][0]["text"]
    assert metric(server, "pendra_speculative_draft_tokens_total", BROKEN) == 0
    assert "speculative.draft_tokens" in server.log()


def test_a_models_recommended_sampling_fills_what_a_request_leaves_out(server: ServerProcess) -> None:
    greedy = complete(server, PLAIN, temperature=0)["choices"][0]["text"]
    # temperature 0 recommended: any seed gives the greedy text while the request sets none ...
    for seed in (1, 2):
        assert complete(server, RECOMMENDED, seed=seed)["choices"][0]["text"] == greedy
    # ... through the Responses API too (one text every time, where its default temperature 1 would
    # draw three) ...
    texts = {
        httpx.post(
            f"{server.base_url}/v1/responses",
            json={"model": RECOMMENDED, "input": PROMPT, "max_output_tokens": 40},
            timeout=120,
        ).json()["output"][0]["content"][0]["text"]
        for _ in range(3)
    }
    assert len(texts) == 1
    # ... and a request's own values win.
    drawn = {
        complete(server, RECOMMENDED, temperature=1.0, seed=seed)["choices"][0]["text"] for seed in (1, 2)
    }
    assert greedy not in drawn and len(drawn) == 2


def test_the_catalogue_entry_chooses_and_the_sidecar_overrides(tmp_path: Path) -> None:
    """What an install records (the catalogue entry's facts) chooses speculation and sampling; the
    sidecar's options override it; a catalogue value that does not validate is refused there."""
    entry = {
        "name": "tiny:cat",
        "purpose": "chat",
        "gguf_url": "https://example.invalid/tiny.gguf",
        "gguf_sha256": "0" * 64,
        "size_bytes": 1,
        "sampling": {"temperature": 0.7, "top_k": 20},
        "speculative": "ngram",
    }
    facts = CatalogueEntry.model_validate(entry).facts()
    store = ModelStore(tmp_path / "models")
    path = store.import_file(
        write_llama_gguf(tmp_path / "tiny.gguf", TINY_SHAPE, name="tiny"), name="tiny:cat"
    ).path
    sidecar, _ = read_sidecar(path, path.stat().st_size)
    assert sidecar is not None
    write_sidecar(path, sidecar.model_copy(update={"catalogue": facts}))
    model = store.find("tiny:cat")
    assert speculation_for(model) == Speculation(kind="ngram")
    assert state_copies(model) == 5  # a recurrent state and 4 rollback snapshots per sequence id
    assert sampling_defaults(model) == {"temperature": 0.7, "top_k": 20}
    set_options(path, {"speculative": False, "sampling": {"top_p": 0.5}})
    model = store.find("tiny:cat")
    assert speculation_for(model) is None and sampling_defaults(model) == {"top_p": 0.5}
    assert state_copies(model) == 1
    with pytest.raises(ValidationError, match="draft_tokens"):
        CatalogueEntry.model_validate({**entry, "speculative": {"draft_tokens": 100}})
    for wrong in ({"kind": "draft"}, {"kind": "ngram", "model": "qwen3:0.6b"}):
        with pytest.raises(ValidationError, match="a draft model is named for kind draft"):
            CatalogueEntry.model_validate({**entry, "speculative": wrong})
    drafting = CatalogueEntry.model_validate(
        {**entry, "speculative": {"kind": "draft", "model": "qwen3:0.6b"}}
    )
    set_options(path, {"speculative": drafting.facts()["speculative"]})
    spec = speculation_for(store.find("tiny:cat"))
    assert spec is not None and spec.kind == "draft" and spec.model == "qwen3:0.6b"


def test_a_sidecar_names_a_draft_model_and_the_text_stays(server: ServerProcess) -> None:
    plain = complete(server, PLAIN, temperature=0, prompt="w5w9w12")
    fast = complete(server, DRAFTING, temperature=0, prompt="w5w9w12")
    assert fast["choices"][0]["text"] == plain["choices"][0]["text"]
    drafted = metric(server, "pendra_speculative_draft_tokens_total", DRAFTING)
    accepted = metric(server, "pendra_speculative_accepted_tokens_total", DRAFTING)
    assert drafted > 0 and accepted == drafted  # the draft is the model itself: every greedy draft holds
    assert metric(server, "pendra_speculative_acceptance_ratio", DRAFTING) == 1.0
    # A draft model the store lacks: the model serves, without speculation.
    missing = complete(server, MISSING_DRAFT, temperature=0, prompt="w5w9w12")
    assert missing["choices"][0]["text"] == plain["choices"][0]["text"]
    assert metric(server, "pendra_speculative_draft_tokens_total", MISSING_DRAFT) == 0


def test_a_draft_model_counts_in_the_models_memory(tmp_path: Path) -> None:
    """The draft's weights and its cache (as many cells as the model's) are budgeted with the model."""
    store = ModelStore(tmp_path / "models")
    tiny = write_llama_gguf(tmp_path / "tiny.gguf", TINY_SHAPE, name="tiny")
    for name in (PLAIN, DRAFT):
        store.import_file(tiny, name=name, purpose="chat")
    drafting = store.import_file(tiny, name=DRAFTING, purpose="chat")
    set_options(drafting.path, {"speculative": {"kind": "draft", "model": DRAFT}})
    registry = ModelRegistry(load_settings(models_dir=store.root, n_ctx=512, parallel=2), store)
    _, plain = registry.engine_config(store.find(PLAIN))
    _, with_draft = registry.engine_config(store.find(DRAFTING))
    shape = memory_shape(store.find(DRAFT).path)
    assert with_draft - plain >= store.find(DRAFT).size_bytes + shape.kv_bytes(512 * 2)
