"""Which family's chat format a model speaks, read from its chat template, and what that lets it
do (tools, thinking): for the inference service's parsers, `/api/show` and the console alike.

The fingerprints are the markers each family's template writes (checked against the templates
that llama.cpp's own tests use); a sidecar's `options.chat_format` overrides them.
"""

from __future__ import annotations

FAMILIES = ("harmony", "qwen-xml", "deepseek-r1", "mistral", "hermes", "llama3", "generic")


def family(template: str | None, override: str | None = None) -> str:
    if override in FAMILIES:
        return override
    t = template or ""
    if "<|channel|>" in t and "<|message|>" in t:
        return "harmony"  # gpt-oss
    if "<function=" in t and "<parameter=" in t:
        return "qwen-xml"  # Qwen3.5, Qwen3.6, Qwen3-Coder, Nemotron 3
    if "tool▁calls▁begin" in t or "<｜Assistant｜>" in t:
        return "deepseek-r1"
    if "[TOOL_CALLS]" in t or "[INST]" in t:
        return "mistral"
    if "<tool_call>" in t:
        return "hermes"  # Qwen2.5, Qwen3, QwQ, Hermes, Granite 4
    if "<|start_header_id|>" in t:
        return "llama3"
    return "generic"


def capabilities(
    template: str | None, purpose: str = "chat", vision: bool = False, override: str | None = None
) -> list[str]:
    """Ollama's capability names: completion, tools, thinking, vision, embedding."""
    if purpose == "embedding":
        return ["embedding"]
    if purpose != "chat":
        return []
    t = template or ""
    name = family(t, override)
    out = ["completion"]
    if name != "generic" and "tools" in t:
        out.append("tools")
    if name == "harmony" or any(
        mark in t for mark in ("<think>", "[THINK]", "enable_thinking", "reasoning_content")
    ):
        out.append("thinking")
    if vision:
        out.append("vision")
    return out
