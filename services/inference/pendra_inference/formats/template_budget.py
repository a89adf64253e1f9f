"""What one chat-template render may spend, and the size rules that keep each step inside it.

A `Budget` holds a deadline and a number of characters. `BudgetedEnvironment` (template_sandbox.py)
asks it at every step; the checks here are the ones that know, from an operation's operands, how
big its result will be, so that it fails before it allocates: `*` and `+` on strings and lists,
`**` and `*` on integers, `%` and `str.format` widths, `center`/`indent`/`replace`/`join`/
`batch`/`slice`, string methods that grow their string, and turning a nested list into text
(`Budget.weight` measures the text once per distinct list, so shared sublists cost nothing).
After every call and filter a string or list longer than `max_chars` is refused, and each such
result counts toward an allowance of `ALLOCATION_FACTOR × max_chars`.

The budget of the render in progress is a context variable, set by `render_within`.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator, KeysView, ValuesView
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from jinja2.filters import make_attrgetter
from jinja2.runtime import Undefined
from jinja2.sandbox import MAX_RANGE
from jinja2.utils import Namespace

# Longest list `batch`/`slice` may make, and their counts: jinja's own bound on `range`.
MAX_ITEMS = MAX_RANGE
# Integers a template may build with * and **: far past the 4300 digits Python turns into text.
MAX_INT_BITS = 1 << 16
# Everything a render allocates (results of calls, filters and operators), in units of max_chars.
ALLOCATION_FACTOR = 4
_CONTAINERS = (list, tuple, dict, set, frozenset, Namespace, KeysView, ValuesView)
_DIGITS_RE = re.compile(r"\d+")


class TemplateBudgetExceeded(Exception):
    """A render went past its deadline or its size limit."""


@dataclass
class Budget:
    """What one render may still spend, and the text sizes it has measured."""

    max_chars: int
    timeout_s: float
    deadline: float = 0.0
    output: int = 0
    allocated: int = 0
    _weights: dict[int, tuple[Any, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded(
                f"the model's chat template took longer than {self.timeout_s:g} s to render "
                "(PENDRA_TEMPLATE_TIMEOUT_S)"
            )

    def too_big(self, what: str) -> TemplateBudgetExceeded:
        return TemplateBudgetExceeded(
            f"the model's chat template exceeded {self.max_chars} characters ({what}; "
            "PENDRA_TEMPLATE_MAX_CHARS)"
        )

    def fits(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise self.too_big(what)

    def emit(self, size: int) -> None:
        self.output += size
        if self.output > self.max_chars:
            raise self.too_big("its output")

    def result(self, value: Any) -> Any:
        """Check and count a value an operation made."""
        if isinstance(value, str | bytes | list | tuple):
            self.fits(len(value), "one value it made")
            self.allocated += len(value)
            if self.allocated > ALLOCATION_FACTOR * self.max_chars:
                raise self.too_big(f"{ALLOCATION_FACTOR}x that in values it made")
        return value

    def int_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A number past the budget is a size no chat template needs (a width, a count)."""
        for value in itertools.chain(args, kwargs.values()):
            if type(value) is int and abs(value) > self.max_chars:
                raise self.too_big(f"an argument of {_number(value)}")

    def weight(self, value: Any) -> int:
        """About len(str(value)), capped just past max_chars. Each distinct list is measured once
        per render (sublists it shares cost nothing), without recursion."""
        if isinstance(value, str | bytes):
            return len(value)
        if not isinstance(value, _CONTAINERS):
            return _scalar_weight(value)
        cap = self.max_chars + 1
        memo = self._weights
        if id(value) in memo:
            return memo[id(value)][1]
        stack: list[list[Any]] = [[value, _children(value), 2]]
        open_ids = {id(value)}
        steps = 0
        while stack:
            top = stack[-1]
            child = next(top[1], _END)
            if child is _END:
                stack.pop()
                open_ids.discard(id(top[0]))
                total = int(min(top[2], cap))
                if not isinstance(top[0], Namespace):  # a namespace changes; lists cannot here
                    memo[id(top[0])] = (top[0], total)
                if not stack:
                    return total
                stack[-1][2] += total
                continue
            steps += 1
            if steps % 4096 == 0:
                self.tick()
            if isinstance(child, str | bytes):
                top[2] += len(child) + 2
            elif not isinstance(child, _CONTAINERS):
                top[2] += _scalar_weight(child) + 2
            elif id(child) in memo:
                top[2] += memo[id(child)][1] + 2
            elif id(child) in open_ids:
                top[2] += 8  # a cycle, printed as [...]
            else:
                stack.append([child, _children(child), 2])
                open_ids.add(id(child))
                continue
            if top[2] > cap:  # and so is everything still open, which contains it
                for frame in stack:
                    if not isinstance(frame[0], Namespace):
                        memo[id(frame[0])] = (frame[0], cap)
                return cap
        return cap  # not reached

    def text(self, value: Any, what: str) -> None:
        """Refuse to turn a value into text when the text would be too long."""
        if isinstance(value, _CONTAINERS):
            self.fits(self.weight(value), what)

    def format_string(self, fmt: str, args: Any, what: str) -> None:
        """A width or precision past the budget in a format string or its arguments."""
        limit = len(str(self.max_chars))
        for digits in _DIGITS_RE.findall(fmt):
            if len(digits) > limit or int(digits) > self.max_chars:
                raise self.too_big(f"a {what} width of {digits[:20]}")
        values = list(args.values()) if isinstance(args, dict) else list(_tupled(args))
        for value in values:
            if type(value) is int and abs(value) > self.max_chars:
                raise self.too_big(f"a {what} argument of {_number(value)}")
            self.text(value, f"a {what} argument")


_END = object()


def _number(value: int) -> str:
    return str(value) if value.bit_length() <= 64 else f"about 2**{value.bit_length()}"


def _tupled(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


def _children(value: Any) -> Iterator[Any]:
    if isinstance(value, Namespace):
        value = object.__getattribute__(value, "_Namespace__attrs")
    if isinstance(value, dict):
        return itertools.chain.from_iterable(value.items())
    return iter(value)


def _scalar_weight(value: Any) -> int:
    if isinstance(value, Undefined):
        return 0
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    return 32


BUDGET: ContextVar[Budget | None] = ContextVar("pendra_template_budget", default=None)
_DEFAULT_MAX_CHARS = 16 * 1024 * 1024
_DEFAULT_TIMEOUT_S = 1.0  # PENDRA_TEMPLATE_TIMEOUT_S's default


def current_budget() -> Budget:
    """The budget of the render in progress (outside one, a fresh default for this one step)."""
    return BUDGET.get() or Budget(_DEFAULT_MAX_CHARS, _DEFAULT_TIMEOUT_S)


def check_repeat(budget: Budget, left: Any, right: Any) -> None:
    if isinstance(right, str | bytes | list | tuple):
        left, right = right, left
    if isinstance(left, str | bytes | list | tuple) and isinstance(right, int) and right > 0:
        budget.fits(budget.weight(left) * right, "one value repeated with *")
    elif isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise budget.too_big("a product of huge integers")


def check_power(budget: Budget, base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent > MAX_INT_BITS or exponent * base.bit_length() > MAX_INT_BITS:
            raise budget.too_big(f"an integer power ** {_number(exponent)}")


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def check_str_method(
    budget: Budget, owner: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """Sizes of string methods that grow their string, before they run."""
    if name == "expandtabs":
        size = _arg(args, kwargs, 0, "tabsize", 8)
        if isinstance(size, int):
            tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
            budget.fits(len(owner) + tabs * size, "expandtabs")
    elif name == "replace" and len(args) >= 2:
        budget.fits(_replaced_size(owner, args[0], args[1], _arg(args, kwargs, 2, "count", -1)), "replace")
    elif name == "join" and args:
        items = list(args[0])
        budget.fits(sum(budget.weight(i) for i in items) + len(owner) * max(0, len(items) - 1), "join")
        return (items, *args[1:])
    return args


def _replaced_size(s: Any, old: Any, new: Any, count: Any) -> int:
    """len(s.replace(old, new, count)), without making it."""
    if not (type(s) is type(old) is type(new)) or not isinstance(s, str | bytes):
        return 0
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return int(len(s) + hits * (len(new) - len(old)))


# -- per-filter checks: (budget, env, args after the pass-arg, kwargs) -> those args -----------

FilterCheck = Callable[[Budget, Any, tuple[Any, ...], dict[str, Any]], tuple[Any, ...]]


def _indent(budget: Budget, env: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    text = str(args[0])
    width = _arg(args, kwargs, 1, "width", 4)
    step = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    budget.fits(len(text) + (text.count("\n") + 1) * step, "|indent")
    return args


def _center(budget: Budget, env: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    width = _arg(args, kwargs, 1, "width", 80)
    if isinstance(width, int):
        budget.fits(width, "|center")
    return args


def _replace(budget: Budget, env: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    old, new = _arg(args, kwargs, 1, "old"), _arg(args, kwargs, 2, "new")
    budget.fits(_replaced_size(str(args[0]), old, new, _arg(args, kwargs, 3, "count")), "|replace")
    return args


def _items_cap(name: str, keyword: str) -> FilterCheck:
    def check(budget: Budget, env: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        count = _arg(args, kwargs, 1, keyword)
        if isinstance(count, int) and count > MAX_ITEMS:
            raise TemplateBudgetExceeded(
                f"the model's chat template asked |{name} for {count} items (at most {MAX_ITEMS})"
            )
        return args

    return check


def _format(budget: Budget, env: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    budget.format_string(str(args[0]), kwargs or args[1:], "|format")
    return args


def _join(budget: Budget, env: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    items = list(args[0])
    attribute = _arg(args, kwargs, 2, "attribute")
    texts = items if attribute is None else list(map(make_attrgetter(env, attribute), items))
    sep = len(str(_arg(args, kwargs, 1, "d", "")))
    budget.fits(sum(budget.weight(i) for i in texts) + sep * max(0, len(texts) - 1), "|join")
    return (items, *args[1:])


def _sum(budget: Budget, env: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    items = list(args[0])
    if len(items) > 1024 and not all(isinstance(i, int | float) for i in items):
        raise TemplateBudgetExceeded("the model's chat template summed more than 1024 non-numbers")
    return (items, *args[1:])


FILTER_CHECKS: dict[str, FilterCheck] = {
    "indent": _indent,
    "center": _center,
    "replace": _replace,
    "batch": _items_cap("batch", "linecount"),
    "slice": _items_cap("slice", "slices"),
    "format": _format,
    "join": _join,
    "sum": _sum,
}
