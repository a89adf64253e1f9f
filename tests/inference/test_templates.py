"""Chat templates: the GGUF's own, chosen by architecture when absent, always sandboxed."""

from __future__ import annotations

import pytest
from pendra_inference.formats.templates import TemplateRenderError, choose_template

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


@pytest.mark.parametrize(
    ("arch", "name", "expected"),
    [
        (
            "gemma3",
            "gemma",
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
            "Hello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
        ),
        (
            "qwen3",
            "chatml",
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        ("qwen2", "chatml", None),
        ("llama", "llama3", "<bos><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"),
        ("phi3", "phi3", "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n"),
        ("mistral", "mistral", "<bos>[INST] Be brief. [/INST][INST] Hi [/INST]Hello.<eos>"),
        ("unknown-arch", "chatml", None),
    ],
)
def test_known_templates_by_architecture(arch: str, name: str, expected: str | None) -> None:
    template = choose_template(arch, None)
    assert template.name == name and not template.native
    text = template.render(MESSAGES, bos="<bos>", eos="<eos>")
    if expected is not None:
        assert text.startswith(expected) or text == expected


def test_the_gguf_template_wins_and_knows_tools() -> None:
    source = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ tools | tojson }}"
    template = choose_template("gemma3", source)
    assert template.native and template.supports_tools
    assert template.render(MESSAGES[:2], bos="", eos="", tools=[{"x": 1}]) == (
        '[system]Be brief.[user]Hi[{"x": 1}]'
    )


@pytest.mark.parametrize(
    "hostile",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append(1) }}",
        "{{ raise_exception('no system messages') }}",
        "{% for %}",
        # CVE-2024-34359 ("Llama Drama"): the payload that ran commands through llama-cpp-python.
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ 1 / 0 }}",
        "{{ 'a' * 10**9 }}",
    ],
)
def test_hostile_or_broken_templates_fail_safely(hostile: str) -> None:
    with pytest.raises(TemplateRenderError):
        choose_template("llama", hostile).render(MESSAGES, bos="", eos="")


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''|attr('__class__') }}",
        "{{ '{0.__class__}'.format(1) }}",
        "{{ ''|attr('__class__')|attr('__mro__') }}",
    ],
)
def test_jinja_sandbox_escapes_render_nothing(payload: str) -> None:
    """Jinja CVE-2025-27516 and CVE-2024-56326: |attr and str.format stay inside the sandbox."""
    assert choose_template("llama", payload + "ok").render(MESSAGES, bos="", eos="") == "ok"
