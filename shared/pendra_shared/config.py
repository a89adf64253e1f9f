"""Pendra's settings: defaults, then the config file, then `PENDRA_*` environment variables.

`load_settings()` is the one factory; tests feed it keyword overrides. The config file is TOML at
`~/.pendra/config.toml`, or wherever `PENDRA_CONFIG` points. `describe_settings()` tells, for every
field, the value in force and where it came from, for `pendra config`.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pendra_shared.errors import ConfigError

ENV_PREFIX = "PENDRA_"
CONFIG_ENV = "PENDRA_CONFIG"
_LOCATION_RE = re.compile(r"(?:https?|file|s3)://[^/:]*(?::\d+)?[^:]*|[^:]+", re.IGNORECASE)


def default_models_dir(platform: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The store when nothing overrides it: `%ProgramData%\\Pendra\\models` or `~/.pendra/models`."""
    platform = sys.platform if platform is None else platform
    environ = os.environ if environ is None else environ
    if platform.startswith("win"):
        program_data = environ.get("ProgramData") or environ.get("PROGRAMDATA") or r"C:\ProgramData"
        return Path(PureWindowsPath(program_data, "Pendra", "models"))
    return Path.home() / ".pendra" / "models"


def default_cache_dir(platform: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """Where Pendra remembers what it learnt of this host (the user's cache): `$XDG_CACHE_HOME/pendra`
    or `~/.cache/pendra`, `~/Library/Caches/Pendra` on macOS, `%LOCALAPPDATA%\\Pendra\\cache`."""
    platform = sys.platform if platform is None else platform
    environ = os.environ if environ is None else environ
    if platform.startswith("win"):
        local = environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(PureWindowsPath(local, "Pendra", "cache"))
    if platform == "darwin":
        return Path.home() / "Library" / "Caches" / "Pendra"
    xdg = environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "pendra"


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    explicit = environ.get(CONFIG_ENV)
    return Path(explicit).expanduser() if explicit else Path.home() / ".pendra" / "config.toml"


def split_locations(value: str, sep: str = os.pathsep) -> list[str]:
    """Split a `PENDRA_CATALOGUE`-style list on the path separator, keeping URLs whole.

    On Unix the separator is `:`, which also follows a URL's scheme and comes before its port,
    so URLs are matched as a whole before splitting what is left.
    """
    if sep != ":":
        return [piece.strip() for piece in value.split(sep) if piece.strip()]
    return [m.group(0).strip() for m in _LOCATION_RE.finditer(value) if m.group(0).strip()]


class _TomlFileSource(PydanticBaseSettingsSource):
    """Values from the TOML config file; a missing file contributes nothing."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls)
        self.path = path
        self.values = read_config_file(path)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        known = ", ".join(sorted(Settings.model_fields))
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; known: {known}")
    return data


class Settings(BaseSettings):
    """Every setting Pendra reads. Environment variables are the field names upper-cased with
    the `PENDRA_` prefix; the config file uses the field names as keys."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    models_dir: Path = Field(
        default_factory=default_models_dir,
        description="The modelstore: the directory of GGUF files and their sidecars.",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description=(
            "Where Pendra remembers what it learnt of this host: which llama.cpp CPU variant lives "
            "here (per build and CPU), so later starts skip the variants that died."
        ),
    )
    catalogue: str = Field(
        default="",
        description=(
            "Extra catalogue files or URLs merged over the bundled one, separated by the path "
            "separator (':' on Unix, ';' on Windows)."
        ),
    )
    download_retries: int = Field(
        default=5,
        ge=0,
        le=100,
        description="How many times a failed download is retried (resuming) before giving up.",
    )
    download_backoff_s: float = Field(
        default=1.0,
        ge=0,
        le=600,
        description="First wait between download retries, in seconds; it doubles each retry.",
    )
    download_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Network timeout for connecting and for each read during a download.",
    )

    host: str = Field(default="127.0.0.1", description="Address `pendra serve` listens on.")
    port: int = Field(default=8080, ge=1, le=65535, description="Port `pendra serve` listens on.")
    max_loaded_models: int = Field(
        default=3,
        ge=1,
        le=64,
        description="Most models kept loaded at once; the least recently used idle one goes.",
    )
    memory_budget_bytes: int | None = Field(
        default=None,
        ge=0,
        description="RAM (or VRAM) the loaded models may use together; default: 75% of physical memory.",
    )
    keep_alive: str = Field(
        default="5m",
        description=(
            "How long an idle model stays loaded (Ollama style: 30s, 5m, 1h; 0 unloads at once; -1 never)."
        ),
    )
    n_ctx: int = Field(
        default=4096,
        ge=0,
        description="Context length per model, capped at its trained length; 0 = trained length.",
    )
    n_batch: int = Field(default=512, ge=1, description="Logical batch size for prompt processing.")
    n_ubatch: int = Field(default=512, ge=1, description="Physical batch size for prompt processing.")
    n_threads: int | None = Field(
        default=None, ge=1, description="CPU threads per model; default: all cores."
    )
    n_gpu_layers: int | None = Field(
        default=None,
        ge=-1,
        description="Layers offloaded to the GPU; default: all when the build has a GPU backend, else 0.",
    )
    parallel: int = Field(
        default=0,
        ge=0,
        le=256,
        description=(
            "Sequences of n_ctx tokens a chat model's KV cache holds (the cache is n_ctx × this); "
            "0 = chosen from the memory budget (up to 8 on a CPU, 32 on a GPU). Requests are admitted "
            "while their prompt and max_tokens fit, so short requests run many more at once."
        ),
    )
    prefill_budget: int = Field(
        default=128,
        ge=1,
        description=(
            "Prompt tokens decoded per step while other requests generate (chunked prefill): lower "
            "keeps their inter-token latency steady, higher brings a long prompt's first token sooner."
        ),
    )
    max_queue: int = Field(
        default=512,
        ge=0,
        description="Requests that may wait per model; past it a request gets 503 with Retry-After.",
    )
    queue_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Longest a request waits in a model's queue before it gets 503 with Retry-After.",
    )
    flash_attention: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "llama.cpp's flash attention for chat models. auto: on with a GPU, off on a CPU, where "
            "llama.cpp's results then do not depend on what shares the batch (same seed, same text "
            "under load); on: faster attention on a CPU when many sequences or cached prefixes "
            "fill the cache, with answers that vary in the last bits with the batch."
        ),
    )
    prefix_cache: bool = Field(
        default=True,
        description=(
            "Keep finished sequences' KV cells and share any cached prompt prefix with new requests "
            "(a chat's next turn, a common system prompt)."
        ),
    )
    backend_sampling: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "Sample in llama.cpp's graph (temperature, top-k, top-p, min-p, penalties, logit bias, "
            "greedy) so only the token id leaves it, for every request without a grammar, logprobs "
            "or n > 1; those sample on the host. Same text either way for greedy and seeded "
            "requests. auto: on with a GPU; off on a CPU, where the graph's sampling cost more "
            "than the host's here (bench/bench_sampling.py: 2-39% more a step)."
        ),
    )
    checkpoint_budget_bytes: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Host memory for checkpoints of recurrent and hybrid models' states (Qwen3.5/3.6, "
            "Granite 4 -h, Mamba) and of sliding-window models' last window (Gemma 2 and 3), which "
            "let a new request reuse a cached prefix of such a model; counted in the model's memory. "
            "Unset: room for two checkpoints per sequence; 0: none (only whole cached sequences are "
            "reused)."
        ),
    )
    cpu_variant: str = Field(
        default="",
        description=(
            "llama.cpp CPU variant to load (haswell, skylakex, zen4, ...), never overridden; default: "
            "the best-scored variant that lives through the self-check here. `pendra doctor` lists "
            "the build's variants."
        ),
    )
    selfcheck: bool = Field(
        default=True,
        description=(
            "Before serving, decode the self-check model in a child process with the chosen CPU "
            "variant, so that a llama.cpp build this host cannot run is a clear error at start "
            "rather than a crash on a request. false skips it when the variant for this build and "
            "CPU is already remembered; a new build or CPU is always checked."
        ),
    )
    max_embedding_inputs: int = Field(
        default=2048, ge=1, description="Most inputs one /v1/embeddings request may carry."
    )
    embed_batch_tokens: int = Field(
        default=256,
        ge=1,
        description=(
            "Most tokens one embedding decode packs, from all waiting /v1/embeddings requests of a "
            "model (capped at its context); an input longer than this is decoded alone. Bigger is "
            "not always faster on a CPU: attention spans the whole decode. A sidecar's "
            "options.embed_batch_tokens sets it per model; raise it on a GPU."
        ),
    )
    preload: str = Field(default="", description="Models to load at start, comma-separated.")

    # -- limits on what clients and files may ask of Pendra (hardening) ----------------------------
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Largest request body any route accepts, in bytes; past it: 413 before buffering.",
    )
    receive_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description=(
            "Time a client has to send a request's headers and body once it connects (or starts the "
            "next request on a kept-alive connection); past it the connection is closed."
        ),
    )
    max_messages: int = Field(default=4096, ge=1, description="Most messages one chat request may carry.")
    max_tools: int = Field(default=128, ge=0, description="Most tools one chat request may declare.")
    max_stop: int = Field(default=4, ge=0, le=64, description="Most stop strings one request may give.")
    max_stop_chars: int = Field(default=256, ge=1, description="Longest stop string, in characters.")
    max_schema_bytes: int = Field(
        default=64 * 1024,
        ge=64,
        description="Largest JSON schema (response_format or a tool's parameters), as compact JSON bytes.",
    )
    max_schema_depth: int = Field(
        default=32, ge=2, description="Deepest nesting of objects and arrays in a JSON schema."
    )
    gguf_max_string_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description=(
            "Longest metadata string read from a GGUF header (a chat template, say); a file with a "
            "longer one is invalid."
        ),
    )
    gguf_max_array_len: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Most elements of one GGUF metadata array (a vocabulary, its merges); more: invalid.",
    )
    template_max_chars: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Most characters a chat template may render for one request; past it: 400.",
    )
    reasoning_format: Literal["auto", "none"] = Field(
        default="auto",
        description=(
            "What a thinking model's reasoning becomes: auto, a message's reasoning_content (Ollama: "
            "message.thinking); none, left inline in the content, tags and all (llama-server's "
            "--reasoning-format none). A request's reasoning_format overrides it."
        ),
    )
    image_max_bytes: int = Field(
        default=5 * 1024 * 1024,
        ge=1024,
        description=(
            "Largest image one request may carry, in bytes (encoded); past it: 400. A data URL is a "
            "third larger than its image, and the whole body must fit PENDRA_MAX_BODY_BYTES."
        ),
    )
    image_max_pixels: int = Field(
        default=16_000_000,
        ge=64,
        description="Most pixels (width x height, read from the header before decoding) of one image.",
    )
    max_images: int = Field(default=8, ge=0, description="Most images one chat request may carry.")
    image_urls: bool = Field(
        default=False,
        description=(
            "Fetch http(s) image URLs in chat requests (data URLs are always read), from public "
            "addresses only unless PENDRA_ALLOW_PRIVATE_SOURCES, as installs are."
        ),
    )
    template_timeout_s: float = Field(
        default=1.0,
        gt=0,
        le=600,
        description="Longest a chat template may take to render one request; past it: 400.",
    )
    download_size_slack_bytes: int = Field(
        default=0,
        ge=0,
        description=(
            "Bytes a download may run past the size its catalogue entry pins before it is aborted "
            "(0: abort at the pinned size + 1 byte)."
        ),
    )
    download_max_bytes: int = Field(
        default=1024**4,
        ge=1,
        description="Largest download for a catalogue entry that pins no size, in bytes (1 TiB).",
    )
    download_stall_s: float = Field(
        default=120.0,
        gt=0,
        le=86400,
        description=(
            "A download that receives less than PENDRA_DOWNLOAD_STALL_BYTES in this many seconds is "
            "stalled: it is dropped and retried (resuming)."
        ),
    )
    download_stall_bytes: int = Field(
        default=64 * 1024,
        ge=1,
        description="Bytes a download must receive in each PENDRA_DOWNLOAD_STALL_S window.",
    )
    allow_private_sources: bool = Field(
        default=False,
        description=(
            "Let installs (and their redirects) reach loopback, link-local, private and cloud-metadata "
            "addresses; off, only public addresses (a catalogue entry's allow_private opts one in)."
        ),
    )
    allow_hf: bool | None = Field(
        default=None,
        description=(
            "Allow `hf.co/OWNER/REPO:QUANT` installs, pinned to the SHA-256 the Hugging Face API "
            "reports (the pin then comes from the source, not the catalogue). Unset: on for the "
            "CLI's own installs, off for installs asked through the API."
        ),
    )
    hf_endpoint: str = Field(
        default="https://huggingface.co",
        description="The Hugging Face Hub that hf.co/ names resolve against (or a mirror of its API).",
    )
    untrusted_probe: bool = Field(
        default=True,
        description=(
            "Load a GGUF that no pinned install verified (hand-dropped, imported) in a child process "
            "first, so a file that crashes llama.cpp marks the model invalid instead of killing the server."
        ),
    )
    probe_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Longest the child-process probe of an untrusted GGUF may take.",
    )
    shutdown_timeout_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description=(
            "On SIGTERM: new requests get 503 at once, running streams get this long to finish, then "
            "end with an error event; the process then exits 0."
        ),
    )
    allow_open: bool = Field(
        default=False,
        description=(
            "Let a server bound to a non-loopback address start without PENDRA_API_KEYS (anyone who "
            "reaches the port can then use and manage it)."
        ),
    )
    published: str = Field(
        default="",
        description=(
            "Where clients reach this server when it differs from PENDRA_HOST: compose sets it to "
            "PENDRA_PUBLISH (host:port), since the container itself listens on 0.0.0.0. The "
            "open-address check and the Host allow-list judge exposure by it."
        ),
    )
    allowed_hosts: str = Field(
        default="",
        description=(
            "Extra Host header names accepted when bound to loopback without keys, comma-separated "
            "(localhost, loopback and private addresses, *.local, *.internal and this machine's name "
            "are always accepted); guards against DNS rebinding."
        ),
    )

    # -- the service set (compose) and the API in front of it ------------------------------------
    api_keys: str = Field(
        default="",
        description=(
            "Bearer tokens the API accepts, comma-separated; empty: no authentication. "
            "/health, /ready and /metrics stay open."
        ),
    )
    cors_origins: str = Field(
        default="", description="Origins allowed to call the API from a browser, comma-separated; * for any."
    )
    api_url: str = Field(
        default="",
        description="A running Pendra API for `pendra models` to act through (e.g. http://gpu-box:8080).",
    )
    api_key: str = Field(default="", description="The bearer token `pendra models` sends to PENDRA_API_URL.")
    inference_url: str = Field(
        default="http://127.0.0.1:8081",
        description=(
            "Where the API service reaches the inference service (compose: http://inference:8081); "
            "several, comma-separated, are routed between by model, conversation and load."
        ),
    )
    inference_resolve: bool = Field(
        default=False,
        description=(
            "Resolve each PENDRA_INFERENCE_URL's host again every poll and route between all its "
            "addresses (a Kubernetes headless Service: one per ready inference pod)."
        ),
    )
    inference_poll_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="How often the API reads each inference endpoint's /status when there are several.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis holding the install queue and job progress (API and fetcher services).",
    )
    mirror_url: str = Field(
        default="",
        description=(
            "S3/MinIO mirror for GGUF blobs as http(s)://host:port/bucket; empty: no mirror. "
            "The fetcher installs from it first and uploads what it verified upstream."
        ),
    )
    mirror_access_key: str = Field(default="", description="Access key for PENDRA_MIRROR_URL.")
    mirror_secret_key: str = Field(default="", description="Secret key for PENDRA_MIRROR_URL.")
    install_concurrency: int = Field(
        default=2, ge=1, le=32, description="Installs one fetcher (or `pendra serve`) runs at once."
    )
    job_lease_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description=(
            "How long a fetcher may go silent before its job is taken over by another (or a restarted) "
            "fetcher, resuming from the bytes on disk."
        ),
    )

    fetcher_port: int = Field(
        default=8082,
        ge=0,
        le=65535,
        description=(
            "Port of the fetcher's `/metrics` (Prometheus), on PENDRA_HOST; 0: none. Only the fetcher "
            "service reads it: `pendra serve` has its metrics on its own `/metrics`."
        ),
    )

    @field_validator("models_dir", "cache_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def catalogue_locations(self) -> list[str]:
        return split_locations(self.catalogue)

    @field_validator("inference_url", mode="after")
    @classmethod
    def _inference_urls(cls, value: str) -> str:
        urls = [u.strip() for u in value.split(",") if u.strip()]
        if not urls:
            raise ValueError("PENDRA_INFERENCE_URL names no URL")
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http(s) URL with a host")
        return ",".join(urls)

    @property
    def inference_urls(self) -> list[str]:
        return self.inference_url.split(",")

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    @property
    def allowed_host_list(self) -> list[str]:
        return [host.strip().lower() for host in self.allowed_hosts.split(",") if host.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _TomlFileSource(settings_cls, default_config_path())


def load_settings(**overrides: Any) -> Settings:
    """Resolve the settings: overrides, then environment, then config file, then defaults."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None


SECRET_SETTINGS = frozenset({"api_keys", "api_key", "mirror_secret_key"})
_URL_PASSWORD_RE = re.compile(r"(://[^/@:]*:)[^/@]+@")


def shown(name: str, value: Any) -> Any:
    """A setting's value as `pendra config` may print it: keys as ***, passwords in URLs too."""
    if name in SECRET_SETTINGS and value:
        return "***"
    if isinstance(value, str):
        return _URL_PASSWORD_RE.sub(r"\1***@", value)
    return value


@dataclass(frozen=True)
class SettingReport:
    name: str
    value: Any
    source: str
    description: str


def describe_settings(settings: Settings, environ: Mapping[str, str] | None = None) -> list[SettingReport]:
    """Each setting's value and its origin: `env PENDRA_X`, `file PATH` or `default`."""
    environ = os.environ if environ is None else environ
    path = default_config_path(environ)
    in_file = read_config_file(path)
    reports = []
    for name, field in Settings.model_fields.items():
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            source = f"env {env_name}"
        elif name in in_file:
            source = f"file {path}"
        else:
            source = "default"
        reports.append(
            SettingReport(name, shown(name, getattr(settings, name)), source, field.description or "")
        )
    return reports
