"""Validate response bodies against OpenAI's own component schemas (tests/data/openai-schemas.json,
extracted from openai/openai-openapi, MIT).

The extract mixes OpenAPI 3.0 (`nullable: true`) with JSON Schema (`type: null`); `nullable` is
rewritten into plain JSON Schema once, then Draft 2020-12 validates.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMAS = Path(__file__).resolve().parent.parent / "data" / "openai-schemas.json"


def _denull(node: Any) -> Any:
    if isinstance(node, list):
        return [_denull(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _denull(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        if isinstance(out.get("type"), str) and "$ref" not in out:
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _components() -> dict[str, Any]:
    components: dict[str, Any] = _denull(json.loads(SCHEMAS.read_text())["components"])
    return components


def validate(instance: Any, schema_name: str) -> None:
    """Raise jsonschema's ValidationError if `instance` is not a valid `schema_name`."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    Draft202012Validator(schema).validate(instance)
