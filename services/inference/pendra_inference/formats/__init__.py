"""Each model family's own words for thinking and tool calls, behind one interface (`Format`).

    base.py      Format, Parsed, Call, Turn: the interface and the helpers every family shares
    stream.py    Splitter: a completion's text, token by token, as OpenAI's deltas
    grammar.py   GBNF pieces for forced calls in a family's own syntax
    hermes.py    <tool_call>{json}</tool_call> and <think> (Qwen2.5/3, QwQ, Hermes, Granite 4)
    qwen_xml.py  <function=..><parameter=..> (Qwen3.5, Qwen3.6, Qwen3-Coder)
    deepseek.py  DeepSeek-R1's tool tokens and its forced-open <think>
    harmony.py   gpt-oss's channels
    mistral.py   [TOOL_CALLS] and [THINK] (Mistral Small 3.x, Devstral, Magistral)
    llama3.py    a bare JSON call (Llama 3.1-3.3)
    generic.py   tools described in the prompt, for templates that know none (Gemma 3)

and how prompts are written in the first place:

    templates.py         the model's chat template (or a known one for its architecture), rendered
    template_sandbox.py  in an immutable Jinja sandbox
    template_budget.py   within a budget of characters and seconds

Which family a model speaks is read from its template (`pendra_shared.chat_family`), or named by
the sidecar's `options.chat_format`.
"""

from __future__ import annotations

from pendra_shared.chat_family import family

from pendra_inference.formats.base import Call, Format, Parsed, Turn
from pendra_inference.formats.deepseek import DeepSeekR1
from pendra_inference.formats.generic import Generic
from pendra_inference.formats.harmony import Harmony
from pendra_inference.formats.hermes import Hermes
from pendra_inference.formats.llama3 import Llama3
from pendra_inference.formats.mistral import Mistral
from pendra_inference.formats.qwen_xml import QwenXML
from pendra_inference.formats.stream import Splitter

_BY_NAME: dict[str, type[Format]] = {
    f.name: f for f in (Harmony, QwenXML, DeepSeekR1, Mistral, Hermes, Llama3, Generic)
}


def for_template(template: str | None, override: str | None = None, native: bool = True) -> Format:
    """The format of a model whose chat template is `template` (`native`: the model's own, which
    may know tools; else Pendra's stand-in for its architecture)."""
    if not native and override is None:
        return Generic(template or "")
    fmt = _BY_NAME[family(template, override)](template or "")
    knows_calls = {"mistral": "[TOOL_CALLS]", "llama3": "tools"}.get(fmt.name)
    if override is None and knows_calls is not None and knows_calls not in (template or ""):
        # A template of the family that knows no calls (Mistral 7B, Mixtral, Llama 3.0): calls are
        # asked for in the system message and come back as JSON, the reasoning the family's.
        plain = Generic(template or "")
        plain.think = fmt.think
        return plain
    return fmt


__all__ = ["Call", "Format", "Parsed", "Splitter", "Turn", "for_template"]
