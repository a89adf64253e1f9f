"""F8: a chat template renders within a budget of time and characters, and nothing outside the
template modules builds a Jinja environment that could skip it."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pendra_inference.formats.templates import (
    CHATML,
    GEMMA,
    LLAMA3,
    MISTRAL,
    PHI3,
    TemplateRenderError,
    choose_template,
)

REPO = Path(__file__).resolve().parents[2]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


def render(source: str, *, max_chars: int = 16 * 1024 * 1024, timeout_s: float = 2.0) -> str:
    return choose_template("llama", source).render(
        MESSAGES, bos="<s>", eos="</s>", max_chars=max_chars, timeout_s=timeout_s
    )


SIZE_BOMBS = {
    "repeat": "{{ 'a' * 200000000 }}",
    "repeat-power": "{{ 'a' * 10**9 }}",
    "repeat-right": "{{ 10**9 * 'a' }}",
    "list-repeat": "{{ ([1] * 10**9)|length }}",
    "nested-lists": "{% set a = [1] * 100000 %}{% set b = [a] * 100000 %}{{ b|length }}",
    "nested-literals": (
        "{% set a = [1] * 1000 %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
        "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c, c, c] %}"
        "{% set e = [d, d, d, d, d, d, d, d, d, d] %}{{ e }}"
    ),
    "doubling-tilde": (
        "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    ),
    "doubling-plus": (
        "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}"
    ),
    "power": "{{ 10 ** 100000 }}",
    "power-tower": (
        "{% set ns = namespace(x=7) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}"
    ),
    "center": "{{ 'a'|center(1000000000) }}",
    "center-method": "{{ 'a'.center(1000000000) }}",
    "ljust-method": "{{ 'a'.ljust(1000000000) }}",
    "zfill": "{{ '1'.zfill(1000000000) }}",
    "indent": "{{ ('\\n' * 100000)|indent(100000) }}",
    "expandtabs": "{{ ('\\t' * 1000).expandtabs(100000) }}",
    "replace": "{{ ('a' * 10000)|replace('', 'b' * 10000) }}",
    "replace-method": "{{ ('a' * 10000).replace('a', 'b' * 10000) }}",
    "format-width": "{{ '{:>1000000000}'.format('a') }}",
    "format-precision": "{{ '{:.1000000000f}'.format(1.5) }}",
    "format-nested-width": "{{ '{:>{}}'.format('a', 1000000000) }}",
    "format-map": "{{ '{a:>{w}}'.format_map({'a': 1, 'w': 1000000000}) }}",
    "format-filter": "{{ '%1000000000s'|format('a') }}",
    "format-star": "{{ '%*s'|format(1000000000, 'a') }}",
    "percent": "{{ '%1000000000s' % 'a' }}",
    "join": "{% set s = 'a' * 1000000 %}{{ ([s] * 100)|join }}",
    "join-method": "{% set s = 'a' * 1000000 %}{{ ''.join([s] * 100) }}",
    "slice": "{{ [1]|slice(1000000000)|list|length }}",
    "batch": "{{ [1]|batch(100000000, 'x')|list|length }}",
    "tojson-nested": "{% set a = [1] * 10000 %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
    "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c, c, c] %}{{ d|tojson }}",
    "tojson-indent": "{{ messages|tojson(indent=100000000) }}",
    "string-filter": "{% set a = [1] * 10000 %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
    "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c, c, c] %}"
    "{{ d|string|length }}",
}
TIME_BOMBS = {
    "three-ranges": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
        "{% endfor %}{% endfor %}{% endfor %}"
    ),
    "two-ranges-quiet": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% set x = a ~ b %}{% endfor %}{% endfor %}"
    ),
    "string-loops": "{% set s = 'a' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "macro-exponential": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"
    ),
    "recursive-loop": (
        "{% set ns = namespace(x=[]) %}{% for i in range(200) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}"
        "{% for item in ns.x recursive %}{{ loop(item) }}{% endfor %}"
    ),
    "captured": (
        "{% set x %}{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
        "{% endset %}"
    ),
    "filter-block": (
        "{% filter upper %}{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
        "{% endfilter %}"
    ),
    "map-in-loop": "{% for a in range(100000) %}{% set x = range(100000)|map('string')|list %}{% endfor %}",
}


@pytest.mark.parametrize("source", SIZE_BOMBS.values(), ids=SIZE_BOMBS.keys())
def test_size_bombs_fail_before_they_allocate(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateRenderError, match="the model's chat template exceeded"):
        render(source)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("source", TIME_BOMBS.values(), ids=TIME_BOMBS.keys())
def test_time_bombs_stop_at_the_deadline(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateRenderError, match=r"took longer than 0\.5 s|exceeded|recurses"):
        render(source, timeout_s=0.5)
    assert time.monotonic() - started < 1.5


def test_the_default_budget_stops_the_checklist_bombs_within_its_timeout() -> None:
    for source in (SIZE_BOMBS["repeat"], SIZE_BOMBS["repeat-power"], TIME_BOMBS["three-ranges"]):
        started = time.monotonic()
        with pytest.raises(TemplateRenderError):
            choose_template("llama", source).render(MESSAGES, bos="", eos="")
        assert time.monotonic() - started < 2.5  # template_timeout_s is 2 s by default


def test_output_is_counted_whether_streamed_or_captured() -> None:
    assert len(render("{% for i in range(1000) %}ab{% endfor %}", max_chars=2000)) == 2000
    with pytest.raises(TemplateRenderError, match="exceeded 2000 characters"):
        render("{% for i in range(1001) %}ab{% endfor %}", max_chars=2000)
    for captured in (
        "{% set x %}{% for i in range(1001) %}ab{% endfor %}{% endset %}",
        "{% macro m() %}{% for i in range(1001) %}ab{% endfor %}{% endmacro %}{% set y = m() %}",
        "{% filter lower %}{% for i in range(1001) %}ab{% endfor %}{% endfilter %}",
    ):
        with pytest.raises(TemplateRenderError, match="exceeded 2000 characters"):
            render(captured, max_chars=2000)


@pytest.mark.parametrize(
    "source",
    [GEMMA, CHATML, LLAMA3, PHI3, MISTRAL],
    ids=["gemma", "chatml", "llama3", "phi3", "mistral"],
)
def test_known_templates_render_exactly_as_jinja_does(source: str) -> None:
    messages = MESSAGES * 50
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    expected = env.from_string(source).render(
        messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True, tools=None
    )
    assert choose_template("llama", source).render(messages, bos="<s>", eos="</s>") == expected


def test_template_features_still_work_under_the_budget() -> None:
    source = (
        "{% set ns = namespace(n=0) %}{% for m in messages if m.role != 'system' %}{% set ns.n = ns.n + 1 %}"
        "{{ loop.index }}/{{ loop.length }}:{{ m.content|upper|replace('I', 'i') }}{{ '|' if not loop.last }}"
        "{% endfor %} n={{ ns.n }} {{ '%s-%d'|format('x', 3) }} {{ '{}!'.format('ok') }} {{ [1, 2] + [3] }}"
        " {{ 'ab' * 2 }} {{ 2 ** 10 }} {{ messages|map(attribute='role')|join(',') }} {{ 'x' ~ 1 ~ none }}"
        "{% macro greet(who) %}hi {{ who }}{% endmacro %} {{ greet('you') }}"
        "{% for x in [[1, [2]], [3]] recursive %}({{ loop(x) if x is iterable else x }}){% endfor %}"
    )
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    expected = env.from_string(source).render(messages=MESSAGES)
    assert render(source) == expected
    assert expected.startswith("1/3:Hi|2/3:HELLO.|3/3:BYE n=3 x-3 ok! [1, 2, 3] abab 1024 system,user")
    assert expected.endswith("((1)((2)))((3))")


def test_a_bomb_does_not_hold_up_other_renders() -> None:
    errors: list[BaseException] = []

    def bomb() -> None:
        try:
            render(TIME_BOMBS["three-ranges"], timeout_s=1.5)
        except TemplateRenderError as exc:
            errors.append(exc)

    worker = threading.Thread(target=bomb)
    worker.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert render(GEMMA).startswith("<s><start_of_turn>user")
    assert time.monotonic() - started < 0.5
    worker.join(5)
    assert not worker.is_alive() and len(errors) == 1


SSTI = [
    "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ namespace.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ ''|attr('__class__')|attr('__mro__') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ '{0.__class__}'.format(1) }}",
    "{{ '{0.__class__.__mro__[1].__subclasses__}'.format('') }}",
    "{{ '%s'|format(cycler.__init__) }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['os'].system('touch {marker}') }}",
    "{{ self.__init__.__globals__ }}",
    "{{ range.__self__ }}",
    "{{ messages.append(1) }}{{ messages.pop() }}",
    "{{ (messages|first).update({'role': 'x'}) }}",
    "{% set x = messages.__class__.__base__.__subclasses__() %}{{ x }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{% extends '/etc/passwd' %}",
]


@pytest.mark.parametrize("payload", SSTI)
def test_ssti_payloads_fail_or_render_harmlessly(payload: str, tmp_path: Path) -> None:
    marker = tmp_path / "escaped"
    source = payload.replace("{marker}", str(marker))
    try:
        out = render(source)
    except TemplateRenderError as exc:
        assert not re.search(r"0x[0-9a-fA-F]{6,}| at 0x|object at", str(exc)), exc
    else:
        assert "class" not in out and "function" not in out and "root:" not in out, out
    assert not marker.exists()


def test_error_messages_are_short_and_hold_no_addresses() -> None:
    with pytest.raises(TemplateRenderError) as raised:
        render("{{ raise_exception('x' * 1000000) }}")
    assert len(str(raised.value)) < 500
    with pytest.raises(TemplateRenderError) as raised:
        render("{{ cycler() + 1 }}")
    assert not re.search(r"0x[0-9a-fA-F]+|object at", str(raised.value)), raised.value


_JINJA_ENTRY_POINTS = re.compile(r"\bjinja2\.Template\(|Environment\(|\.from_string\(|from jinja2 import")
_TEMPLATE_MODULES = {"templates.py", "template_sandbox.py"}
# The console renders Pendra's own page templates, loaded from its package, never text from a GGUF
# or a request: a plain Environment on a PackageLoader, and nothing else of Jinja.
_CONSOLE = "services/api/pendra_api/console/routes.py"


def test_only_the_template_modules_build_jinja_templates() -> None:
    """Every template is rendered through the budgeted sandbox: no other module may construct a
    Jinja environment or template (a plain one would render a GGUF's template unbounded)."""
    offenders = []
    for folder in ("src", "services", "shared"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name in _TEMPLATE_MODULES and path.parent.as_posix().endswith("pendra_inference/formats"):
                continue
            if path.relative_to(REPO).as_posix() == _CONSOLE:
                text = path.read_text(encoding="utf-8")
                assert "from jinja2 import Environment, PackageLoader\n" in text
                assert 'loader=PackageLoader("pendra_api.console", "templates")' in text
                assert (
                    text.count("Environment(") == 1 and "from_string" not in text and "Template(" not in text
                )
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if _JINJA_ENTRY_POINTS.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
