"""Images in chat requests, for chat models installed with a vision projector (`mmproj`).

A request's images arrive as `image_url` parts (data URLs; http(s) URLs only with
`PENDRA_IMAGE_URLS` on, fetched through the installs' address checks), Ollama's `images` (base64)
or the Responses API's `input_image`. Each is checked before llama.cpp sees a byte: its size in
bytes, its format (PNG, JPEG, WebP, GIF, BMP: what Pillow decodes here, never llama.cpp's own
decoder), its pixels read from the header before it is decoded, and how many one request carries.

The projector is llama.cpp's multimodal library (`mtmd`), loaded beside the text model. The prompt
is rendered with llama.cpp's media marker where each image goes, and `mtmd_tokenize` splits it
into text tokens and image chunks, wrapping each image in the model's own tokens
(`<|vision_start|>`...`<|vision_end|>` for Qwen). In the prompt an image is a run of placeholder
ids, one per embedding it becomes: negative, so no vocabulary has them, and slices of the image's
digest in turn, so the same image in a later request is the same prefix and its cells are shared,
while another image matches it nowhere but by a collision of the whole 248-bit digest.
The scheduler encodes and decodes each image chunk when a sequence's prefill reaches it.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import hashlib
import io
import logging
import re
import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pendra_shared import gguf_info
from pendra_shared.api_errors import InvalidRequest
from pendra_shared.errors import InstallError
from pendra_shared.gguf_info import InvalidGGUF
from pendra_shared.sources import Guard, HttpSource

logger = logging.getLogger(__name__)

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL_RE = re.compile(r"data:image/([a-zA-Z0-9.+-]{1,32});base64,", re.ASCII)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 5 * 1024 * 1024
    max_pixels: int = 16_000_000
    max_images: int = 8
    urls: bool = False  # fetch http(s) image URLs
    allow_private: bool = False  # ... from addresses that are not public (the installs' setting)
    fetch_timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Any) -> ImageLimits:
        return cls(
            max_bytes=settings.image_max_bytes,
            max_pixels=settings.image_max_pixels,
            max_images=settings.max_images,
            urls=settings.image_urls,
            allow_private=settings.allow_private_sources,
            fetch_timeout_s=settings.download_timeout_s,
        )


@dataclass(frozen=True)
class Picture:
    """A decoded image: RGB bytes, row by row."""

    width: int
    height: int
    rgb: bytes
    digest: bytes  # sha256 of the pixels and size: the same picture, however it was encoded


def image_url(part: dict[str, Any], where: str) -> str:
    """The URL of an `image_url` part (a string, or OpenAI's `{"url": ...}`)."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{where}.image_url: expected {{'url': 'data:image/...'}}", param=where)
    return url


def fetch_image(url: str, limits: ImageLimits, where: str) -> bytes:
    """The bytes an image URL names. A data URL always; http(s) only with `limits.urls`, through
    the installs' checks (public addresses only unless allowed, redirects checked hop by hop)."""
    match = _DATA_URL_RE.match(url)
    if match is not None:
        encoded = url[match.end() :]
        if len(encoded) > (limits.max_bytes + 2) // 3 * 4 + 4:
            raise _too_large(limits, where)
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{where}: the data URL is not valid base64", param=where) from None
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise InvalidRequest(
            f"{where}: an image is a data:image/...;base64 URL"
            + (" or an http(s) URL" if limits.urls else "")
            + f", not {scheme[:16] + ':' if scheme else 'this'}",
            param=where,
        )
    if not limits.urls:
        raise InvalidRequest(
            f"{where}: image URLs are not fetched (PENDRA_IMAGE_URLS is off); send the image as a "
            "data:image/...;base64 URL",
            param=where,
        )
    guard = Guard(allow_private=limits.allow_private, read_timeout_s=limits.fetch_timeout_s)
    data = bytearray()
    deadline = time.monotonic() + limits.fetch_timeout_s  # a trickling server is cut off here
    try:
        with HttpSource(timeout_s=limits.fetch_timeout_s).open(url, 0, guard) as stream:
            if stream.total is not None and stream.total > limits.max_bytes:
                raise _too_large(limits, where)
            for chunk in stream.chunks:
                data += chunk
                if len(data) > limits.max_bytes:
                    raise _too_large(limits, where)
                if time.monotonic() > deadline:
                    raise InvalidRequest(
                        f"{where}: the image took longer than {limits.fetch_timeout_s:g}s to fetch",
                        param=where,
                    )
    except InstallError as exc:  # refused addresses, HTTP errors, network failures
        raise InvalidRequest(f"{where}: the image could not be fetched: {exc}", param=where) from None
    return bytes(data)


def _too_large(limits: ImageLimits, where: str) -> InvalidRequest:
    return InvalidRequest(
        f"{where}: the image is larger than {limits.max_bytes} bytes (PENDRA_IMAGE_MAX_BYTES)",
        param=where,
        code="image_too_large",
    )


def decode_image(data: bytes, limits: ImageLimits, where: str) -> Picture:
    """Check and decode an image's bytes. Its pixels are counted from its header, before any of it
    is decompressed (a small file may claim a huge image)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise _too_large(limits, where)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InvalidRequest(
                    f"{where}: the image is {width}x{height} pixels, more than the "
                    f"{limits.max_pixels} allowed (PENDRA_IMAGE_MAX_PIXELS)",
                    param=where,
                    code="image_too_large",
                )
            if width < 1 or height < 1:
                raise InvalidRequest(f"{where}: the image has no pixels", param=where)
            image.seek(0)  # the first frame of an animation
            rgb = image.convert("RGB").tobytes()
    except InvalidRequest:
        raise
    except Image.DecompressionBombError:  # Pillow's own ceiling, far above ours
        raise InvalidRequest(
            f"{where}: the image has more than the {limits.max_pixels} pixels allowed "
            "(PENDRA_IMAGE_MAX_PIXELS)",
            param=where,
            code="image_too_large",
        ) from None
    except UnidentifiedImageError:
        raise InvalidRequest(
            f"{where}: not an image Pendra reads (PNG, JPEG, WebP, GIF or BMP)", param=where
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequest(f"{where}: the image could not be decoded: {exc}", param=where) from None
    if len(rgb) != width * height * 3:
        raise InvalidRequest(f"{where}: the image could not be decoded", param=where)
    digest = hashlib.sha256(f"{width}x{height}:".encode() + rgb).digest()
    return Picture(width, height, rgb, digest)


# -- the projector -------------------------------------------------------------------------------


class ProjectorRefused(Exception):
    """A projector that cannot serve its model; the message says why."""


def check_projector(path: Path, text_n_embd: int) -> None:
    """Refuse a projector whose header says it does not fit the text model (llama.cpp would say
    so only in its log)."""
    try:
        meta = gguf_info.check_projector(path).metadata
    except InvalidGGUF as exc:
        raise ProjectorRefused(f"{path.name}: {exc}") from None
    if not meta.get("clip.has_vision_encoder"):
        raise ProjectorRefused(f"{path.name} has no vision encoder (an audio projector?)")
    width = meta.get("clip.vision.projection_dim")
    if isinstance(width, int) and width != text_n_embd:
        raise ProjectorRefused(
            f"{path.name} makes image embeddings {width} wide, and this model reads "
            f"{text_n_embd}: it is another model's projector"
        )


_LOG_ERROR = 4  # ggml_log_level GGML_LOG_LEVEL_ERROR
_last_error: list[str] = [""]
_log_callback: Any = None


def _mtmd() -> Any:
    """llama.cpp's multimodal library, its log going to ours: errors kept for the refusal they
    explain, the rest (a line per image encoded) dropped."""
    global _log_callback
    from llama_cpp import llama_cpp, mtmd_cpp

    if _log_callback is None:

        def log(level: int, text: bytes, _user_data: Any) -> None:
            if level == _LOG_ERROR and text:
                line = text.decode("utf-8", errors="replace").strip()
                _last_error[0] = line
                logger.warning("mtmd: %s", line)

        _log_callback = llama_cpp.llama_log_callback(log)
        mtmd_cpp.mtmd_log_set(_log_callback, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(_log_callback, ctypes.c_void_p(0))
    return mtmd_cpp


@dataclass(eq=False)
class ImageChunk:
    """One image of a prompt, tokenized: `n_tokens` embeddings at prompt index `start`, taking
    `n_pos` positions (fewer than tokens with M-RoPE). Owns its llama.cpp chunk."""

    start: int
    n_tokens: int
    n_pos: int
    chunk: Any = field(repr=False)
    non_causal: bool = False  # read with non-causal attention (Gemma 3): in one micro-batch

    def __post_init__(self) -> None:
        weakref.finalize(self, _mtmd().mtmd_input_chunk_free, self.chunk)

    @property
    def end(self) -> int:
        return self.start + self.n_tokens


def _placeholders(digest: bytes, part: int, n: int) -> list[int]:
    """`n` negative ids for part `part` of a picture (some projectors cut a picture into an
    overview and slices, a chunk each): the eight 31-bit slices of their digest in turn."""
    digest = hashlib.sha256(digest + part.to_bytes(4, "little")).digest()
    slices = [int.from_bytes(digest[i : i + 4], "little") & 0x7FFFFFFF for i in range(0, 32, 4)]
    return [-1 - slices[i % 8] for i in range(n)]


class Projector:
    """llama.cpp's multimodal context for one loaded chat model."""

    def __init__(self, path: Path, model: Any, text_n_embd: int, *, n_threads: int, gpu: bool) -> None:
        check_projector(path, text_n_embd)
        mtmd = _mtmd()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = gpu
        params.print_timings = False
        params.n_threads = n_threads
        params.warmup = True
        # Where an image goes in the rendered prompt: random, as llama-server's, so text that
        # holds llama.cpp's default `<__media__>` is only text.
        self._marker = f"<__media_{secrets.token_hex(8)}__>".encode()
        params.media_marker = self._marker
        _last_error[0] = ""
        ctx = mtmd.mtmd_init_from_file(str(path).encode(), model, params)
        if not ctx:
            why = _last_error[0] or "see the log"
            raise ProjectorRefused(f"llama.cpp could not load the projector {path.name}: {why[:300]}")
        if not mtmd.mtmd_support_vision(ctx):
            mtmd.mtmd_free(ctx)
            raise ProjectorRefused(f"{path.name} reads no images (an audio projector?)")
        self.ctx = ctx
        self.marker = self._marker.decode()
        self._lock = threading.Lock()  # tokenizing runs in request threads

    def tokenize(
        self, text: str, pictures: list[Picture], bos: int | None = None
    ) -> tuple[list[int], tuple[ImageChunk, ...]]:
        """The prompt's tokens, each image a run of placeholder ids, and its image chunks;
        `bos` starts the prompt when its text does not."""
        mtmd = _mtmd()
        bitmaps: list[Any] = []
        for picture in pictures:
            buf = (ctypes.c_ubyte * len(picture.rgb)).from_buffer_copy(picture.rgb)
            bitmap = mtmd.mtmd_bitmap_init(picture.width, picture.height, buf)
            if not bitmap:
                for b in bitmaps:
                    mtmd.mtmd_bitmap_free(b)
                raise InvalidRequest("an image could not be read", param="messages")
            mtmd.mtmd_bitmap_set_id(bitmap, picture.digest.hex().encode())
            bitmaps.append(bitmap)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            encoded = text.encode()
            source = mtmd.mtmd_input_text(
                text=encoded, text_len=len(encoded), add_special=False, parse_special=True
            )
            array = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            with self._lock:
                rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(source), array, len(bitmaps))
            if rc != 0 and text.count(self.marker) != len(pictures):
                raise InvalidRequest(
                    f"the prompt has {text.count(self.marker)} image places for {len(pictures)} images",
                    param="messages",
                )
            if rc != 0:
                raise InvalidRequest(
                    f"the images could not be prepared (llama.cpp's mtmd: {rc})", param="messages"
                )
            tokens, images = self._flatten(chunks, pictures)
            if bos is not None and (not tokens or tokens[0] != bos):
                tokens.insert(0, bos)
                for image in images:
                    image.start += 1
            return tokens, images
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _flatten(self, chunks: Any, pictures: list[Picture]) -> tuple[list[int], tuple[ImageChunk, ...]]:
        mtmd = _mtmd()
        tokens: list[int] = []
        images: list[ImageChunk] = []
        by_id = {picture.digest.hex().encode(): picture for picture in pictures}
        parts: dict[bytes, int] = {}
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            kind = mtmd.mtmd_input_chunk_get_type(chunk)
            if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens.extend(ids[: n.value])
                continue
            if kind != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                raise InvalidRequest("only images are read, not audio", param="messages")
            key = mtmd.mtmd_input_chunk_get_id(chunk) or b""
            picture = by_id.get(key)
            if picture is None:
                raise InvalidRequest(
                    "an image could not be matched to its place in the prompt", param="messages"
                )
            part = parts[key] = parts.get(key, -1) + 1
            n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
            non_causal = bool(mtmd.mtmd_decode_use_non_causal(self.ctx, chunk))
            owned = mtmd.mtmd_input_chunk_copy(chunk)
            images.append(ImageChunk(len(tokens), n_tokens, n_pos, owned, non_causal))
            tokens.extend(_placeholders(picture.digest, part, n_tokens))
        return tokens, tuple(images)

    def close(self) -> None:
        if self.ctx:
            _mtmd().mtmd_free(self.ctx)
            self.ctx = None


def open_projector(
    path: Path | None, model: Any, text_n_embd: int, n_threads: int, gpu: bool
) -> tuple[Projector | None, str | None]:
    """The model's projector, or why it has none that works (the model still serves text)."""
    if path is None:
        return None, None
    try:
        return Projector(path, model, text_n_embd, n_threads=n_threads, gpu=gpu), None
    except ProjectorRefused as exc:
        logger.warning("projector refused: %s", exc)
        return None, str(exc)
