"""A Jinja sandbox with a budget, for chat templates that come inside downloaded GGUF files.

jinja2's `ImmutableSandboxedEnvironment` stops attribute escapes, but not a template that renders
gigabytes (`{{ 'a' * 10**9 }}`) or loops for hours (three nested `range(100000)`). Every render here
spends from a `Budget` (template_budget.py), a deadline and a number of characters, checked at each
step a template can take:

- each iteration of every `{% for %}` (the parsed template is rewritten so that every loop
  iterates through `_Guards.iterate`), and every call, attribute and item access, filter and test;
- every piece of output, streamed or captured by `{% set %}`, a macro or a call block (rewritten
  through `_Guards.emit`): together at most `max_chars`;
- the operators `+ * ** %`, `~`, string methods and filters, sized before they run.

The bound, then: a render ends within the deadline plus one step, and no single value it makes
exceeds `max_chars` characters (or items). What is left: one C-level operation on values the
template nested by hand (comparing or hashing deeply shared list literals) is not interrupted, and
intermediate strings a loop builds with `+` or `~` are bounded by the deadline, not the allowance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, cast

from jinja2 import Template, nodes
from jinja2.ext import Extension
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from pendra_inference.formats.template_budget import (
    BUDGET,
    FILTER_CHECKS,
    Budget,
    TemplateBudgetExceeded,
    check_power,
    check_repeat,
    check_str_method,
    current_budget,
)

# Filters whose work grows with their input in Python code (not C): their input is capped.
HEAVY_TEXT_FILTERS = {"wordwrap": 1 << 20, "urlize": 1 << 20}
# Filters that do not turn their input into text (the rest do, so a nested list is measured first).
_SHALLOW_FILTERS = frozenset(
    "abs attr batch count d default dictsort first float groupby int items last length list map "
    "max min random reject rejectattr reverse round select selectattr slice sort sum unique".split()
)


def render_within(template: Template, budget: Budget, context: dict[str, Any]) -> str:
    """Render a template compiled by a `BudgetedEnvironment`, spending from `budget`."""
    token = BUDGET.set(budget)
    try:
        parts = []
        for part in template.generate(context):
            parts.append(part)
            budget.tick()
        return "".join(parts)
    finally:
        BUDGET.reset(token)


class _Guards(Extension):
    """The functions the rewritten template calls (reached as `environment.extensions[...]`,
    which a template cannot shadow)."""

    def iterate(self, iterable: Any) -> _Ticking:
        return _Ticking(iterable)

    def emit(self, *parts: Any) -> str:
        budget = current_budget()
        budget.tick()
        for part in parts:
            budget.text(part, "its output")
        text = "".join(map(str, parts))
        budget.emit(len(text))
        return text

    def concat(self, *parts: Any) -> str:
        budget = current_budget()
        budget.tick()
        budget.fits(sum(budget.weight(p) for p in parts), "one value joined with ~")
        return "".join(map(str, parts))


class _Ticking:
    """An iterable that checks the deadline at each item (and keeps `loop.length` cheap)."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[Any]:
        budget = current_budget()
        for item in self.source:
            budget.tick()
            yield item


class _Rewrite(NodeTransformer):
    """Route loops, output and `~` through `_Guards`."""

    def __init__(self, guards: Extension) -> None:
        self.guards = guards

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self.guards.call_method("iterate", [cast(nodes.Expr, node.iter)], lineno=node.lineno)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [self.guards.call_method("emit", list(node.nodes), lineno=node.lineno)]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self.guards.call_method("concat", list(node.nodes), lineno=node.lineno)


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, checking the render's `Budget` at every step (see the module)."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(extensions=[_Guards], optimized=False, **options)
        self.globals.pop("lipsum", None)  # Python loops of its own; no chat template uses it
        self.filters = {name: self.guard_filter(name, f) for name, f in self.filters.items()}
        self.tests = {name: _guard_test(cast(Callable[..., Any], f)) for name, f in self.tests.items()}

    def guard_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
        check = FILTER_CHECKS.get(name)
        shallow = name in _SHALLOW_FILTERS
        heavy = HEAVY_TEXT_FILTERS.get(name)

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            budget = current_budget()
            budget.tick()
            budget.int_args(args[skip + 1 :], kwargs)
            if len(args) > skip:
                value = args[skip]
                if not shallow:
                    budget.text(value, f"the input of |{name}")
                if heavy is not None and len(str(value)) > heavy:
                    raise TemplateBudgetExceeded(
                        f"the model's chat template passed more than {heavy} characters to |{name}"
                    )
                if check is not None:
                    args = (*args[:skip], *check(budget, self, args[skip:], kwargs))
            return budget.result(func(*args, **kwargs))

        return guarded

    def parse_guarded(self, source: str) -> nodes.Template:
        """The template's syntax tree with loops, output and `~` routed through the guards."""
        tree = self.parse(source)
        result = _Rewrite(self.extensions[_Guards.identifier]).visit(tree)
        assert isinstance(result, nodes.Template)
        return result

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = current_budget()
        budget.tick()
        if operator == "*":
            check_repeat(budget, left, right)
        elif operator == "**":
            check_power(budget, left, right)
        elif operator == "+":
            if isinstance(left, str | bytes | list | tuple) and isinstance(right, str | bytes | list | tuple):
                budget.fits(budget.weight(left) + budget.weight(right), "one value joined with +")
        elif operator == "%" and isinstance(left, str):
            budget.format_string(left, right, "%-format")
        return budget.result(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, _Guards):
            return __context.call(__obj, *args, **kwargs)
        budget = current_budget()
        budget.tick()
        budget.int_args(args, kwargs)
        if isinstance(owner, str | bytes):
            args = check_str_method(budget, owner, getattr(__obj, "__name__", ""), args, kwargs)
        return budget.result(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        current_budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        current_budget().tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt: str = value.__self__
        is_map = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            budget = current_budget()
            budget.tick()
            budget.format_string(
                fmt, args[0] if is_map and args else {**dict(enumerate(args)), **kwargs}, "format"
            )
            result: str = budget.result(wrapper(*args, **kwargs))
            return result

        return checked


def _guard_test(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        budget.tick()
        for value in args:
            budget.text(value, "the input of a test")
        return func(*args, **kwargs)

    return guarded
