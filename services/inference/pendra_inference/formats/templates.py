"""Chat prompts: the GGUF's own `tokenizer.chat_template`, or a known template for its architecture.

Templates are Jinja rendered in an immutable sandbox with a budget (`template_sandbox.py`), so a
hostile template in a downloaded GGUF can neither reach Python internals nor render without end:
each render stops at `template_max_chars` characters and `template_timeout_s` seconds. With no
template in the file, the architecture picks one (gemma3, llama, qwen2/qwen3, phi3, mistral, ...)
and the choice is logged; anything else gets ChatML.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import Template
from pendra_shared.config import Settings

from pendra_inference.formats.template_budget import Budget, TemplateBudgetExceeded
from pendra_inference.formats.template_sandbox import BudgetedEnvironment, render_within

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHARS: int = Settings.model_fields["template_max_chars"].default
DEFAULT_TIMEOUT_S: float = Settings.model_fields["template_timeout_s"].default
# An error message quotes at most this much of what the template said or did.
_MESSAGE_CHARS = 300
# Most items `tojson` takes from a generator (a filtered list of tools or messages).
_MAX_LISTED = 100_000
_ADDRESS_RE = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")

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


def _raise(message: Any) -> None:
    raise TemplateRenderError(f"the chat template refused these messages: {_clean(message)}")


def _tojson(value: Any, indent: int | str | None = None) -> str:
    width = len(indent) if isinstance(indent, str) else indent or 0
    if not 0 <= width <= 16:
        raise TemplateRenderError("the chat template asked tojson for an indent above 16")
    return json.dumps(value, indent=indent, ensure_ascii=False, default=_listed)


def _listed(value: Any) -> Any:
    """What Jinja's `map` and `select` filters give (a generator) as the list it stands for, as
    minja and llama.cpp's templates expect (`tools | map(attribute='function') | tojson`)."""
    if isinstance(value, Iterator):
        return list(itertools.islice(value, _MAX_LISTED))
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt)[:100])


def _env() -> BudgetedEnvironment:
    env = BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = env.guard_filter("tojson", _tojson)
    return env


_ENV = _env()


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Template:
    """Compiled once per template source (a model's template is used for each of its requests)."""
    return _ENV.from_string(_ENV.parse_guarded(source))


def _clean(detail: Any) -> str:
    """What a template said or did, short and without memory addresses."""
    text = _ADDRESS_RE.sub("", str(detail))
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."


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
        self,
        messages: list[dict[str, Any]],
        *,
        bos: str,
        eos: str,
        tools: list[dict[str, Any]] | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        generation_prompt: bool = True,
        variables: dict[str, Any] | None = None,
    ) -> str:
        """The prompt for `messages`, or TemplateRenderError; at most `max_chars` characters and
        `timeout_s` seconds (see `template_sandbox` for what is checked, and when). `variables` are
        more names for the template; they cannot replace the ones above."""
        context = {
            **(variables or {}),  # a family's switches (enable_thinking, reasoning_effort, ...)
            "messages": messages,
            "bos_token": bos,
            "eos_token": eos,
            "add_generation_prompt": generation_prompt,
            "tools": tools if self.supports_tools else None,
        }
        try:
            return render_within(_compile(self.source), Budget(max_chars, timeout_s), context)
        except TemplateRenderError:
            raise
        except TemplateBudgetExceeded as exc:
            raise TemplateRenderError(str(exc)) from None
        except RecursionError:
            raise TemplateRenderError("the chat template nests or recurses too deeply") from None
        except MemoryError:
            raise TemplateRenderError("the chat template ran out of memory") from None
        except Exception as exc:  # a template can raise anything: it is data, not our code
            raise TemplateRenderError(f"the chat template failed: {_clean(exc)}") from None


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
