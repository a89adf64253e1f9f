"""The README's metrics table against what each service's `/metrics` really exposes, after real
traffic (an install, chat streamed and not, embeddings, a refused key), on both shapes: every
exposed `pendra_` family is in the table with its type, help text and labels, and every row is
exposed by the services the table names."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai

from tests.support.metrics_table import Documented, compare, documented_metrics, exposed_metrics
from tests.support.stack import ComposeStack
from tests.topology.conftest import Stack

KEY = "metrics-table-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Series that this traffic must have given samples, so their labels are checked too.
SAMPLED = {
    "inference": {
        "pendra_prompt_tokens",
        "pendra_generation_tokens",
        "pendra_requests",
        "pendra_model_loads",
        "pendra_time_to_first_token_seconds",
    },
    "api": {"pendra_api_requests", "pendra_api_auth_failures", "pendra_install_jobs_active"},
    "fetcher": {"pendra_install_jobs", "pendra_install_download_bytes"},
}


def drive(stack: Stack) -> None:
    base = stack.api_url
    assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401  # an auth failure
    for model in ("gemma3:270m", "gemma-embed:270m"):
        started = httpx.post(f"{base}/api/models/install", json={"model": model}, headers=AUTH, timeout=30)
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
        deadline = time.monotonic() + 120
        while True:
            job = httpx.get(f"{base}/api/jobs/{job_id}", headers=AUTH, timeout=10).json()
            if job["state"] == "done":
                break
            assert job["state"] not in ("failed", "cancelled") and time.monotonic() < deadline, job
            time.sleep(0.2)
    with openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        deadline = time.monotonic() + 30
        while {m.id for m in client.models.list()} != {"gemma3:270m", "gemma-embed:270m"}:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        messages = [{"role": "user", "content": "Name a colour."}]
        client.chat.completions.create(model="gemma3:270m", messages=messages, max_tokens=4)  # type: ignore[arg-type]
        for _ in client.chat.completions.create(
            model="gemma3:270m",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=4,
            stream=True,
        ):
            pass
        client.embeddings.create(model="gemma-embed:270m", input=["a line", "another"])


def check(rows: list[Documented], url: str, where: str, sampled: set[str]) -> list[str]:
    exposed = exposed_metrics(url)
    problems = compare(rows, exposed, where)
    for name in sampled:
        if name not in exposed or not exposed[name].labels:
            problems.append(f"{where}: {name} has no samples with labels after the traffic")
    return problems


def test_the_readme_table_is_what_every_service_exposes(make_stack: Callable[..., Stack]) -> None:
    table = list(documented_metrics().values())
    problems = []
    for kind in ("compose", "embedded"):
        stack = make_stack(kind, env={"PENDRA_API_KEYS": KEY})
        drive(stack)
        if isinstance(stack, ComposeStack):
            urls = {"api": stack.api_url, "inference": stack.inference_url, "fetcher": stack.fetcher_url}
            for service, url in urls.items():
                rows = [d for d in table if service in d.services]
                problems += check(rows, url, f"compose {service}", SAMPLED[service])
        else:  # pendra serve: everything but the gateway's upstream series, on one /metrics
            rows = [d for d in table if not d.gateway_only]
            problems += check(rows, stack.api_url, "pendra serve", set().union(*SAMPLED.values()))
        stack.stop()
    assert not problems, "\n".join(problems)


def test_the_table_is_well_formed() -> None:
    table = documented_metrics()
    assert len(table) >= 30
    for name, row in table.items():
        assert name.startswith("pendra_") and row.type in ("counter", "gauge", "histogram"), row
        assert name.endswith("_total") == (row.type == "counter"), f"{name}: only counters end in _total"
        assert row.services and row.meaning.endswith("."), row
