"""One registry shape for balancers, datasets, encoders and fusions.

Each kind has a :class:`Registry`; its public face is three functions (``register_*`` as a decorator,
``list_*`` and ``create_*``; for datasets the create function is ``load_dataset``). Everything a user can
get wrong when naming an item or passing options is checked here, once, for all four kinds:

- an unknown name gets the closest registered names and the valid list;
- an unknown option gets the closest option names and the valid options with their defaults;
- a missing required option names itself and shows how to pass it;
- an option value of the wrong type (a string where a number is expected, a value outside a ``Literal``
  choice) names the option, what was expected and what was found. Strings are converted to the type of
  the option's default first (``"0.9"`` -> ``0.9``, ``"true"`` -> ``True``), so options can come straight
  from a command line.

Example:
    >>> reg = Registry("widget")
    >>> @reg.decorator("round")
    ... def round_widget(*, radius: float = 1.0) -> float:
    ...     return radius
    >>> reg.create("round", radius="2.5")
    2.5
    >>> reg.create("rund")
    Traceback (most recent call last):
    ...
    ValueError: Unknown widget 'rund'. Did you mean 'round'? Valid widget names: round.
"""

from __future__ import annotations

import difflib
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, Literal, TypeVar

T = TypeVar("T")
_EMPTY = inspect.Parameter.empty
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def close_matches(name: str, valid: list[str]) -> list[str]:
    """Up to three of ``valid`` that look like ``name``."""
    return difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)


def unknown_name_error(kind: str, name: str, valid: list[str]) -> ValueError:
    """Build the error for an unknown name: what was asked, the closest matches and the valid list."""
    close = close_matches(name, valid)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"Unknown {kind} {name!r}.{hint} Valid {kind} names: {', '.join(sorted(valid))}.")


def _signature(factory: Callable[..., Any]) -> inspect.Signature:
    target = factory.__init__ if isinstance(factory, type) else factory
    return inspect.signature(target)


def _hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: check by defaults only
        return {}


def option_parameters(factory: Callable[..., Any], skip: int = 0) -> dict[str, inspect.Parameter]:
    """The keyword options of ``factory`` (a class or function), after ``skip`` leading positional ones."""
    params = list(_signature(factory).parameters.values())
    if isinstance(factory, type):
        params = params[1:]  # self
    params = params[skip:]
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name: p for p in params if p.kind in kinds}


def _literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation (also inside ``X | None``), else ``None``."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            choices = _literal_choices(arg)
            if choices is not None:
                return choices
    return None


def _union_args(tp: Any) -> tuple[Any, ...]:
    """The members of a union annotation, or the annotation itself."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _expected_types(default: Any, annotation: Any) -> tuple[set[type], bool]:
    """The plain types (bool, int, float, str) an option takes, and whether it also takes anything else.

    Read from the annotation when there is one, else from the default's type.
    """
    members = _union_args(annotation) if annotation is not None else (type(default),)
    members = tuple(str if _is_pathlike(t) else t for t in members)  # a path is a string option
    plain = {t for t in members if t in (bool, int, float, str)}
    other = any(t not in (bool, int, float, str, type(None)) for t in members)
    return plain, other


def _is_pathlike(tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and issubclass(origin, os.PathLike)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_words(plain: set[type]) -> str:
    """``{int, float}`` -> ``"a number"``, ``{bool}`` -> ``"true or false"``, ..."""
    if float in plain:
        plain = plain - {int}
    return " or ".join(_TYPE_WORDS[t] for t in (bool, int, float, str) if t in plain)


def _as_number(where: str, key: str, value: str, plain: set[type]) -> Any:
    low = value.strip().lower()
    if bool in plain and low in (*_TRUE, *_FALSE):
        return low in _TRUE
    try:
        number = float(value)
    except ValueError:
        raise TypeError(
            f"{where} option {key!r} expects {_type_words(plain)}, found the string {value!r}."
        ) from None
    if int in plain and (float not in plain or number == int(number)) and number == int(number):
        return int(number)
    if float in plain:
        return number
    raise TypeError(f"{where} option {key!r} expects an integer, found {value!r}.")


def coerce_option(where: str, key: str, value: Any, default: Any, annotation: Any = None) -> Any:
    """Convert a string ``value`` to the option's type and check plain-typed options.

    The option's type comes from its annotation (or, without one, its default): ``Literal`` choices are
    checked with close matches; a string given for a bool/int/float option is converted; a value of the
    wrong plain type (a string or a bool for a number, a number for a string) is refused. Options that
    also take other types (mappings, modules, callables) accept any non-string value.

    Raises:
        TypeError: the value cannot be of the option's type (names the option, the type and the value).
        ValueError: the value is not one of a ``Literal`` option's choices (with close matches).
    """
    if value is None:
        return value
    choices = _literal_choices(annotation) if annotation is not None else None
    if choices is not None:
        if value not in choices:
            valid = [str(c) for c in choices]
            close = close_matches(str(value), valid)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"{where} option {key!r} must be one of {', '.join(map(repr, choices))}, found {value!r}.{hint}"
            )
        return value
    if annotation is None and default in (_EMPTY, None):
        return value
    plain, other = _expected_types(default, annotation)
    if not plain:
        return value
    if isinstance(value, str):
        if str in plain or other:
            return value
        return _as_number(where, key, value, plain)
    if other or (str in plain and isinstance(value, os.PathLike)):
        return value
    if plain == {str} and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if isinstance(value, float) and value == int(value) else str(value)
    if isinstance(value, bool):
        ok = bool in plain
    elif isinstance(value, int):
        ok = bool(plain & {int, float})
    else:
        ok = isinstance(value, float) and float in plain
    if ok:
        return value
    if isinstance(value, float) and int in plain and value == int(value):
        return int(value)
    raise TypeError(
        f"{where} option {key!r} expects {_type_words(plain)}, found {type(value).__name__} {value!r}."
    )


def check_options(
    where: str,
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    *,
    skip: int = 0,
    example: str = "",
    complete: bool = True,
) -> dict[str, Any]:
    """Validate ``options`` against ``factory``'s keyword parameters and return them coerced.

    Args:
        where: how to name the item in messages, e.g. ``"Balancer 'amss'"``.
        factory: the registered class or function.
        options: the keyword options given.
        skip: leading positional parameters that are not options (e.g. ``model``).
        example: how a user passes an option, with ``{key}`` for its name (for the missing-option hint).
        complete: whether ``options`` must hold every required option (``False``: check what is given).
    """
    sig_params = _signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig_params):
        return dict(options)
    valid = option_parameters(factory, skip)
    unknown = [k for k in options if k not in valid]
    if unknown:
        close = {k: close_matches(k, list(valid)) for k in unknown}
        hint = "".join(f" Did you mean {' or '.join(map(repr, c))} for {k!r}?" for k, c in close.items() if c)
        shown = ", ".join(f"{k}={p.default!r}" if p.default is not _EMPTY else k for k, p in valid.items())
        raise TypeError(f"{where} got unknown option(s) {unknown}.{hint} Valid options: {shown or '(none)'}.")
    missing = [k for k, p in valid.items() if p.default is _EMPTY and k not in options]
    if missing and complete:
        how = example.format(key=missing[0]) if example else f"{missing[0]}=..."
        raise TypeError(f"{where} needs option(s) {missing}, e.g. {how}.")
    hints = _hints(factory)
    return {k: coerce_option(where, k, v, valid[k].default, hints.get(k)) for k, v in options.items()}


class Registry(Generic[T]):
    """Maps names to classes or factory functions; one implementation of every name and option check.

    Args:
        kind: what is registered, for messages (``"balancer"``, ``"dataset"``, ...).
        base: when given, only subclasses of ``base`` may be registered, and the decorator sets their
            ``name`` attribute to the registered name (so the name is written once).
        skip: leading positional arguments of :meth:`create` that are not options (the model, ...).
        example: how a user passes an option, with ``{name}`` and ``{key}`` placeholders.
    """

    def __init__(self, kind: str, *, base: type | None = None, skip: int = 0, example: str = "") -> None:
        self.kind = kind
        self.base = base
        self.skip = skip
        self.example = example
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, overwrite: bool = False) -> T:
        """Register ``item`` under ``name`` (refuses a taken name unless ``overwrite``)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} name must be a non-empty string, got {name!r}.")
        if self.base is not None and not (isinstance(item, type) and issubclass(item, self.base)):
            raise TypeError(f"register_{self.kind} expects a {self.base.__name__} subclass, found {item!r}.")
        if self.base is None and not callable(item):
            raise TypeError(f"register_{self.kind} expects a class or function, found {item!r}.")
        if name in self._items and not overwrite:
            raise ValueError(
                f"A {self.kind} named {name!r} is already registered. Pick another name or pass overwrite=True."
            )
        if self.base is not None:
            item.name = name  # type: ignore[attr-defined]
        self._items[name] = item
        return item

    def decorator(self, name: str, *, overwrite: bool = False) -> Callable[[T], T]:
        """A decorator registering the decorated class or function under ``name``."""

        def add(item: T) -> T:
            return self.register(name, item, overwrite=overwrite)

        return add

    def get(self, name: str) -> T:
        """Return the item registered as ``name`` or raise a helpful ``ValueError``."""
        if name not in self._items:
            raise unknown_name_error(self.kind, str(name), list(self._items))
        return self._items[name]

    def options(self, name: str) -> dict[str, Any]:
        """The options of ``name`` and their defaults (``inspect.Parameter.empty`` when required)."""
        return {k: p.default for k, p in option_parameters(self.get(name), self.skip).items()}

    def check(self, name: str, options: Mapping[str, Any], *, complete: bool = True) -> dict[str, Any]:
        """Validate and coerce ``options`` for ``name`` without building anything.

        ``complete=False`` checks only the options given (a preset may leave a required one, such as a
        data folder, to the command line; building it then names what is missing).
        """
        factory = self.get(name)
        example = self.example.format(name=name, key="{key}") if self.example else ""
        return check_options(
            f"{self.kind.capitalize()} {name!r}",
            factory,
            options,
            skip=self.skip,
            example=example,
            complete=complete,
        )

    def create(self, name: str, *args: Any, **options: Any) -> Any:
        """Build ``name`` from ``args`` (the :attr:`skip` positional ones) and checked ``options``."""
        return self.get(name)(*args, **self.check(name, options))

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
