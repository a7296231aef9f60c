"""One check for a balancer's option values, with one message format (:meth:`Balancer.check_option`).

A balancer checks its options in ``__init__``, whether it is built from a config (where the registry
already coerced the types) or by hand in a loop of one's own (where nothing did). Every refusal reads
``Balancer 'NAME' option 'KEY' must be EXPECTED, found VALUE.``, plus a hint where one helps (the
authors' value, what None means, the close matches of a misspelt choice). A choice is worded as the
registry words the choices of a config value (``one of 'a', 'b'``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..registry import close_matches


def _choice_words(choices: Sequence[Any]) -> str:
    """``one of 'a', 'b', 'c'``, as the registry words a choice (``True or False`` for the two bools)."""
    if len(choices) == 2 and all(isinstance(c, bool) for c in choices):
        return "True or False"
    return f"one of {', '.join(map(repr, choices))}"


def _range_words(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    """``>= 0``, ``> 0``, ``<= 1``, ``in [0, 1]``, ``in (0, 1)``, ... (empty when unbounded)."""
    if low is not None and high is not None:
        return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    if low is not None:
        return f"{'>' if open_low else '>='} {low:g}"
    if high is not None:
        return f"{'<' if open_high else '<='} {high:g}"
    return ""


def _in_range(value: float, low: float | None, high: float | None, open_low: bool, open_high: bool) -> bool:
    above = low is None or (value > low if open_low else value >= low)
    below = high is None or (value < high if open_high else value <= high)
    return above and below


def checked_option(
    method: str,
    key: str,
    value: Any,
    *,
    choices: Sequence[Any] | None = None,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    integer: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> Any:
    """``value`` if it is valid (a number as ``float``, or ``int`` with ``integer``), else a ValueError.

    With ``choices``: ``value`` must be one of them (compared with ``==``; a bool only matches a bool).
    Otherwise ``value`` must be a finite number (a whole one with ``integer``; never a bool) within the
    bounds. ``allow_none`` also accepts None (returned as is). See :meth:`Balancer.check_option`.
    """
    if value is None and allow_none:
        return None
    if choices is not None:
        if any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices):
            return value
        expected = _choice_words(choices)
        close = close_matches(str(value), [str(c) for c in choices])
        hint = "; ".join(
            h for h in (hint, f"did you mean {', '.join(map(repr, close))}?" if close else "") if h
        )
    else:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        whole = number and (not integer or float(value).is_integer())
        if whole and _in_range(float(value), low, high, open_low, open_high):
            return int(value) if integer else float(value)
        expected = (
            f"{'an integer' if integer else 'a finite number'} {_range_words(low, high, open_low, open_high)}"
        )
    expected = f"{expected.rstrip()}{' or None' if allow_none else ''}"
    raise ValueError(
        f"Balancer {method!r} option {key!r} must be {expected}, found {value!r}{f' ({hint})' if hint else ''}."
    )
