"""Chat prompts: the GGUF's own `tokenizer.chat_template`, or a known template for its architecture.

Templates are Jinja rendered in an immutable sandbox, so a hostile template in a downloaded GGUF
cannot reach Python internals. With no template in the file, the architecture picks one (gemma3,
llama, qwen2/qwen3, phi3, mistral, ...) and the choice is logged; anything else gets ChatML.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ first_user_prefix if loop.first else '' }}"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
PHI3 = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}[INST] {{ message['content'] }} [/INST]{% endif %}{% endfor %}"
)

# name, template, the strings that end a turn
KNOWN: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "gemma": ("gemma", GEMMA, ("<end_of_turn>",)),
    "gemma2": ("gemma", GEMMA, ("<end_of_turn>",)),
    "gemma3": ("gemma", GEMMA, ("<end_of_turn>",)),
    "gemma3n": ("gemma", GEMMA, ("<end_of_turn>",)),
    "llama": ("llama3", LLAMA3, ("<|eot_id|>",)),
    "qwen2": ("chatml", CHATML, ("<|im_end|>",)),
    "qwen3": ("chatml", CHATML, ("<|im_end|>",)),
    "qwen3moe": ("chatml", CHATML, ("<|im_end|>",)),
    "phi3": ("phi3", PHI3, ("<|end|>",)),
    "mistral": ("mistral", MISTRAL, ()),
    "mistral3": ("mistral", MISTRAL, ()),
}
FALLBACK = ("chatml", CHATML, ("<|im_end|>",))


class TemplateRenderError(ValueError):
    """The chat template could not render these messages."""


def _raise(message: str) -> None:
    raise TemplateRenderError(message)


def _env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent, ensure_ascii=False)
    return env


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # "gguf" for the file's own template
    source: str
    stop: tuple[str, ...]
    native: bool  # the file's own template (it may know tools and tool messages)

    @property
    def supports_tools(self) -> bool:
        return self.native and "tools" in self.source

    def render(
        self, messages: list[dict[str, Any]], *, bos: str, eos: str, tools: list[dict[str, Any]] | None = None
    ) -> str:
        try:
            template = _env().from_string(self.source)
            return template.render(
                messages=messages,
                bos_token=bos,
                eos_token=eos,
                add_generation_prompt=True,
                tools=tools if self.supports_tools else None,
            )
        except TemplateRenderError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise TemplateRenderError(f"the chat template failed: {exc}") from exc


def choose_template(
    architecture: str, gguf_template: str | None, override: str | None = None, model_name: str = ""
) -> ChatTemplate:
    """The model's own template if it has one, else the architecture's known one."""
    if override:
        return ChatTemplate("override", override, (), True)
    if gguf_template:
        return ChatTemplate("gguf", gguf_template, (), True)
    name, source, stop = KNOWN.get(architecture, FALLBACK)
    logger.info(
        "%s: no chat template in the GGUF; using the %s template for architecture %s",
        model_name,
        name,
        architecture,
    )
    return ChatTemplate(name, source, stop, False)
