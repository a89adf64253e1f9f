"""compose.yaml, its CPU override and the Dockerfiles, checked statically: no Docker engine runs
here. The topology tests then start each service's own command from compose.yaml as a process."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from pendra_shared.config import Settings

from tests.support.stack import ROOT, interpolate, load_compose

SCHEMA = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
ENV = {
    "PENDRA_MIRROR_SECRET_KEY": "a-secret-of-length",
    "PENDRA_REDIS_PASSWORD": "0123abcdef",
    "PENDRA_GRAFANA_PASSWORD": "a-grafana-password",
}
COMBINATIONS = [
    ("compose.yaml",),
    ("compose.yaml", "compose.cpu.yaml"),
    ("compose.yaml", "compose.vulkan.yaml"),
    ("compose.yaml", "compose.gpus.yaml"),
]


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


@pytest.mark.parametrize("files", COMBINATIONS)
def test_compose_files_follow_the_compose_spec(files: tuple[str, ...]) -> None:
    # The schema names draft 2019-09 by an address jsonschema does not know; say it plainly.
    jsonschema.Draft201909Validator(SCHEMA).validate(load_compose(*files))


def test_the_stack_has_the_designed_shape() -> None:
    services = load_compose()["services"]
    assert set(services) == {
        "redis", "minio", "minio-init", "fetcher", "inference", "api", "prometheus", "grafana"
    }  # fmt: skip
    assert [name for name, s in services.items() if "ports" in s] == ["api", "grafana"]
    gpu = services["inference"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]

    def mount(service: str) -> tuple[str, bool]:
        (volume,) = [v for v in services[service]["volumes"] if "/models" in str(v)]
        if isinstance(volume, str):
            return volume.split(":")[0], volume.endswith(":ro")
        return volume["source"], bool(volume.get("read_only"))

    assert mount("fetcher") == ("models", False)
    assert mount("inference") == ("models", True)
    assert mount("api") == ("models", True)
    for name, service in services.items():
        if name != "minio-init":
            assert "healthcheck" in service, name
    assert services["api"]["depends_on"]["inference"] == {"condition": "service_started"}
    assert services["fetcher"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert services["fetcher"]["depends_on"]["minio-init"] == {"condition": "service_completed_successfully"}


@pytest.mark.parametrize("secret", sorted(ENV))
def test_unset_secrets_stop_compose_before_anything_starts(secret: str) -> None:
    strings = _strings(load_compose())
    for value in strings:
        interpolate(value, ENV)  # all set: fine
    others = {name: value for name, value in ENV.items() if name != secret}
    for variables in (others, {**others, secret: ""}):  # unset, or set to nothing
        with pytest.raises(ValueError, match=secret):
            for value in strings:
                interpolate(value, variables)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    return {key: interpolate(str(value), ENV) for key, value in service.get("environment", {}).items()}


@pytest.mark.parametrize("files", COMBINATIONS)
def test_only_the_api_and_grafana_publish_a_port(files: tuple[str, ...]) -> None:
    services = load_compose(*files)["services"]
    assert [name for name, s in services.items() if "ports" in s] == ["api", "grafana"]
    # Both on loopback unless the operator says otherwise.
    for name, default in (("api", "127.0.0.1:8080:8080"), ("grafana", "127.0.0.1:3000:3000")):
        (published,) = services[name]["ports"]
        assert interpolate(published, {}) == default
    assert all(s.get("network_mode") != "host" for s in services.values())
    assert "ports" not in services["redis"] and "expose" not in services["redis"]


@pytest.mark.parametrize("files", COMBINATIONS)
def test_redis_requires_the_password_from_env(files: tuple[str, ...]) -> None:
    redis = load_compose(*files)["services"]["redis"]
    command = [str(part) for part in redis["command"]]
    assert command[0] == "redis-server"  # the image's entrypoint drops root for redis-server only
    password = command[command.index("--requirepass") + 1]
    assert password.startswith("${PENDRA_REDIS_PASSWORD:?")  # required: compose refuses without it
    assert interpolate(password, ENV) == ENV["PENDRA_REDIS_PASSWORD"]
    # The healthcheck authenticates through redis-cli's variable, not `-a` on its command line, and
    # fails on a NOAUTH answer (redis-cli exits 0 on an error reply).
    assert _environment(redis)["REDISCLI_AUTH"] == ENV["PENDRA_REDIS_PASSWORD"]
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "PONG" in test and " -a " not in test and "--pass" not in test


@pytest.mark.parametrize("files", COMBINATIONS)
def test_every_service_that_talks_to_redis_has_the_password(files: tuple[str, ...]) -> None:
    services = load_compose(*files)["services"]
    talking = {name for name, s in services.items() if "redis" in s.get("depends_on", {})}
    with_url = {name for name, s in services.items() if "PENDRA_REDIS_URL" in s.get("environment", {})}
    assert talking == with_url == {"api", "fetcher"}
    for name in with_url:
        url = urlsplit(_environment(services[name])["PENDRA_REDIS_URL"])
        assert (url.scheme, url.hostname, url.port, url.path) == ("redis", "redis", 6379, "/0"), name
        assert url.password == ENV["PENDRA_REDIS_PASSWORD"], name


def test_the_cpu_override_drops_the_gpu_and_builds_the_cpu_image() -> None:
    inference = load_compose("compose.yaml", "compose.cpu.yaml")["services"]["inference"]
    assert "deploy" not in inference
    assert inference["build"]["dockerfile"] == "docker/inference.cpu.Dockerfile"


def test_the_vulkan_override_passes_the_gpu_nodes_and_builds_the_vulkan_image() -> None:
    inference = load_compose("compose.yaml", "compose.vulkan.yaml")["services"]["inference"]
    assert "deploy" not in inference  # no NVIDIA reservation
    assert inference["build"]["dockerfile"] == "docker/inference.vulkan.Dockerfile"
    assert inference["devices"] == ["/dev/dri:/dev/dri"]
    (render,) = [g for g in inference["group_add"] if "PENDRA_RENDER_GID" in g]
    assert interpolate(render, {"PENDRA_RENDER_GID": "992"}) == "992"
    with pytest.raises(ValueError, match="PENDRA_RENDER_GID"):
        interpolate(render, {})


@pytest.mark.parametrize("service", ["fetcher", "inference", "api"])
def test_each_service_command_is_a_real_module(service: str) -> None:
    command = load_compose()["services"][service]["command"]
    assert command[:2] == ["python", "-m"]
    assert importlib.util.find_spec(command[2]) is not None


def _dockerfile(path: str) -> str:
    return (ROOT / path).read_text()


def _final_stage(text: str) -> str:
    return text[text.rindex("\nFROM ") :]


INFERENCE_IMAGES = {
    "cpu": "docker/inference.cpu.Dockerfile",
    "cuda": "docker/inference.cuda.Dockerfile",
    "vulkan": "docker/inference.vulkan.Dockerfile",
}


@pytest.mark.parametrize("path", ["docker/service.Dockerfile", *INFERENCE_IMAGES.values()])
def test_dockerfiles_pin_their_bases_copy_what_exists_and_run_as_a_user(path: str) -> None:
    text = _dockerfile(path)
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    for image in re.findall(r"^FROM (\S+)", text, re.MULTILINE):
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, tag = resolved.rpartition(":")
        assert name and re.search(r"\d", tag) and tag != "latest", resolved
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for part in source.split():
            assert (ROOT / part).exists(), f"{path} copies {part}, which is not in the repository"
    user = re.findall(r"^USER (\S+)$", _final_stage(text), re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(
        r"(uv sync|llama_build.py sync --gpu \w+ --) --frozen --no-dev --no-editable --package", text
    )
    assert "uv==" in text  # the uv that reads uv.lock is pinned


@pytest.mark.parametrize("gpu", sorted(INFERENCE_IMAGES))
def test_each_inference_image_builds_llama_cpp_through_the_project_script(gpu: str) -> None:
    """The image's llama.cpp is built as the project decides (pyproject.toml's settings plus
    scripts/llama_build.py's GPU backend), never from compiler defaults or CMAKE_ARGS."""
    text = _dockerfile(INFERENCE_IMAGES[gpu])
    (line,) = re.findall(r"python3? scripts/llama_build.py sync --gpu (\w+) --", text)
    assert line == gpu
    assert "CMAKE_ARGS" not in text and "GGML_NATIVE" not in text
    build = re.findall(r"apt-get install[^&]*", text.split("\nFROM ")[1])[0]
    if gpu == "vulkan":
        for package in ("libvulkan-dev", "glslc", "spirv-headers"):
            assert package in build


def test_the_inference_image_builds_llama_cpp_with_cuda_and_runs_on_the_matching_runtime() -> None:
    text = _dockerfile("docker/inference.cuda.Dockerfile")
    bases = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert bases == [
        "nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU}",
        "nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}",
    ]


@pytest.mark.parametrize(
    ("package", "slim"), [("pendra-api", True), ("pendra-fetcher", True), ("pendra-inference", False)]
)
def test_only_the_inference_image_contains_llama_cpp(package: str, slim: bool) -> None:
    exported = subprocess.run(
        ["uv", "export", "--package", package, "--frozen", "--no-dev", "--no-hashes"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    requirements = [line for line in exported.splitlines() if line and not line.lstrip().startswith("#")]
    has_llama = any(line.startswith("llama-cpp-python") for line in requirements)
    assert has_llama is not slim


def test_the_build_context_leaves_out_what_images_do_not_need() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests", ".env", "*.gguf"):
        assert entry in ignored
    for service in ("api", "fetcher"):
        build = load_compose()["services"][service]["build"]
        assert build["dockerfile"] == "docker/service.Dockerfile"
        assert build["args"]["PACKAGE"] == f"pendra-{service}"


@pytest.mark.parametrize(
    ("publish", "keys", "starts"),
    [
        ("127.0.0.1:8080", "", True),
        ("0.0.0.0:8080", "", False),
        ("8080", "", False),
        ("0.0.0.0:8080", "k", True),
    ],
)
def test_the_api_judges_exposure_by_where_compose_publishes_it(
    tmp_path: Any, publish: str, keys: str, starts: bool
) -> None:
    """The api listens on the container's 0.0.0.0 whatever happens; published beyond loopback
    without keys, it refuses to start, saying how to proceed."""
    import os
    import sys

    from tests.support.server import free_port
    from tests.support.stack import service_process

    variables = {
        "PENDRA_REDIS_PASSWORD": "x",
        "PENDRA_MIRROR_SECRET_KEY": "x",
        "PENDRA_PUBLISH": publish,
        "PENDRA_API_KEYS": keys,
    }
    _command, env = service_process("api", variables, {})
    env.update(PENDRA_PORT=str(free_port()), PENDRA_MODELS_DIR=str(tmp_path), PENDRA_HOST="127.0.0.1")
    probe = (
        "from pendra_shared.config import load_settings\n"
        "from pendra_shared.http_guard import check_exposure\n"
        "s = load_settings()\n"
        "check_exposure(s, authenticated=bool(s.api_key_list))\n"
        "print('would start')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode == 0) is starts, done.stderr
    if not starts:
        assert "refusing to listen" in done.stderr and "PENDRA_API_KEYS" in done.stderr


def test_inference_is_open_only_on_the_compose_network_and_services_get_time_to_drain() -> None:
    services = load_compose()["services"]
    assert _environment(services["inference"])["PENDRA_ALLOW_OPEN"] == "1"
    assert "ports" not in services["inference"]
    for name in ("api", "inference"):
        grace = int(str(services[name]["stop_grace_period"]).removesuffix("s"))
        timeout = interpolate(_environment(services[name])["PENDRA_SHUTDOWN_TIMEOUT_S"], {})
        assert grace > float(timeout) + 5, name


def test_monitoring_scrapes_every_service_and_provisions_the_dashboard() -> None:
    services = load_compose()["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    # Each target is a service's own port on the compose network.
    assert targets == {"api:8080", "inference:8081", "fetcher:8082"}
    fetcher = _environment(services["fetcher"])
    assert fetcher["PENDRA_FETCHER_PORT"] == "8082" and services["fetcher"]["expose"] == ["8082"]
    assert "8081" in services["inference"]["expose"] and "ports" not in prometheus
    env = _environment(grafana)
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == ENV["PENDRA_GRAFANA_PASSWORD"]
    # Required like the other secrets (test_unset_secrets_stop_compose_before_anything_starts).
    assert str(grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]).startswith("${PENDRA_GRAFANA_PASSWORD:?")
    for service in (prometheus, grafana):
        assert service["healthcheck"]["test"] and service.get("restart") == "unless-stopped"
    assert (env["GF_AUTH_ANONYMOUS_ENABLED"], env["GF_AUTH_ANONYMOUS_ORG_ROLE"]) == ("true", "Viewer")
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    for image in (prometheus["image"], grafana["image"]):
        assert ":" in image and not image.endswith(":latest"), image


def test_prometheus_may_scrape_the_api_by_its_compose_name() -> None:
    """Published on loopback without keys, the api answers only local Host names (a DNS-rebinding
    guard); Prometheus asks for `api:8080`, which compose adds to PENDRA_ALLOWED_HOSTS."""
    from pendra_shared.config import load_settings
    from pendra_shared.http_guard import host_allowed

    api = load_compose()["services"]["api"]
    env = _environment(api)
    assert env["PENDRA_ALLOW_OPEN"] == "false" and env["PENDRA_API_KEYS"] == ""  # the guarded case
    for extra in ("", "pendra.example.com"):
        allowed = interpolate(
            str(api["environment"]["PENDRA_ALLOWED_HOSTS"]), {"PENDRA_ALLOWED_HOSTS": extra}
        )
        settings = load_settings(allowed_hosts=allowed)
        assert host_allowed("api:8080", settings.allowed_host_list)
        assert not host_allowed("evil.example.net:8080", settings.allowed_host_list)
        if extra:
            assert host_allowed("pendra.example.com", settings.allowed_host_list)


@pytest.mark.parametrize("files", COMBINATIONS)
def test_inference_remembers_its_cpu_variant_where_it_may_write(files: tuple[str, ...]) -> None:
    """A container on a host whose best CPU variant dies starts with the next one; the verdict is
    kept in PENDRA_CACHE_DIR, which each inference image sets to a folder its user owns (its home,
    /nonexistent, is not) and compose keeps on a volume across re-creations."""
    for path in INFERENCE_IMAGES.values():
        final = _final_stage(_dockerfile(path))
        assert re.search(r"^ENV .*PENDRA_CACHE_DIR=/var/cache/pendra\b", final, re.MULTILINE), path
        assert re.search(
            r"mkdir [^&]*/var/cache/pendra && chown 10001:10001 [^&]*/var/cache/pendra", final
        ), path
    compose = load_compose(*files)
    assert "inference-cache:/var/cache/pendra" in compose["services"]["inference"]["volumes"]
    assert "inference-cache" in compose["volumes"]


def test_the_gpus_override_runs_one_inference_service_per_gpu_behind_the_api() -> None:
    services = load_compose("compose.yaml", "compose.gpus.yaml")["services"]
    inference = {
        name: s for name, s in services.items() if s.get("command") == ["python", "-m", "pendra_inference"]
    }
    assert set(inference) == {"inference", "inference-1"}
    gpus = []
    for service in inference.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        # the same image, volumes and health check as the one inference service of compose.yaml
        assert service["image"] == services["inference"]["image"] and service["healthcheck"]
        assert {"models", "inference-cache"} <= {
            v["source"] if isinstance(v, dict) else v.split(":")[0] for v in service["volumes"]
        }
    assert sorted(gpus) == ["0", "1"]  # one GPU each
    urls = _environment(services["api"])["PENDRA_INFERENCE_URL"].split(",")
    assert urls == [f"http://{name}:8081" for name in inference]
    (config,) = [
        a.split("=", 1)[1] for a in services["prometheus"]["command"] if a.startswith("--config.file=")
    ]
    scraped = yaml.safe_load((ROOT / "deploy" / "prometheus" / Path(config).name).read_text())
    targets = {t for job in scraped["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {"api:8080", "fetcher:8082", *(u.removeprefix("http://") for u in urls)}
    assert Settings(inference_url=",".join(urls)).inference_urls == urls  # the api takes the list
