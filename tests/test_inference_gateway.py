"""The inference gateway and autoscaling components (deploy/kubernetes/components/inference-gateway
and components/autoscaling, rendered through overlays/gpu-gateway): the custom objects against the
OpenAPI schemas of their CRDs at the pinned releases (tests/data/kubernetes-crds), the endpoint
picker against what Gateway API Inference Extension v1.5.0's EPP accepts, and both against what
Pendra's inference service serves and exports. tests/test_kubernetes.py renders the same overlay
through kubectl and the Kubernetes schemas with the others."""

from __future__ import annotations

import ast
import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.kustomize import Object, render
from tests.support.stack import ROOT

K8S = ROOT / "deploy" / "kubernetes"
OVERLAY = K8S / "overlays" / "gpu-gateway"
CRDS = ROOT / "tests" / "data" / "kubernetes-crds"
METRICS_PY = ROOT / "services" / "inference" / "pendra_inference" / "metrics.py"
ROUTES_PY = ROOT / "services" / "inference" / "pendra_inference" / "routes.py"
KUBERNETES_VERSION = "1.31"

RELEASE = "v1.5.0"  # kubernetes-sigs/gateway-api-inference-extension: the pool, objectives, EPP
GATEWAY_API_RELEASE = "v1.6.1"  # kubernetes-sigs/gateway-api: HTTPRoute
EPP_IMAGE = f"registry.k8s.io/gateway-api-inference-extension/epp:{RELEASE}"
POOL, PICKER, GATEWAY = "pendra-inference-pool", "pendra-endpoint-picker", "pendra-inference-gateway"
GATEWAY_LABEL = "gateway.networking.k8s.io/gateway-name"
INFERENCE = {"app.kubernetes.io/name": "pendra", "app.kubernetes.io/component": "inference"}
PICKER_PODS = {"app.kubernetes.io/name": "pendra", "app.kubernetes.io/component": "endpoint-picker"}

# What the picker reads, by role (the names Pendra's inference service exports for it).
PICKER_METRICS = {
    "queuedRequestsSpec": "pendra_server_requests_waiting",
    "runningRequestsSpec": "pendra_server_requests_running",
    "kvUsageSpec": "pendra_server_kv_cache_usage_ratio",
    "loraSpec": "pendra_server_models_info",
}
# The labels EPP v1.5.0 reads adapters from (extractor/metrics/extractor.go): fixed names.
LORA_LABELS = ["running_lora_adapters", "waiting_lora_adapters", "max_lora"]

# EPP v1.5.0's command-line flags: pkg/epp/server/options.go, and the logging options
# (pkg/common/observability/logging/options.go: -v and controller-runtime's zap flags).
EPP_FLAGS = {
    "grpc-port", "ha-enable-leader-election", "pool-group", "pool-namespace", "pool-name",
    "endpoint-selector", "endpoint-target-ports", "disable-endpoint-subset-filter",
    "model-server-metrics-scheme", "model-server-metrics-path", "model-server-metrics-port",
    "model-server-metrics-https-insecure-skip-verify", "refresh-metrics-interval",
    "refresh-prometheus-metrics-interval", "metrics-staleness-threshold",
    "total-queued-requests-metric", "total-running-requests-metric",
    "kv-cache-usage-percentage-metric", "lora-info-metric", "cache-info-metric", "tracing",
    "health-checking", "metrics-port", "grpc-health-port", "enable-pprof", "cert-path",
    "enable-cert-reload", "secure-serving", "metrics-endpoint-auth", "config-file", "config-text",
    "v", "zap-devel", "zap-encoder", "zap-log-level", "zap-stacktrace-level", "zap-time-encoding",
}  # fmt: skip
# Options.Validate refuses these when set ("configure metrics via engineConfigs in
# EndpointPickerConfig instead"), and the deprecated scrape flags the data layer replaced.
EPP_REFUSED_FLAGS = {
    "total-queued-requests-metric", "total-running-requests-metric",
    "kv-cache-usage-percentage-metric", "lora-info-metric", "cache-info-metric",
    "model-server-metrics-scheme", "model-server-metrics-path", "model-server-metrics-port",
    "model-server-metrics-https-insecure-skip-verify",
}  # fmt: skip

# EndpointPickerConfig v1alpha1 as EPP v1.5.0 decodes it (strictly: unknown fields are errors),
# from apix/config/v1alpha1/endpointpickerconfig_types.go, with the parameters of the plugins
# used here from their factories' JSON tags (decoded leniently there: stricter here, so that a
# misspelt parameter fails a test rather than silently taking its default).
_STR: dict[str, Any] = {"type": "string"}
ENGINE_CONFIG_FIELDS = (
    "name", "queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec", "cacheInfoSpec",
    "cacheBlockSizeLabelName", "cacheNumBlocksLabelName", "cacheBlockSizeSpec", "cacheNumBlocksSpec",
)  # fmt: skip
PLUGIN_PARAMETERS: dict[str, dict[str, Any]] = {
    "queue-scorer": {},
    "kv-cache-utilization-scorer": {},
    "lora-affinity-scorer": {},
    "prefix-cache-scorer": {
        "autoTune": {"type": "boolean"},
        "blockSizeTokens": {"type": "integer", "minimum": 1},
        "maxPrefixBlocksToMatch": {"type": "integer", "minimum": 1},
        "maxPrefixTokensToMatch": {"type": "integer", "minimum": 0},
        "lruCapacityPerServer": {"type": "integer", "minimum": 1},
    },
    "metrics-data-source": {
        "scheme": {"enum": ["http", "https"]},
        "path": {"type": "string", "pattern": "^/"},
        "insecureSkipVerify": {"type": "boolean"},
    },
    "core-metrics-extractor": {
        "engineLabelKey": _STR,
        "defaultEngine": _STR,
        "engineConfigs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": dict.fromkeys(ENGINE_CONFIG_FIELDS, _STR),
            },
        },
    },
    "utilization-detector": {
        "queueDepthThreshold": {"type": "integer", "exclusiveMinimum": 0},
        "kvCacheUtilThreshold": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "metricsStalenessThreshold": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"},
        "headroom": {"type": "number", "minimum": 0},
    },
}
_REF: dict[str, Any] = {
    "type": "object",
    "required": ["pluginRef"],
    "additionalProperties": False,
    "properties": {"pluginRef": _STR},
}
PICKER_CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "plugins", "schedulingProfiles"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "inference.networking.x-k8s.io/v1alpha1"},
        "kind": {"const": "EndpointPickerConfig"},
        "featureGates": {"type": "array", "items": _STR},
        "plugins": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type"],
                "additionalProperties": False,
                "properties": {
                    "name": _STR,
                    "type": {"enum": sorted(PLUGIN_PARAMETERS)},
                    "parameters": {"type": "object"},
                },
                "allOf": [
                    {
                        "if": {"properties": {"type": {"const": kind}}},
                        "then": {
                            "properties": {
                                "parameters": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": params,
                                }
                            }
                        },
                    }
                    for kind, params in PLUGIN_PARAMETERS.items()
                ],
            },
        },
        "schedulingProfiles": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "plugins"],
                "additionalProperties": False,
                "properties": {
                    "name": _STR,
                    "plugins": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["pluginRef"],
                            "additionalProperties": False,
                            "properties": {"pluginRef": _STR, "weight": {"type": "number"}},
                        },
                    },
                },
            },
        },
        "saturationDetector": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"pluginRef": _STR},
        },
        "dataLayer": {
            "type": "object",
            "required": ["sources"],
            "additionalProperties": False,
            "properties": {
                "sources": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["pluginRef", "extractors"],
                        "additionalProperties": False,
                        "properties": {"pluginRef": _STR, "extractors": {"type": "array", "items": _REF}},
                    },
                }
            },
        },
        "parser": _REF,
        "flowControl": {"type": "object"},
    },
}


@cache
def _rendered() -> tuple[str, ...]:
    return tuple(json.dumps(o) for o in render(OVERLAY))


def rendered() -> list[Object]:
    return [json.loads(o) for o in _rendered()]  # a fresh copy each time: tests may change it


def find(objects: list[Object], kind: str, name: str) -> Object:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def picker_container(objects: list[Object]) -> dict[str, Any]:
    (c,) = find(objects, "Deployment", PICKER)["spec"]["template"]["spec"]["containers"]
    return dict(c)


def picker_flags(objects: list[Object]) -> dict[str, str]:
    """The picker's arguments, each written `--flag=value` as this deployment does."""
    flags = {}
    for arg in picker_container(objects)["args"]:
        assert re.fullmatch(r"--[a-z][a-z-]*=\S+", arg), arg
        name, _, value = arg[2:].partition("=")
        assert name not in flags, name
        flags[name] = value
    return flags


def picker_config(objects: list[Object]) -> dict[str, Any]:
    """The EndpointPickerConfig the picker reads, from the ConfigMap behind its --config-file."""
    path = Path(picker_flags(objects)["config-file"])
    spec = find(objects, "Deployment", PICKER)["spec"]["template"]["spec"]
    (mount,) = [m for m in picker_container(objects)["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    config_map = find(objects, "ConfigMap", volume["configMap"]["name"])
    config: dict[str, Any] = yaml.safe_load(config_map["data"][path.name])
    return config


def plugin(config: dict[str, Any], kind: str) -> dict[str, Any]:
    (found,) = [p for p in config["plugins"] if p["type"] == kind]
    return dict(found)


# -- the CRDs' schemas ----------------------------------------------------------------------------


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the openAPIV3Schema of that version, from tests/data/kubernetes-crds."""
    schemas = {}
    for path in sorted(CRDS.glob("*.json")):
        crd = json.loads(path.read_text())
        for version, schema in crd["versions"].items():
            schemas[(f"{crd['group']}/{version}", crd["kind"])] = schema
    return schemas


def strict(schema: Any) -> Any:
    """The schema as the API server applies it with kubectl's default (strict) field validation:
    an object's unknown fields are errors, except where the schema keeps unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate_custom(obj: Object) -> None:
    """An object of a CRD: its body against the CRD's schema for its version, its metadata as
    Kubernetes' ObjectMeta (the CRD schemas say only `type: object` for it). The schemas' CEL
    rules (x-kubernetes-validations) are not evaluated: the tests below check by hand those that
    bear on these objects."""
    schema = crd_schemas()[(obj["apiVersion"], obj["kind"])]
    jsonschema.Draft202012Validator(strict(schema)).validate(obj)
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    kubernetes_validate.validate(meta, KUBERNETES_VERSION, strict=True)


def test_the_crd_schemas_are_those_of_the_pinned_releases() -> None:
    bundles = {json.loads(p.read_text())["kind"]: json.loads(p.read_text()) for p in CRDS.glob("*.json")}
    assert {k: b["bundleVersion"] for k, b in bundles.items()} == {
        "InferencePool": RELEASE,
        "InferenceObjective": RELEASE,
        "HTTPRoute": GATEWAY_API_RELEASE,
    }
    assert set(bundles["HTTPRoute"]["versions"]) == {"v1", "v1beta1"}
    readme = (CRDS / "README.md").read_text()
    for text in (RELEASE, GATEWAY_API_RELEASE, "Apache-2.0", "openAPIV3Schema"):
        assert text in readme
    assert len(re.findall(r"\b[0-9a-f]{40}\b", readme)) >= 2  # the commits of both tags


def test_every_custom_object_validates_against_its_crd_schema() -> None:
    custom = [o for o in rendered() if (o["apiVersion"], o["kind"]) in crd_schemas()]
    assert sorted(o["kind"] for o in custom) == [
        "HTTPRoute", "InferenceObjective", "InferenceObjective", "InferencePool"
    ]  # fmt: skip
    for obj in custom:
        validate_custom(obj)


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("InferencePool", ["spec", "targetPorts"], []),  # minItems
        ("InferencePool", ["spec", "endpointPickerRef", "failureMode"], "FailSoftly"),  # enum
        ("InferencePool", ["spec", "selectors"], {}),  # an unknown field
        ("InferenceObjective", ["spec", "priority"], "high"),  # type
        ("HTTPRoute", ["spec", "rules", 0, "matches", 0, "method"], "FETCH"),  # enum
        ("HTTPRoute", ["spec", "rules", 0, "timeouts", "request"], "10 minutes"),  # pattern
        ("HTTPRoute", ["metadata", "lables"], {"a": "b"}),  # ObjectMeta: an unknown field
    ],
)
def test_the_schema_validation_catches_mistakes(kind: str, path: list[Any], value: Any) -> None:
    (obj,) = [o for o in rendered() if o["kind"] == kind][:1]
    broken = copy.deepcopy(obj)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(broken)


# -- the pool ------------------------------------------------------------------------------------------


def test_the_pool_selects_exactly_the_inference_pods_on_their_port() -> None:
    objects = rendered()
    pool = find(objects, "InferencePool", POOL)["spec"]
    selector = pool["selector"]["matchLabels"]
    assert selector == INFERENCE
    inference = find(objects, "Deployment", "pendra-inference")
    assert inference["spec"]["selector"]["matchLabels"] == selector
    assert find(objects, "Service", "pendra-inference")["spec"]["selector"] == selector
    for workload in (o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selected = selector.items() <= labels.items()
        assert selected == (workload["metadata"]["name"] == "pendra-inference"), workload["metadata"]["name"]
    (container,) = inference["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8081}]
    assert pool["targetPorts"] == [{"number": 8081}]  # unique ports: the schema's CEL rule
    assert pool["appProtocol"] == "http"
    # The picker scrapes /metrics on the target port: the same port serves it, unauthenticated.
    annotations = inference["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8081" and annotations["prometheus.io/path"] == "/metrics"


def test_the_pool_names_the_picker_service_and_its_ext_proc_port() -> None:
    objects = rendered()
    ref = find(objects, "InferencePool", POOL)["spec"]["endpointPickerRef"]
    assert ref == {"name": PICKER, "port": {"number": 9002}, "failureMode": "FailOpen"}  # kind: Service
    service = find(objects, "Service", PICKER)["spec"]
    assert service["selector"] == PICKER_PODS
    pod = find(objects, "Deployment", PICKER)["spec"]["template"]
    assert pod["metadata"]["labels"] == PICKER_PODS
    ports = {p["name"]: p["containerPort"] for p in picker_container(objects)["ports"]}
    assert ports == {"grpc": 9002, "grpc-health": 9003, "metrics": 9090}  # EPP's default ports
    assert {(p["name"], p["port"], ports[p["targetPort"]]) for p in service["ports"]} == {
        ("grpc-ext-proc", 9002, 9002),  # the names of upstream's chart
        ("http-metrics", 9090, 9090),
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert picker_container(objects)[probe]["grpc"]["port"] == ports["grpc-health"]


def test_the_objectives_belong_to_the_pool() -> None:
    objectives = [o for o in rendered() if o["kind"] == "InferenceObjective"]
    assert {o["metadata"]["name"]: o["spec"]["priority"] for o in objectives} == {
        "pendra-standard": 0,  # a request without an objective header has priority 0 too
        "pendra-batch": -1,  # negative: shed while the pool is saturated
    }
    for objective in objectives:
        assert objective["spec"]["poolRef"] == {"group": "inference.networking.k8s.io", "name": POOL}


# -- the picker ----------------------------------------------------------------------------------------


def test_the_picker_runs_the_pinned_upstream_image() -> None:
    objects = rendered()
    container = picker_container(objects)
    assert container["image"] == EPP_IMAGE
    assert re.fullmatch(r"v\d+\.\d+\.\d+", container["image"].rsplit(":", 1)[1])  # never `latest`
    assert container["imagePullPolicy"] == "IfNotPresent"
    spec = find(objects, "Deployment", PICKER)["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}  # no leader election
    assert spec["template"]["spec"]["securityContext"]["runAsUser"] == 65532  # distroless nonroot


def test_the_picker_s_flags_are_those_of_its_release() -> None:
    objects = rendered()
    flags = picker_flags(objects)
    assert set(flags) <= EPP_FLAGS, set(flags) - EPP_FLAGS
    assert not set(flags) & EPP_REFUSED_FLAGS  # v1.5.0 exits on these: metrics are in its config
    assert flags["pool-name"] == POOL and flags["pool-group"] == "inference.networking.k8s.io"
    # No --pool-namespace: the picker takes its own namespace from NAMESPACE, as the pool's.
    env = {e["name"]: e.get("valueFrom") for e in picker_container(objects)["env"]}
    assert env["NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "pool-namespace" not in flags
    assert flags["metrics-endpoint-auth"] == "false" and flags["enable-pprof"] == "false"
    assert flags["tracing"] == "false"  # on by default, with no collector to send to


def test_the_picker_config_follows_its_release_s_types() -> None:
    config = picker_config(rendered())
    jsonschema.Draft202012Validator(PICKER_CONFIG_SCHEMA).validate(config)
    names = [p.get("name", p["type"]) for p in config["plugins"]]
    assert len(names) == len(set(names))
    (profile,) = config["schedulingProfiles"]
    refs = [p["pluginRef"] for p in profile["plugins"]]
    refs += [config["saturationDetector"]["pluginRef"]]
    refs += [r["pluginRef"] for s in config["dataLayer"]["sources"] for r in [s, *s["extractors"]]]
    assert set(refs) <= set(names)


def test_the_picker_scores_queue_kv_cache_prefix_and_loaded_models() -> None:
    config = picker_config(rendered())
    (profile,) = config["schedulingProfiles"]
    weights = {p["pluginRef"]: p["weight"] for p in profile["plugins"]}
    assert weights == {
        "queue-scorer": 2,
        "kv-cache-utilization-scorer": 2,
        "prefix-cache-scorer": 3,
        "lora-affinity-scorer": 15,
    }
    # The README's arithmetic: the model's pod wins unless it has the longest queue and its KV
    # cache is over half full (loaded 1 against room-to-load 0.8; queue and KV cache 0..1 each).
    loaded_busy = weights["lora-affinity-scorer"] * 1.0 + weights["kv-cache-utilization-scorer"] * (1 - 0.5)
    idle_with_room = (
        weights["lora-affinity-scorer"] * 0.8
        + weights["queue-scorer"]
        + weights["kv-cache-utilization-scorer"]
    )
    assert loaded_busy == idle_with_room
    detector = plugin(config, "utilization-detector")["parameters"]
    assert detector["metricsStalenessThreshold"] == "1s"  # longer than the 250 ms between scrapes
    assert picker_flags(rendered())["refresh-metrics-interval"] == "250ms"


def _exported_gauges() -> dict[str, list[str]]:
    """The Gauges metrics.py declares: name -> label names (read from the source, so that this
    test needs none of the inference service's dependencies)."""
    gauges = {}
    for node in ast.walk(ast.parse(METRICS_PY.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Gauge":
            name = node.args[0]
            assert isinstance(name, ast.Constant), ast.dump(node)
            labels: Any = node.args[2] if len(node.args) > 2 else None
            labels = next((k.value for k in node.keywords if k.arg == "labelnames"), labels)
            if labels is None:
                gauges[name.value] = []
            elif isinstance(labels, ast.List | ast.Tuple):  # MODEL and the like stay names
                gauges[name.value] = [
                    e.value if isinstance(e, ast.Constant) else ast.unparse(e) for e in labels.elts
                ]
            else:
                gauges[name.value] = [ast.unparse(labels)]
    return gauges


def test_the_picker_reads_the_gauges_pendra_exports() -> None:
    extractor = plugin(picker_config(rendered()), "core-metrics-extractor")["parameters"]
    (engine,) = extractor["engineConfigs"]  # vLLM's and SGLang's built-ins stay, unused
    assert extractor["defaultEngine"] == engine["name"] == "pendra"  # pods have no engine label
    assert {k: v for k, v in engine.items() if k != "name" and v} == PICKER_METRICS
    assert engine["cacheInfoSpec"] == ""  # Pendra has no block-size gauge: disabled, not vLLM's
    gauges = _exported_gauges()
    for spec in PICKER_METRICS.values():
        # A spec without labels takes a family's first series (extractor/metrics/spec.go):
        # each of these is one series for the whole server.
        assert "{" not in spec, spec
        assert spec in gauges, f"{spec} is not a Gauge of {METRICS_PY.relative_to(ROOT)}"
    assert gauges.pop(PICKER_METRICS["loraSpec"]) == LORA_LABELS
    for spec in PICKER_METRICS.values():
        assert gauges.get(spec, []) == [], spec
    source = plugin(picker_config(rendered()), "metrics-data-source")["parameters"]
    assert source == {"scheme": "http", "path": "/metrics"}


def test_the_picker_may_read_its_pool_and_pods_and_nothing_more() -> None:
    objects = rendered()
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = find(objects, "Role", PICKER)
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    read = ("get", "watch", "list")
    # The chart's two Roles (non-sa and sa) of v1.5.0: what the picker's reconcilers watch.
    assert granted == {
        (group, resource, verb)
        for group, resource in [
            ("", "pods"),
            ("inference.networking.k8s.io", "inferencepools"),
            ("inference.networking.x-k8s.io", "inferenceobjectives"),
            ("inference.networking.x-k8s.io", "inferencemodelrewrites"),
        ]
        for verb in read
    }
    binding = find(objects, "RoleBinding", PICKER)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": PICKER}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": PICKER}]  # in its namespace
    find(objects, "ServiceAccount", PICKER)
    pod = find(objects, "Deployment", PICKER)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == PICKER and pod["automountServiceAccountToken"] is True


# -- the route and the network -------------------------------------------------------------------------


def test_the_route_sends_the_model_routes_from_the_gateway_to_the_pool() -> None:
    route = find(rendered(), "HTTPRoute", "pendra-inference")["spec"]
    assert route["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": GATEWAY}]
    (rule,) = route["rules"]
    assert rule["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": POOL}
    ]
    paths = set()
    for match in rule["matches"]:
        assert match["method"] == "POST" and match["path"]["type"] == "Exact", match
        paths.add(match["path"]["value"])
    # Pendra's inference serves each (a POST whose JSON body names a `model`), and the picker's
    # OpenAI parser knows each (chat/completions, completions, responses, embeddings).
    served = set(re.findall(r'@strict_json\.post\("([^"]+)"', ROUTES_PY.read_text()))
    assert paths == {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"}
    assert paths <= served
    assert rule["timeouts"] == {"request": "600s"}


def test_the_picker_and_the_gateway_may_reach_inference_and_nothing_else_opens() -> None:
    objects = rendered()
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    gateway_pods = {"podSelector": {"matchLabels": {GATEWAY_LABEL: GATEWAY}}}  # its namespace only
    to_inference = policies["pendra-inference-gateway"]
    assert to_inference["podSelector"]["matchLabels"] == INFERENCE
    assert to_inference["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": PICKER_PODS}}, gateway_pods], "ports": [{"port": 8081}]}
    ]
    to_picker = policies["pendra-endpoint-picker"]
    assert to_picker["podSelector"]["matchLabels"] == PICKER_PODS
    prometheus = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    assert to_picker["ingress"] == [
        {"from": [gateway_pods], "ports": [{"port": 9002}]},
        {"from": [prometheus], "ports": [{"port": 9090}]},
    ]
    # The picker's pods are Pendra's: the base's default deny closes them but for the above.
    deny = policies["pendra-default-deny"]["podSelector"]["matchLabels"]
    assert deny.items() <= PICKER_PODS.items()
    # The proxies' label names the Gateway the route attaches to.
    (parent,) = find(objects, "HTTPRoute", "pendra-inference")["spec"]["parentRefs"]
    assert parent["name"] == GATEWAY


# -- autoscaling -----------------------------------------------------------------------------------------


def test_the_hpa_scales_inference_on_requests_waiting_per_pod() -> None:
    objects = rendered()
    hpa = find(objects, "HorizontalPodAutoscaler", "pendra-inference")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "pendra-inference",
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 4)
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == PICKER_METRICS["queuedRequestsSpec"] and _exported_gauges()[name] == []
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "2"}
    behavior = hpa["behavior"]
    # A model load makes requests wait for a while: only a queue held for minutes scales out.
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] >= 120
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 600
    for direction in ("scaleUp", "scaleDown"):
        assert behavior[direction]["policies"] == [
            {"type": "Pods", "value": 1, "periodSeconds": behavior[direction]["policies"][0]["periodSeconds"]}
        ]
    # The HPA owns the replica count: the Deployment states none, so an apply does not reset it.
    assert "replicas" not in find(objects, "Deployment", "pendra-inference")["spec"]
    # Several replicas share the models volume: ReadWriteMany (overlays/single-node has one).
    assert find(objects, "PersistentVolumeClaim", "pendra-models")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_prometheus_adapter_rule_serves_the_hpa_s_metric() -> None:
    values = yaml.safe_load(
        (K8S / "components" / "autoscaling" / "prometheus-adapter-values.yaml").read_text()
    )
    assert set(values) == {"prometheus", "rules"}
    assert set(values["prometheus"]) == {"url", "port"}
    (rule,) = values["rules"]["custom"]
    assert set(rule) <= {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}
    metric = PICKER_METRICS["queuedRequestsSpec"]
    assert rule["seriesQuery"].startswith(metric + "{")
    assert rule["name"] == {"matches": f"^{metric}$", "as": metric}
    # Per pod, by the labels the ServiceMonitor's scrape gives the series.
    assert rule["resources"] == {
        "overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    }
    assert "<<.GroupBy>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    objects = rendered()
    monitor = find(objects, "ServiceMonitor", "pendra")
    assert {"port": "http", "path": "/metrics", "interval": "15s"} in monitor["spec"]["endpoints"]
    hpa = find(objects, "HorizontalPodAutoscaler", "pendra-inference")["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]


# -- the documentation -----------------------------------------------------------------------------------


def test_the_readme_tells_how_to_install_and_what_the_picker_reads() -> None:
    readme = (K8S / "README.md").read_text()
    for text in (
        "## Inference gateway",
        "## Autoscaling",
        "overlays/gpu-gateway",
        f"gateway-api-inference-extension/releases/download/{RELEASE}/manifests.yaml",
        f"gateway-api/releases/download/{GATEWAY_API_RELEASE}/standard-install.yaml",
        EPP_IMAGE,
        GATEWAY,
        "prometheus-adapter-values.yaml",
        "ReadWriteMany",
        *PICKER_METRICS.values(),
        *LORA_LABELS,
    ):
        assert text in readme, text
