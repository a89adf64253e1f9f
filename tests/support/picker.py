"""The endpoint picker of the Gateway API Inference Extension as Pendra deploys it: the metrics it
is configured to read (its EndpointPickerConfig in deploy/kubernetes/components/inference-gateway),
for the contract tests that read a real server's `/metrics` the way it does."""

from __future__ import annotations

from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.kustomize import render
from tests.support.stack import ROOT

GATEWAY_OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "gpu-gateway"

# What the picker reads, by role, and the series of Pendra's inference service that serve it.
PICKER_METRICS = {
    "waiting": "pendra_server_requests_waiting",
    "running": "pendra_server_requests_running",
    "kv_usage": "pendra_server_kv_cache_usage_ratio",
    "lora": "pendra_server_models_info",
}
SPECS = {
    "waiting": "queuedRequestsSpec",
    "running": "runningRequestsSpec",
    "kv_usage": "kvUsageSpec",
    "lora": "loraSpec",
}


def picker_metrics() -> dict[str, str]:
    """The series the picker's metrics extractor reads, by role, from the rendered overlay."""
    (config_map,) = [
        o
        for o in render(GATEWAY_OVERLAY)
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "pendra-endpoint-picker"
    ]
    config = yaml.safe_load(config_map["data"]["endpoint-picker-config.yaml"])
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    (engine,) = extractor["parameters"]["engineConfigs"]
    assert extractor["parameters"]["defaultEngine"] == engine["name"]
    return {role: engine[spec] for role, spec in SPECS.items()}


def picker_scrape(url: str) -> dict[str, Any]:
    """Each picker metric as the endpoint picker takes it: the family by name, a gauge; the one
    sample of an unlabelled series, and for the adapters the latest (highest value) sample."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    out: dict[str, Any] = {}
    for role, name in PICKER_METRICS.items():
        family = families[name]
        assert family.type == "gauge", name
        if role == "lora":
            latest = max(family.samples, key=lambda s: s.value)
            assert set(latest.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
            out[role] = latest.labels
            out["lora_time"] = latest.value
        else:
            (sample,) = family.samples
            assert sample.labels == {}, name
            out[role] = sample.value
    return out


def loaded_in(labels: dict[str, str], key: str) -> set[str]:
    return {m.strip() for m in labels[key].split(",") if m.strip()}
