"""The Kubernetes deployment (deploy/kubernetes: a kustomize base, monitoring, inference-gateway
and autoscaling components, and gpu, cpu, single-node and gpu-gateway overlays), rendered and
checked: every object against the Kubernetes API's schemas, and the topology as compose.yaml has
it (images, commands, probes, volumes, exposure, GPUs, secrets, security, termination). The
gateway's own objects are checked against their CRDs in tests/test_inference_gateway.py."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.kustomize import Object, canonical, render
from tests.support.stack import ROOT, load_compose

K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["gpu", "cpu", "single-node", "gpu-gateway"]
GATEWAY_OVERLAYS = {"gpu-gateway"}  # components/inference-gateway: the gateway, a second entry
# API groups of CRDs, whose objects the Kubernetes schemas do not know.
CRD_GROUPS = {
    "monitoring.coreos.com",  # the Prometheus operator: test_monitoring_objects
    "inference.networking.k8s.io",  # the inference extension: tests/test_inference_gateway.py
    "inference.networking.x-k8s.io",
    "gateway.networking.k8s.io",  # Gateway API: tests/test_inference_gateway.py
}
KUBERNETES_VERSION = "1.31"
PENDRA = {"api", "inference", "fetcher"}


def rendered(overlay: str) -> list[Object]:
    return render(K8S / "overlays" / overlay)


def find(objects: list[Object], kind: str, name: str) -> Object:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_spec(obj: Object) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def workloads(objects: list[Object]) -> list[Object]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def container(objects: list[Object], component: str) -> dict[str, Any]:
    (c,) = pod_spec(find(objects, "Deployment", f"pendra-{component}"))["containers"]
    return dict(c)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_renderer_agrees_with_kubectl_kustomize(overlay: str) -> None:
    if shutil.which("kubectl") is None:
        if platform.machine() == "x86_64":  # scripts/test.sh installs the release kubectl there
            pytest.fail("kubectl is missing: run the tests through scripts/test.sh, which installs it")
        pytest.skip("no kubectl release binary for this architecture: the renderer alone checks")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=True
    ).stdout
    assert canonical(rendered(overlay)) == canonical([d for d in yaml.safe_load_all(out) if d])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = rendered(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "StatefulSet", "Service", "PersistentVolumeClaim", "NetworkPolicy", "Job"} <= kinds
    for obj in objects:
        if obj["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue  # checked against their CRDs' schemas elsewhere (CRD_GROUPS)
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_services_run_compose_s_images_and_commands(overlay: str) -> None:
    objects, compose = rendered(overlay), load_compose()["services"]
    for component in PENDRA:
        c = container(objects, component)
        assert c["command"] == compose[component]["command"], component
        expected = compose[component]["image"]
        if component == "inference" and overlay == "cpu":
            expected = expected.replace("-cuda", "-cpu")
        assert c["image"] == expected, component
    assert container(objects, "fetcher")["ports"] == [{"name": "metrics", "containerPort": 8082}]
    redis = pod_spec(find(objects, "StatefulSet", "pendra-redis"))["containers"][0]
    assert redis["image"] == compose["redis"]["image"]
    assert find(objects, "StatefulSet", "pendra-redis")["spec"]["volumeClaimTemplates"]
    minio = pod_spec(find(objects, "StatefulSet", "pendra-minio"))["containers"][0]
    assert minio["image"] == compose["minio"]["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_graceful_termination(overlay: str) -> None:
    objects = rendered(overlay)
    inference = container(objects, "inference")
    assert inference["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert inference["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = inference["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60  # a big model loads
    assert container(objects, "api")["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container(objects, "fetcher")["livenessProbe"]["exec"]["command"] == [
        "python", "-m", "pendra_fetcher.health"
    ]  # fmt: skip
    for name in ("api", "inference"):
        spec = pod_spec(find(objects, "Deployment", f"pendra-{name}"))
        # The drain (PENDRA_SHUTDOWN_TIMEOUT_S) and the preStop pause fit in the grace period.
        assert spec["terminationGracePeriodSeconds"] >= 45
        pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        config = find(objects, "ConfigMap", "pendra-config")["data"]
        assert pre_stop + float(config["PENDRA_SHUTDOWN_TIMEOUT_S"]) < spec["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_models_volume_is_written_by_the_fetcher_only(overlay: str) -> None:
    objects = rendered(overlay)
    pvc = find(objects, "PersistentVolumeClaim", "pendra-models")
    modes = pvc["spec"]["accessModes"]
    assert modes == (["ReadWriteOnce"] if overlay == "single-node" else ["ReadWriteMany"])
    for component in PENDRA:
        spec = pod_spec(find(objects, "Deployment", f"pendra-{component}"))
        (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        read_only = component != "fetcher"
        assert volume["persistentVolumeClaim"] == (
            {"claimName": "pendra-models", "readOnly": True} if read_only else {"claimName": "pendra-models"}
        ), component
        assert mount["mountPath"] == "/models" and mount.get("readOnly", False) == read_only, component
        if overlay == "single-node" and component != "fetcher":  # on the node that mounts the volume
            (term,) = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "fetcher"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_api_is_an_entry_and_network_policies_close_the_rest(overlay: str) -> None:
    """The api is the entry; with the inference gateway, the operator's Gateway is a second one,
    for inference alone: an HTTPRoute to the pool, and its proxies let through to inference."""
    objects = rendered(overlay)
    assert not [o for o in objects if o["kind"] == "Ingress"]  # the operator adds one, for the api
    routes = [o for o in objects if o["kind"] == "HTTPRoute"]
    if overlay in GATEWAY_OVERLAYS:
        (route,) = routes
        backends = {(b["kind"], b["name"]) for r in route["spec"]["rules"] for b in r["backendRefs"]}
        assert backends == {("InferencePool", "pendra-inference-pool")}
    else:
        assert not routes
    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    for workload in workloads(objects):
        spec = pod_spec(workload)
        assert not spec.get("hostNetwork") and all(
            "hostPort" not in p for c in spec["containers"] for p in c.get("ports", [])
        )
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert policies["pendra-default-deny"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "pendra"
    }
    assert "ingress" not in policies["pendra-default-deny"]  # nothing allowed unless said below

    def allowed_from(name: str) -> list[dict[str, Any]]:
        return [peer for rule in policies[name]["ingress"] for peer in rule.get("from", [])]

    assert allowed_from("pendra-api") == []  # no `from`: anyone may reach the api
    components = {
        name: {p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") for p in allowed_from(name)}
        for name in ("pendra-inference", "pendra-redis", "pendra-minio", "pendra-fetcher")
    }
    assert components == {
        "pendra-inference": {"api", None},  # None: Prometheus's pods
        "pendra-redis": {"api", "fetcher"},
        "pendra-minio": {"fetcher", "minio-init"},
        "pendra-fetcher": {None},
    }
    base = {
        "pendra-default-deny",
        "pendra-api",
        "pendra-inference",
        "pendra-fetcher",
        "pendra-redis",
        "pendra-minio",
    }
    if overlay in GATEWAY_OVERLAYS:
        # Inference, also from the endpoint picker and the Gateway's proxies (pods labelled with
        # its name, in this namespace); the picker, from those proxies and Prometheus.
        assert set(policies) == base | {"pendra-inference-gateway", "pendra-endpoint-picker"}
        gateway = {"gateway.networking.k8s.io/gateway-name": "pendra-inference-gateway"}
        assert [p["podSelector"]["matchLabels"] for p in allowed_from("pendra-inference-gateway")] == [
            {"app.kubernetes.io/name": "pendra", "app.kubernetes.io/component": "endpoint-picker"},
            gateway,
        ]
        assert [p["podSelector"]["matchLabels"] for p in allowed_from("pendra-endpoint-picker")] == [
            gateway,
            {"app.kubernetes.io/name": "prometheus"},
        ]
        for name in ("pendra-inference-gateway", "pendra-endpoint-picker"):
            assert all(rule.get("from") for rule in policies[name]["ingress"]), name  # never from anyone
    else:
        assert set(policies) == base
    for peer in allowed_from("pendra-inference") + allowed_from("pendra-fetcher"):
        if "namespaceSelector" in peer:
            assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    inference_env = {e["name"]: e.get("value") for e in container(objects, "inference")["env"]}
    assert inference_env["PENDRA_ALLOW_OPEN"] == "1"  # open on its port, closed by the policy


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_are_requested_by_inference_only(overlay: str) -> None:
    objects = rendered(overlay)
    for workload in workloads(objects):
        spec = pod_spec(workload)
        gpus = [
            c["resources"].get(k, {}).get("nvidia.com/gpu")
            for c in spec["containers"]
            for k in ("requests", "limits")
        ]
        if workload["metadata"]["name"] == "pendra-inference" and overlay != "cpu":
            assert gpus == [1, 1]
            assert spec["nodeSelector"] and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        else:
            assert gpus == [None, None], workload["metadata"]["name"]
            assert "nvidia" not in json.dumps(spec.get("nodeSelector", {})) + json.dumps(
                spec.get("tolerations", [])
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_written(overlay: str) -> None:
    objects = rendered(overlay)
    assert not [o for o in objects if o["kind"] == "Secret"]  # created by the operator (README)
    refs = set()
    for workload in workloads(objects):
        for c in pod_spec(workload)["containers"]:
            for env in c.get("env", []):
                if any(word in env["name"] for word in ("KEY", "PASSWORD", "SECRET")) and env["name"] != (
                    "PENDRA_MIRROR_ACCESS_KEY"  # a user name, not a secret
                ):
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert "value" not in env and ref["name"] == "pendra-secrets", env
                    refs.add(ref["key"])
                if "value" in env and "@" in env["value"]:  # a URL with credentials: by reference
                    assert "$(REDIS_PASSWORD)" in env["value"], env
    assert refs == {"redis-password", "mirror-secret-key", "api-keys"}
    for config_map in (o for o in objects if o["kind"] == "ConfigMap"):
        text = json.dumps(config_map["data"]).lower()
        assert "password" not in text and "secret_key" not in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_unprivileged_with_limits(overlay: str) -> None:
    for workload in workloads(rendered(overlay)):
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0, (
            name
        )
        # Only the endpoint picker talks to the Kubernetes API: it watches its pool and the pods.
        assert spec["automountServiceAccountToken"] is (name == "pendra-endpoint-picker"), name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) <= set(c["resources"]["limits"]), name
            writable = {m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")}
            assert writable <= {"/tmp", "/data", "/models", "/var/cache/pendra"}, (name, writable)


def test_monitoring_objects_scrape_the_services_and_carry_the_dashboard() -> None:
    objects = rendered("gpu")
    monitor = find(objects, "ServiceMonitor", "pendra")
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    services = [o for o in objects if o["kind"] == "Service"]
    scraped = {
        s["metadata"]["name"]
        for s in services
        if s["metadata"]["labels"].get("app.kubernetes.io/component") in PENDRA
        and {p["name"] for p in s["spec"]["ports"]} & ports
    }
    assert scraped == {"pendra-api", "pendra-inference", "pendra-fetcher"}
    for workload in (find(objects, "Deployment", f"pendra-{c}") for c in PENDRA):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        port = str(workload["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"])
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": port,
            "prometheus.io/path": "/metrics",
        }
    dashboard = find(objects, "ConfigMap", "pendra-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = (ROOT / "deploy" / "grafana" / "dashboards" / "pendra.json").read_text()
    # The component's copy is the dashboard compose provisions, byte for byte.
    assert dashboard["data"]["pendra-dashboard.json"] == source
    assert json.loads(source)["uid"] == "pendra"
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "pendra.rules.yml").read_text())
    assert find(objects, "PrometheusRule", "pendra")["spec"] == rules  # the rules compose loads


def test_the_documented_commands_name_real_overlays() -> None:
    readme = (K8S / "README.md").read_text()
    for overlay in OVERLAYS:
        assert f"overlays/{overlay}" in readme
        assert (K8S / "overlays" / overlay / "kustomization.yaml").is_file()
    assert "create secret generic pendra-secrets" in readme
    for key in ("redis-password", "mirror-secret-key", "api-keys"):
        assert key in readme


def test_the_kustomization_files_are_plain_yaml() -> None:
    for path in Path(K8S).rglob("kustomization.yaml"):
        assert yaml.safe_load(path.read_text())["kind"] in ("Kustomization", "Component"), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_keeps_its_cpu_variant_verdict_on_a_writable_volume(overlay: str) -> None:
    """The image's PENDRA_CACHE_DIR (/var/cache/pendra) under a read-only root file system: an
    emptyDir, so a restarted container skips the CPU variants that died in its pod."""
    objects = rendered(overlay)
    inference = container(objects, "inference")
    (mount,) = [m for m in inference["volumeMounts"] if m["mountPath"] == "/var/cache/pendra"]
    assert not mount.get("readOnly", False)
    (volume,) = [
        v
        for v in pod_spec(find(objects, "Deployment", "pendra-inference"))["volumes"]
        if v["name"] == mount["name"]
    ]
    assert volume == {"name": mount["name"], "emptyDir": {}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_routes_between_every_inference_pod(overlay: str) -> None:
    objects = rendered(overlay)
    service = find(objects, "Service", "pendra-inference")
    assert service["spec"]["clusterIP"] == "None"  # headless: the name resolves to each ready pod
    env = {e["name"]: e.get("value") for e in container(objects, "api")["env"]}
    assert env["PENDRA_INFERENCE_URL"] == "http://pendra-inference:8081"
    assert env["PENDRA_INFERENCE_RESOLVE"] == "true"
    inference = find(objects, "Deployment", "pendra-inference")
    assert service["spec"]["selector"].items() <= inference["spec"]["template"]["metadata"]["labels"].items()
