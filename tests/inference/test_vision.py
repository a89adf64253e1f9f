"""Images through a real `pendra serve`: a tiny random-weight Qwen3.5 (the real Qwen tokenizer and
Qwen3.5's template) with a random `qwen3vl_merger` projector of the vendored llama.cpp's own layout,
as Qwen3.6 ships. Random weights say nothing about the picture, so the tests check what does not
depend on words: the image reaches the model (another picture, other logits), its tokens are counted,
its cells are reused like any prefix (same text with and without the cache, alone and batched, which
checks the M-RoPE positions after an image), the OpenAI, Ollama and Responses shapes carry it, and
every limit and refusal is a clear 4xx."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import random
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pendra_inference.gguf_hybrid import QWEN35_TINY
from pendra_inference.gguf_vision import QWEN3VL_TINY, write_qwen3vl_projector
from pendra_inference.vision import ImageLimits, decode_image, fetch_image
from pendra_shared.api_errors import InvalidRequest
from pendra_shared.store import ModelStore
from PIL import Image

from tests.support.httpserver import FileServer
from tests.support.hybrids import write_qwen35_vision
from tests.support.openai_schemas import validate
from tests.support.server import ServerProcess, start_server

VISION = "qwen-vision:tiny"
MISMATCHED = "qwen-vision:mismatched"
BROKEN = "qwen-vision:broken"
TEXT_ONLY = "qwen-text:tiny"
NONE = {"reasoning_format": "none", "chat_template_kwargs": {"enable_thinking": False}}
MAX_BYTES = 200_000
MAX_PIXELS = 1_000_000


def _png(
    size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30), noise: bool = False
) -> bytes:
    image = Image.new("RGB", size, color)
    if noise:  # incompressible: a PNG about as large as its pixels
        image = Image.frombytes("RGB", size, random.Random(7).randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels (its IHDR checksum right) and holds few."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _ask(url: str, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


RED = _data_url(_png(color=(200, 30, 30)))
GREEN = _data_url(_png(color=(30, 200, 30)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("vision")
    store = ModelStore(base / "models")
    model, projector = write_qwen35_vision(base)
    other = write_qwen3vl_projector(base / "other-mmproj.gguf", QWEN3VL_TINY, 2 * QWEN35_TINY.n_embd)
    store.import_file(model, name=VISION, purpose="chat", projector=projector)
    store.import_file(model, name=MISMATCHED, purpose="chat", projector=other)
    # a projector that makes llama.cpp abort (GGML_ASSERT in qwen3vl.cpp's graph) when it loads
    broken = write_qwen3vl_projector(
        base / "broken-mmproj.gguf", QWEN3VL_TINY, 64, omit=("v.patch_embd.bias",)
    )
    store.import_file(model, name=BROKEN, purpose="chat", projector=broken)
    store.import_file(model, name=TEXT_ONLY, purpose="chat")
    env = {
        "PENDRA_MODELS_DIR": str(base / "models"),
        "PENDRA_N_CTX": "1024",
        "PENDRA_PARALLEL": "2",
        "PENDRA_KEEP_ALIVE": "-1",
        "PENDRA_MAX_LOADED_MODELS": "4",
        "PENDRA_IMAGE_MAX_BYTES": str(MAX_BYTES),
        "PENDRA_IMAGE_MAX_PIXELS": str(MAX_PIXELS),
        "PENDRA_MAX_IMAGES": "2",
        "PENDRA_IMAGE_URLS": "true",
        "HOME": str(base),
    }
    proc = start_server(env, base / "serve.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _chat(client: openai.OpenAI, messages: list[dict[str, Any]], **extra: Any) -> Any:
    return client.chat.completions.create(
        model=VISION, messages=messages, max_tokens=8, temperature=0, extra_body={**NONE, **extra}
    )


def test_an_image_is_read_and_its_tokens_counted(client: openai.OpenAI) -> None:
    answer = _chat(client, _ask(RED))
    validate(answer.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    images = usage.prompt_tokens_details.image_tokens
    assert images is not None
    assert images >= 8  # Qwen-VL's smallest image is 8 tokens; more for this 64x48 picture
    text_only = _chat(client, [{"role": "user", "content": "What is in this picture?"}])
    assert text_only.usage is not None
    # the image's embeddings plus its <|vision_start|> and <|vision_end|> and a line break
    assert usage.prompt_tokens >= text_only.usage.prompt_tokens + images
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "length"


def test_the_picture_reaches_the_model(client: openai.OpenAI) -> None:
    """Another picture with the same words: other first-token probabilities."""

    def first(url: str) -> list[float]:
        answer = _chat(client, _ask(url), logprobs=True, top_logprobs=5)
        return [t.logprob for t in answer.choices[0].logprobs.content[0].top_logprobs]

    red, green = first(RED), first(GREEN)
    assert red == first(RED)
    assert red != green


def test_the_same_text_with_and_without_the_cache_alone_and_batched(client: openai.OpenAI) -> None:
    """A prefix shared through an image (the M-RoPE positions after it included) gives the text
    decoding it whole gives."""
    conversation = _ask(RED, "Describe it.")
    cold = _chat(client, conversation, cache_prompt=False, max_tokens=16)
    warm1 = _chat(client, conversation, max_tokens=16)
    warm2 = _chat(client, conversation, max_tokens=16)
    assert warm2.usage is not None and warm2.usage.prompt_tokens_details is not None
    assert warm2.usage.prompt_tokens_details.cached_tokens > 0
    texts = {c.choices[0].message.content for c in (cold, warm1, warm2)}
    assert len(texts) == 1
    # a next turn after the answer, with the image early in the history
    follow = [*conversation, {"role": "assistant", "content": cold.choices[0].message.content}]
    follow.append({"role": "user", "content": "And the colour?"})
    once = _chat(client, follow, cache_prompt=False, max_tokens=12).choices[0].message.content
    assert _chat(client, follow, max_tokens=12).choices[0].message.content == once
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [
            pool.submit(_chat, client, _ask(url, "Describe it."), max_tokens=16)
            for url in (RED, GREEN, RED, GREEN)
        ]
        batched = [j.result().choices[0].message.content for j in jobs]
    green = (
        _chat(client, _ask(GREEN, "Describe it."), cache_prompt=False, max_tokens=16)
        .choices[0]
        .message.content
    )
    assert batched == [cold.choices[0].message.content, green] * 2


def test_streamed_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=VISION,
        messages=_ask(RED),
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NONE,
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == _chat(client, _ask(RED), max_tokens=6).choices[0].message.content
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.image_tokens or 0) > 0


def test_ollama_images(server: ServerProcess, client: openai.OpenAI) -> None:
    raw = base64.b64encode(_png(color=(200, 30, 30))).decode()
    options = {"temperature": 0, "num_predict": 8}
    chat = httpx.post(
        f"{server.base_url}/api/chat",
        json={
            "model": VISION,
            "messages": [{"role": "user", "content": "What is in this picture?", "images": [raw]}],
            "stream": False,
            "think": False,
            "options": options,
        },
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["message"]["content"] == _chat(client, _ask(RED)).choices[0].message.content
    assert body["prompt_eval_count"] > 8
    generate = httpx.post(
        f"{server.base_url}/api/generate",
        json={
            "model": VISION,
            "prompt": "What is this?",
            "images": [raw],
            "stream": False,
            "think": False,
            "options": options,
        },
        timeout=120,
    )
    assert generate.status_code == 200, generate.text
    assert generate.json()["response"]
    bad = httpx.post(
        f"{server.base_url}/api/chat",
        json={
            "model": VISION,
            "messages": [{"role": "user", "content": "x", "images": ["not base64!"]}],
            "stream": False,
        },
        timeout=60,
    )
    assert bad.status_code == 400 and "base64" in bad.json()["error"]


def test_responses_input_image(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=VISION,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": RED},
                    {"type": "input_text", "text": "What is in this picture?"},
                ],
            }
        ],
        max_output_tokens=8,
        temperature=0,
        extra_body=NONE,
    )
    assert response.status == "incomplete"
    assert response.usage is not None and response.usage.input_tokens > 8


def _error(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def test_limits_and_bad_images_are_clear_400s(client: openai.OpenAI) -> None:
    cases = {
        "too_many_images": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": RED}} for _ in range(3)],
            }
        ],
        "image_too_large": _ask(_data_url(_png((1100, 1000)))),  # small file, too many pixels
        "bytes": _ask(_data_url(_png((300, 300), noise=True))),  # over PENDRA_IMAGE_MAX_BYTES
        "not an image": _ask(_data_url(b"GIF89a but not really")),
        "base64": _ask("data:image/png;base64,@@@@"),
        "an image is a data": _ask("ftp://example.com/cat.png"),
    }
    for expected, messages in cases.items():
        error = _error(lambda m=messages: _chat(client, m))
        assert error.status_code == 400, (expected, error.message)
        body = error.body
        assert isinstance(body, dict)
        text = f"{body.get('code')} {body.get('message')}"
        want = "image_too_large" if expected == "bytes" else expected
        assert want in text, (expected, text)
    assert "PENDRA_IMAGE_MAX_PIXELS" in _error(lambda: _chat(client, cases["image_too_large"])).message
    assert "PENDRA_IMAGE_MAX_BYTES" in _error(lambda: _chat(client, cases["bytes"])).message
    # and the model still answers
    assert _chat(client, _ask(RED)).choices[0].message.content


def test_image_urls_go_through_the_installs_address_checks(client: openai.OpenAI) -> None:
    """With PENDRA_IMAGE_URLS on and private sources not allowed, neither loopback nor the cloud
    metadata address is fetched: the listener sees no connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    connections: list[Any] = []

    def accept() -> None:
        try:
            while True:
                connections.append(listener.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        for url in (f"http://127.0.0.1:{port}/cat.png", "http://169.254.169.254/latest/meta-data/"):
            error = _error(lambda u=url: _chat(client, _ask(u)))
            assert error.status_code == 400
            assert "could not be fetched" in error.message and "PENDRA_ALLOW_PRIVATE_SOURCES" in error.message
        thread.join(1.0)
        assert connections == []
    finally:
        listener.close()


def test_image_urls_off_and_on(tmp_path: Any) -> None:
    """Off, an http(s) URL is refused without a connection; on and allowed, it is fetched."""
    (tmp_path / "cat.png").write_bytes(_png())
    files = FileServer(tmp_path).start()
    try:
        url = files.url("cat.png")
        with pytest.raises(InvalidRequest, match="PENDRA_IMAGE_URLS is off"):
            fetch_image(url, ImageLimits(urls=False), "x")
        assert files.requests == []
        data = fetch_image(url, ImageLimits(urls=True, allow_private=True), "x")
        assert decode_image(data, ImageLimits(), "x").width == 64
        with pytest.raises(InvalidRequest, match="larger than 100 bytes"):
            fetch_image(url, ImageLimits(urls=True, allow_private=True, max_bytes=100), "x")
    finally:
        files.stop()


def test_decoding_checks_the_header_first() -> None:
    limits = ImageLimits(max_pixels=10_000)
    # a PNG whose header claims 100000 x 100000 pixels: refused before any of it is decompressed
    with pytest.raises(InvalidRequest, match="5000x5000 pixels, more than the 10000 allowed"):
        decode_image(_png_header(5000, 5000), limits, "x")
    with pytest.raises(InvalidRequest, match="more than the 10000 pixels allowed"):
        decode_image(_png_header(100_000, 100_000), limits, "x")
    gif = io.BytesIO()
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    first = decode_image(gif.getvalue(), limits, "x")
    assert first.rgb[:3] == bytes((255, 0, 0))
    with pytest.raises(InvalidRequest, match="could not be decoded"):
        decode_image(_png()[:60], limits, "x")
    assert decode_image(_png(), ImageLimits(), "x").digest == decode_image(_png(), ImageLimits(), "x").digest


def test_a_model_without_a_projector_says_so(client: openai.OpenAI) -> None:
    error = _error(
        lambda: client.chat.completions.create(model=TEXT_ONLY, messages=_ask(RED), max_tokens=4)  # type: ignore[arg-type]
    )
    assert error.status_code == 400
    assert "does not read images" in error.message and "no vision projector" in error.message


def _serves_text_but_refuses_images(client: openai.OpenAI, model: str) -> str:
    """The model answers text; an image for it is a 400, whose message is returned."""
    text = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body=NONE
    )
    assert text.choices[0].message.content is not None
    error = _error(
        lambda: client.chat.completions.create(model=model, messages=_ask(RED), max_tokens=4)  # type: ignore[arg-type]
    )
    assert error.status_code == 400
    return error.message


def test_a_mismatched_projector_is_refused_at_load_and_serves_text(client: openai.OpenAI) -> None:
    message = _serves_text_but_refuses_images(client, MISMATCHED)
    assert "refused at load" in message and "128 wide" in message and "reads 64" in message


def test_a_projector_that_crashes_llama_cpp_is_caught_by_the_probe(client: openai.OpenAI) -> None:
    """Imported, so not a pinned install: loaded in a child process first; it aborts there, and
    the model serves text without it."""
    message = _serves_text_but_refuses_images(client, BROKEN)
    assert "failed the load probe" in message and "SIGABRT" in message


def test_doctor_counts_the_projector(tmp_path: Any) -> None:
    import json

    from tests.conftest import run_cli

    model, projector = write_qwen35_vision(tmp_path)
    store = ModelStore(tmp_path / "models")
    store.import_file(model, name=VISION, purpose="chat", projector=projector)
    env = {"PENDRA_MODELS_DIR": str(tmp_path / "models"), "PENDRA_N_CTX": "512"}
    done = run_cli("doctor", "--json", env=env)
    assert done.returncode == 0, done.stderr
    (entry,) = json.loads(done.stdout)["models"]
    size = projector.stat().st_size
    assert entry["projector"] == "qwen-vision-tiny.mmproj.gguf" and entry["projector_bytes"] == size
    assert entry["memory_bytes"] >= entry["weights_bytes"] + size
    text = run_cli("doctor", env=env).stdout
    assert f"vision projector {size / 2**20:.1f} MiB (qwen-vision-tiny.mmproj.gguf)" in text


def test_metrics_count_images_and_their_tokens(server: ServerProcess, client: openai.OpenAI) -> None:
    def counted() -> tuple[float, float]:
        text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
        values = {}
        for name in ("pendra_prompt_images_total", "pendra_prompt_image_tokens_total"):
            line = next(
                (x for x in text.splitlines() if x.startswith(f'{name}{{model_name="{VISION}"}}')), None
            )
            values[name] = float(line.split()[-1]) if line else 0.0
        return values["pendra_prompt_images_total"], values["pendra_prompt_image_tokens_total"]

    images, tokens = counted()
    answer = _chat(client, _ask(GREEN, "Once more."))
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert counted() == (images + 1, tokens + (answer.usage.prompt_tokens_details.image_tokens or 0))


def test_text_holding_llama_cpps_default_media_marker_is_only_text(client: openai.OpenAI) -> None:
    """The marker is random per process (llama-server's way): `<__media__>` in a message neither
    moves an image nor breaks the request."""
    answer = _chat(client, _ask(RED, "What is <__media__> here?"))
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert (
        answer.usage.prompt_tokens_details.image_tokens
        == _chat(client, _ask(RED)).usage.prompt_tokens_details.image_tokens
    )  # type: ignore[union-attr]
    text = _chat(client, [{"role": "user", "content": "<__media__> <__media__>"}])
    assert text.usage is not None and text.usage.prompt_tokens_details is not None
    assert text.usage.prompt_tokens_details.image_tokens == 0
