"""Renders Pendra's kustomizations (deploy/kubernetes) without a kustomize binary: the subset of
kustomize they use (resources, components, `labels` pairs, `images`, JSON 6902 `patches` with a
kind/name target, `configMapGenerator` from files without a name hash). Where kubectl is
installed, tests/test_kubernetes.py checks that this renders exactly what `kubectl kustomize`
does, so the checks hold on machines without it too."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]
SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "labels",
    "images",
    "patches",
    "configMapGenerator",
}


def render(directory: Path) -> list[Object]:
    return _build(directory, [])


def _build(directory: Path, accumulated: list[Object]) -> list[Object]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - SUPPORTED
    assert not unknown, f"{directory}: kustomize features this renderer does not know: {unknown}"
    objects = accumulated
    for entry in k.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in k.get("components", []):
        objects = _build(directory / entry, objects)
    for generator in k.get("configMapGenerator", []):
        objects.append(_config_map(directory, generator))
    for group in k.get("labels", []):
        assert set(group) == {"pairs"}, group  # metadata labels only, as kustomize does then
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
    for image in k.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name, _, _tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    for patch in k.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load(patch["patch"])
        matched = [
            o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]
        ]
        assert matched, f"patch target {target} matches nothing"
        for obj in matched:
            for op in ops:
                _apply(obj, op)
    return objects


def _config_map(directory: Path, generator: dict[str, Any]) -> Object:
    options = generator.get("options", {})
    assert options.get("disableNameSuffixHash"), "only unhashed generated names are supported"
    metadata: dict[str, Any] = {"name": generator["name"]}
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    data = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _containers(obj: Object) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else spec
    if obj["kind"] == "Job":
        pod = spec["template"]["spec"]
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


def _apply(obj: Object, op: dict[str, Any]) -> None:
    """One JSON 6902 operation: add, replace or remove."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent: Any = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    key: Any = int(last) if isinstance(parent, list) and last != "-" else last
    if op["op"] == "remove":
        del parent[key]
    elif op["op"] in ("add", "replace"):
        if op["op"] == "replace":
            assert (key < len(parent)) if isinstance(parent, list) else key in parent, op
        if isinstance(parent, list):
            parent.append(copy.deepcopy(op["value"])) if key == "-" else parent.insert(key, op["value"])
        else:
            parent[key] = copy.deepcopy(op["value"])
    else:
        raise AssertionError(f"unsupported patch op {op['op']}")


def canonical(objects: list[Object]) -> list[str]:
    """The objects in a comparable form, whatever their order."""
    return sorted(json.dumps(o, sort_keys=True) for o in objects)
