"""gpt-oss: OpenAI's harmony format. The output is a run of messages, each with a channel and
maybe a recipient; `analysis` is reasoning, `final` (and `commentary` to nobody) is the answer, a
message to `functions.NAME` is a call whose body is the JSON arguments. Messages to built-in tools
(`browser`, `python`, `container`) were never offered, so they are dropped, as llama.cpp does.

    <|channel|>analysis<|message|>Thinking...<|end|><|start|>assistant<|channel|>commentary
    to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>

`reasoning_effort` (low, medium, high) reaches the template, which writes it in the system
message. The `openai-harmony` package would render and parse this too, but it loads its
tokenizer from the network on first use; llama.cpp's template and this parser need nothing.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from pendra_inference.formats.base import Call, Format, Parsed, Thinking, Turn, held
from pendra_inference.formats.grammar import Grammar

START, CHANNEL, MESSAGE, END, CONSTRAIN = (
    "<|start|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|constrain|>",
)
_ENDS = ("<|end|>", "<|call|>", "<|return|>")
_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")


class Harmony(Format):
    name = "harmony"
    preserved = (START, CHANNEL, MESSAGE, END, CONSTRAIN, "<|call|>", "<|return|>")

    @property
    def thinks(self) -> bool:
        return True

    def template_vars(self, turn: Turn) -> dict[str, Any]:
        out = super().template_vars(turn)
        out.pop("enable_thinking", None)  # gpt-oss always reasons; effort sets how much
        if out.get("reasoning_effort") not in (None, "low", "medium", "high"):
            out["reasoning_effort"] = "low"  # minimal and none are as low as it goes
        return out

    keep_analysis = False  # inline(): the analysis stays in the content, headers and all

    def inline(self) -> Format:
        kept = copy.copy(self)
        kept.keep_analysis = True
        return kept

    def thinking(self, prompt: str) -> Thinking:
        return "maybe"  # the model opens its analysis channel itself

    def parse(
        self, text: str, schemas: dict[str, dict[str, Any]] | None, opened: bool, partial: bool
    ) -> Parsed:
        reasoning: list[str] = []
        content: list[str] = []
        calls: list[Call] = []
        messages = text.split(START)
        for i, message in enumerate(messages):
            last = i == len(messages) - 1
            if last and partial:
                message = held(message, START)
            at = message.find(MESSAGE)
            if at < 0:
                if not partial and i == 0 and message.strip():
                    content.append(message)  # no harmony at all: the text as it is
                continue  # the header is still arriving (or an empty turn)
            header, body = message[:at], message[at + len(MESSAGE) :]
            ended = any(body.endswith(e) for e in _ENDS) or not last or not partial
            for e in _ENDS:
                body = body.removesuffix(e)
            if not ended:
                body = held(body, *_ENDS)
            channels = _CHANNEL.findall(header)  # the last one: "commentary to=assistant" may come first
            recipient = _RECIPIENT.search(header)
            kind = channels[-1] if channels else "final"
            if recipient and recipient.group(1).startswith("functions."):
                name = recipient.group(1).removeprefix("functions.")
                if schemas is not None and name in schemas:
                    calls.append(Call(name, body.strip(), None, ended))
                    continue
                kind = "dropped"
            elif recipient and recipient.group(1) not in ("user", "assistant"):
                kind = "dropped"
            if kind == "analysis" and self.keep_analysis:
                content.append(CHANNEL + "analysis" + MESSAGE + body + (END if ended else ""))
            elif kind == "analysis":
                reasoning.append(body)
            elif kind in ("final", "commentary"):
                content.append(body)
        return Parsed("".join(reasoning), "".join(content), calls)

    @staticmethod
    def _analysis(g: Grammar, thinking: Thinking) -> str:
        """The analysis a forced answer may start with (none when the client turned thinking off)."""
        if thinking == "off":
            return ""
        head, tail = g.literal(CHANNEL + "analysis" + MESSAGE), g.literal(START + "assistant")
        return f"( {head} {g.until('analysis', END)} {tail} )?"

    def content_rule(self, g: Grammar, body: str, thinking: Thinking) -> str:
        final = g.literal(CHANNEL + "final " + CONSTRAIN + "json" + MESSAGE)
        return f"{self._analysis(g, thinking)} {final} {body}".strip()

    def call_grammar(self, turn: Turn, names: list[str], parallel: bool, thinking: Thinking) -> str:
        g = Grammar()
        calls = [
            f"{g.literal(f'{CHANNEL}commentary to=functions.{n} {CONSTRAIN}json{MESSAGE}')} "
            f"{g.json(turn.schemas()[n], f'args-{n}')}"
            for n in names
        ]
        return g.build(f"{self._analysis(g, thinking)} {g.alternatives('call', calls)}".strip())
