"""One registry shape for balancers, datasets, encoders, fusions and preparers.

Each kind has a :class:`Registry`; its public face is three functions (``register_*`` as a decorator,
``list_*`` and ``create_*``; for datasets the create function is ``load_dataset``). Items are registered
by a decorator at their definition; the package of each kind imports its built-in modules in one list,
and other packages add theirs as plugins (:mod:`equimodal.plugins`), loaded on the first lookup.
Everything a user can get wrong when naming an item or passing options is checked here, once, for all
kinds:

- an unknown name gets the closest registered names and the valid list;
- an unknown option gets the closest option names and the valid options with their defaults;
- a missing required option names itself and shows how to pass it;
- an option value of the wrong type (a string where a number is expected, a value outside a ``Literal``
  choice) names the option, what was expected and what was found. Strings are converted to the option's
  type first by :func:`coerce_value` (``"0.9"`` -> ``0.9``, ``"true"`` -> ``True``), the conversion the
  config uses for its fields too, so options can come straight from a command line.

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

import contextlib
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Generic, Literal, TypeVar

from .plugins import PLUGINS, PluginClashError

T = TypeVar("T")
_EMPTY = inspect.Parameter.empty
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
"""The strings read as ``True`` / ``False`` (any case) wherever true or false is expected: config fields
(``train.amp=yes``) and options (``--set data.options.pix_image=off``) alike."""
_PLAIN = (bool, int, float, str)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def close_matches(name: str, valid: list[str]) -> list[str]:
    """Up to three of ``valid`` that look like ``name``."""
    return difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)


def unknown_name_error(kind: str, name: str, valid: list[str]) -> ValueError:
    """Build the error for an unknown name: what was asked, the closest matches and the valid list."""
    close = close_matches(name, valid)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"Unknown {kind} {name!r}.{hint} Valid {kind} names: {', '.join(sorted(valid))}.")


def unknown_options_error(where: str, unknown: list[str], valid: list[str], shown: str = "") -> TypeError:
    """Build the error for unknown option names: the closest valid name for each, and the valid ones
    (``shown``, e.g. with their defaults; default: ``valid``)."""
    close = {k: close_matches(k, valid) for k in unknown}
    hint = "".join(f" Did you mean {' or '.join(map(repr, c))} for {k!r}?" for k, c in close.items() if c)
    listing = shown or ", ".join(valid) or "(none)"
    return TypeError(f"{where} got unknown option(s) {unknown}.{hint} Valid options: {listing}.")


# ------------------------------------------------------------------------------------------- coercion
def name_list(value: Any, container: type = Collection) -> list[str] | None:
    """Names given as ``"a, b"`` (a command line's form) or as a ``container`` of strings, as a list;
    ``None`` when ``value`` is neither (the caller raises its own error, naming its option).

    Pass ``container=Sequence`` where the order matters: a set's order changes from run to run.
    """
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, container) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def coerce_value(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp``: the one conversion of config values and options.

    Strings become the type asked for (``"0.9"`` -> ``0.9``, ``"1e3"`` -> ``1000`` for an integer, one of
    :data:`TRUE_WORDS` / :data:`FALSE_WORDS` -> a bool), so values can come straight from a command line
    or from YAML (which reads ``1e-3`` as a string). By ``tp``:

    - ``Any``: free-form; number-like strings become floats, inside mappings and lists too.
    - ``bool``, ``int``, ``float``, ``str`` and unions of them: a value of another plain type is converted
      when nothing is lost (``2.0`` -> ``2``, ``1`` -> ``1.0``, ``0``/``1`` -> a bool, a number -> a
      string) and refused otherwise (a bool for a number, ``2.5`` for an integer). A path is a string.
    - ``Literal[...]``: the value must be one of the choices.
    - ``X | None``: ``None`` is kept; without ``None`` in ``tp`` it is refused.
    - a dataclass in ``tp`` (an options object a constructor takes, such as a part ``P``): its instances
      are kept as they are; any other value is converted to the rest of ``tp`` (``P | float | None``: a
      number or ``None``).
    - ``tuple[X, ...]``: a list, a tuple, one value or a comma-separated string; each item is an ``X``.
    - ``dict[K, X]``: a mapping whose values are ``X``.
    - any other type (a mapping, a module, a callable): accepted unchecked, as is any value of a union
      that holds such a type besides plain ones.

    Args:
        value: the value given.
        tp: the annotation it must fit.
        where: how to name the value in messages (``"train.epochs"``, ``"Balancer 'amss' option 'alpha'"``).

    Raises:
        TypeError: ``"{where}: expected {what}, found {value}."``
        ValueError: a value outside a ``Literal``'s choices (with close matches).
    """
    if tp is Any:
        return free_form(value)
    members = _union_args(tp)
    parts = tuple(m for m in members if isinstance(m, type) and dataclasses.is_dataclass(m))
    if parts:
        return _part_or_rest(value, members, parts, where)
    if value is None:
        if type(None) in members:
            return None
        raise _mismatch(where, _expected_words(members), value)
    members = tuple(m for m in members if m is not type(None))
    choices = _literal_choices(tp)
    if choices is not None:
        return _choice(value, choices, where)
    if len(members) == 1 and (typing.get_origin(members[0]) or members[0]) in (dict, tuple):
        return _container(value, members[0], where)
    return _plain(value, members, where)


def _part_or_rest(value: Any, members: tuple[Any, ...], parts: tuple[type, ...], where: str) -> Any:
    """A value for a union holding dataclasses (``parts``): an instance of one as is, else the rest's."""
    if isinstance(value, parts):
        return value
    rest = tuple(m for m in members if m not in parts)
    if not rest or (value is not None and all(m is type(None) for m in rest)):
        raise _mismatch(where, _expected_words(members), value)
    return coerce_value(value, typing.Union[rest], where)  # noqa: UP007


def free_form(value: Any) -> Any:
    """An untyped value: number-like strings (YAML 1.1 reads ``1e-3`` as a string) become floats."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, Mapping):
        return {k: free_form(v) for k, v in value.items()}
    if isinstance(value, list):
        return [free_form(v) for v in value]
    return value


def describe(value: Any) -> str:
    """How a message shows a value: ``the string 'x'``, ``float 2.5``, ``None``."""
    if isinstance(value, str):
        return f"the string {value!r}"
    return "None" if value is None else f"{type(value).__name__} {value!r}"


def _mismatch(where: str, expected: str, value: Any) -> TypeError:
    return TypeError(f"{where}: expected {expected}, found {describe(value)}.")


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


def _is_pathlike(tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and issubclass(origin, os.PathLike)


def _type_words(plain: set[type]) -> str:
    """``{int, float}`` -> ``"a number"``, ``{bool}`` -> ``"true or false"``, ..."""
    if float in plain:
        plain = plain - {int}
    return " or ".join(_TYPE_WORDS[t] for t in _PLAIN if t in plain)


def _expected_words(members: tuple[Any, ...]) -> str:
    """What a value of one of ``members`` is, in words (for the message refusing a value)."""
    words = []
    for member in members:
        origin = typing.get_origin(member) or member
        if member is type(None):
            words.append("None")
        elif member in _PLAIN:
            words.append(_type_words({member}))
        elif origin is Literal:
            words.append(f"one of {', '.join(map(repr, typing.get_args(member)))}")
        else:
            named = {dict: "a mapping", tuple: "a list"}.get(origin)
            words.append(named or f"a {getattr(origin, '__name__', member)}")
    return " or ".join(dict.fromkeys(words))


def _choice(value: Any, choices: tuple[Any, ...], where: str) -> Any:
    if value in choices:
        return value
    close = close_matches(str(value), [str(c) for c in choices])
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"{where} must be one of {', '.join(map(repr, choices))}, found {value!r}.{hint}")


def _container(value: Any, tp: Any, where: str) -> Any:
    """A ``dict[K, X]`` (a mapping) or a ``tuple[X, ...]`` (a list, one value or ``"a,b"``)."""
    args = typing.get_args(tp)
    if (typing.get_origin(tp) or tp) is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(where, "a mapping", value)
        item = args[1] if len(args) == 2 else Any
        return {k: coerce_value(v, item, where) for k, v in value.items()}
    if isinstance(value, str):
        value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
    if isinstance(value, (int, float)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _mismatch(where, "a list", value)
    item = args[0] if args else Any
    return tuple(coerce_value(v, item, where) for v in value)


def _plain(value: Any, members: tuple[Any, ...], where: str) -> Any:
    """A value for a union of plain types (bool, int, float, str, paths) and possibly others."""
    members = tuple(str if _is_pathlike(t) else t for t in members)
    plain = {t for t in members if t in _PLAIN}
    other = any(t not in _PLAIN for t in members)
    if not plain:
        return value
    if isinstance(value, str):
        return value if str in plain or other else _from_string(value, plain, where)
    if other or (str in plain and isinstance(value, os.PathLike)):
        return value
    converted = _from_scalar(value, plain)
    if converted is _EMPTY:
        raise _mismatch(where, _type_words(plain), value)
    return converted


def _integral(number: float) -> bool:
    return math.isfinite(number) and number == int(number)


def _from_string(value: str, plain: set[type], where: str) -> Any:
    """A string given for a bool or a number: a true/false word, or a number of the type asked for."""
    low = value.strip().lower()
    if bool in plain and low in (*TRUE_WORDS, *FALSE_WORDS):
        return low in TRUE_WORDS
    try:
        number = float(value) if plain & {int, float} else None
    except ValueError:
        number = None
    if number is not None and int in plain and _integral(number):
        return int(number)
    if number is not None and float in plain:
        return number
    raise _mismatch(where, _type_words(plain), value)


def _from_scalar(value: Any, plain: set[type]) -> Any:
    """A non-string value for plain types, converted when nothing is lost; ``_EMPTY`` when it cannot be."""
    if isinstance(value, bool):
        return value if bool in plain else _EMPTY
    if isinstance(value, int):
        if int in plain:
            return value
        if float in plain:
            return float(value)
        if bool in plain and value in (0, 1):
            return bool(value)
        return str(value) if str in plain else _EMPTY
    if isinstance(value, float):
        if float in plain:
            return value
        if int in plain and _integral(value):
            return int(value)
        if str in plain:
            return str(int(value)) if _integral(value) else str(value)
    return _EMPTY


# ------------------------------------------------------------------------------------------ options
def _targets(factory: Callable[..., Any]) -> list[Callable[..., Any]]:
    """The callables whose keyword parameters are ``factory``'s options.

    A function is its own target. A class's ``__init__`` is, and when it ends in ``**options`` that it
    passes on to ``super().__init__``, so is the next ``__init__`` up its MRO, and so on (a balancer
    writes only its own options and inherits the window and seed of :class:`~equimodal.Balancer`, as
    pytorch-metric-learning's losses inherit their reducer options). An ``__init__``'s signature is what
    ``inspect.signature`` gives: a ``__signature__`` it declares counts (one that lists the keywords its
    ``**options`` takes for itself ends the walk).
    """
    if not isinstance(factory, type):
        return [factory]
    targets = []
    for cls in factory.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None or cls is object:
            continue
        targets.append(init)
        params = inspect.signature(init).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return targets


def _open_ended(factory: Callable[..., Any]) -> bool:
    """Whether ``factory`` takes any keyword (its last target ends in ``**kwargs``): nothing to check."""
    params = inspect.signature(_targets(factory)[-1]).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """The option types of ``factory``: the type hints of its targets (see :func:`_targets`), and the types
    a target's signature carries as objects (a ``__signature__`` that a constructor taking ``**options``
    for itself declares for them)."""
    hints: dict[str, Any] = {}
    for target in reversed(_targets(factory)):  # a subclass's annotation wins
        while isinstance(target, functools.partial):
            target = target.func
        with contextlib.suppress(Exception):  # unresolvable annotations: check by defaults only
            hints.update(typing.get_type_hints(target))
        declared = inspect.signature(target).parameters.values()
        hints.update(
            (p.name, p.annotation)
            for p in declared
            if p.annotation is not _EMPTY and not isinstance(p.annotation, str)
        )
    return hints


def option_parameters(factory: Callable[..., Any], skip: int = 0) -> dict[str, inspect.Parameter]:
    """The keyword options of ``factory`` (a class or function), after ``skip`` leading positional ones;
    for a class, its ``__init__``'s and those it passes on with ``**options`` (see :func:`_targets`)."""
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    found: dict[str, inspect.Parameter] = {}
    for target in _targets(factory):
        params = list(inspect.signature(target).parameters.values())
        if isinstance(factory, type):
            params = params[1:]  # self
        for p in params[skip:]:
            if p.kind in kinds and p.name not in found:
                found[p.name] = p
    return found


def coerce_option(where: str, key: str, value: Any, default: Any, annotation: Any = None) -> Any:
    """Convert an option's ``value`` with :func:`coerce_value` to its annotation's type.

    Without an annotation the type of a plain default (bool, int, float, str) is used; an option with
    neither takes any value.
    """
    if annotation is None:
        if not isinstance(default, _PLAIN):
            return value
        annotation = type(default)
    return coerce_value(value, annotation, f"{where} option {key!r}")


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
    if _open_ended(factory):
        return dict(options)
    valid = option_parameters(factory, skip)
    unknown = [k for k in options if k not in valid]
    if unknown:
        shown = ", ".join(f"{k}={p.default!r}" if p.default is not _EMPTY else k for k, p in valid.items())
        raise unknown_options_error(where, unknown, list(valid), shown)
    missing = [k for k, p in valid.items() if p.default is _EMPTY and k not in options]
    if missing and complete:
        how = example.format(key=missing[0]) if example else f"{missing[0]}=..."
        raise TypeError(f"{where} needs option(s) {missing}, e.g. {how}.")
    hints = _hints(factory)
    return {k: coerce_option(where, k, v, valid[k].default, hints.get(k)) for k, v in options.items()}


@dataclasses.dataclass(frozen=True)
class Alias:
    """A name that builds another registered item with some options as its defaults."""

    target: str
    note: str
    options: dict[str, Any]


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
        self._owners: dict[str, str] = {}
        self._aliases: dict[str, Alias] = {}

    def register(self, name: str, item: T, *, overwrite: bool = False) -> T:
        """Register ``item`` under ``name`` (refuses a taken name unless ``overwrite``).

        Raises:
            PluginClashError: a plugin being loaded registers a taken name (``overwrite`` or not).
            ValueError: the name is taken and ``overwrite`` is false.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} name must be a non-empty string, got {name!r}.")
        if self.base is not None and not (isinstance(item, type) and issubclass(item, self.base)):
            raise TypeError(f"register_{self.kind} expects a {self.base.__name__} subclass, found {item!r}.")
        if self.base is None and not callable(item):
            raise TypeError(f"register_{self.kind} expects a class or function, found {item!r}.")
        plugin = PLUGINS.describe_current()
        owner = plugin or f"the module {getattr(getattr(item, 'func', item), '__module__', '?')}"
        if name in self._items and plugin is not None:
            raise PluginClashError(
                f"{plugin.capitalize()} registers the {self.kind} {name!r}, which {self._owners[name]} already "
                "registers: one name cannot mean two things. Uninstall one of the two packages, or ask the "
                "plugin's authors to rename theirs."
            )
        if name in self._items and not overwrite:
            raise ValueError(
                f"A {self.kind} named {name!r} is already registered (by {self._owners[name]}). Pick another "
                "name or pass overwrite=True."
            )
        if self.base is not None:
            item.name = name  # type: ignore[attr-defined]
        self._items[name] = item
        self._owners[name] = owner
        return item

    def decorator(self, name: str, *, overwrite: bool = False) -> Callable[[T], T]:
        """A decorator registering the decorated class or function under ``name``."""

        def add(item: T) -> T:
            return self.register(name, item, overwrite=overwrite)

        return add

    def alias(self, name: str, target: str, note: str, **options: Any) -> None:
        """Let ``name`` build ``target`` with ``options`` as its defaults (an earlier name, or a known
        setting under a name of its own); ``note`` says what it is, for listings."""
        if name in self._items or name in self._aliases:
            raise ValueError(
                f"A {self.kind} named {name!r} is already registered; an alias needs a free name."
            )
        self._aliases[name] = Alias(target, note, options)

    def aliases(self) -> dict[str, Alias]:
        """The aliases: ``{name: Alias(target, note, options)}``."""
        return dict(self._aliases)

    def get(self, name: str) -> T:
        """Return the item registered as ``name`` (or that alias ``name`` builds) or raise a helpful
        ``ValueError``."""
        PLUGINS.load()
        name = self._aliases[name].target if name in self._aliases else name
        if name not in self._items:
            raise unknown_name_error(self.kind, str(name), [*self._items, *self._aliases])
        return self._items[name]

    def options(self, name: str) -> dict[str, Any]:
        """The options of ``name`` and their defaults (``inspect.Parameter.empty`` when required)."""
        found = {k: p.default for k, p in option_parameters(self.get(name), self.skip).items()}
        return {**found, **self._aliases[name].options} if name in self._aliases else found

    def check(self, name: str, options: Mapping[str, Any], *, complete: bool = True) -> dict[str, Any]:
        """Validate and coerce ``options`` for ``name`` without building anything.

        ``complete=False`` checks only the options given (a preset may leave a required one, such as a
        data folder, to the command line; building it then names what is missing).
        """
        factory = self.get(name)
        example = self.example.format(name=name, key="{key}") if self.example else ""
        if name in self._aliases:
            options = {**self._aliases[name].options, **options}
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
        """Registered names (plugins' included), sorted."""
        PLUGINS.load()
        return sorted(self._items)

    def owner(self, name: str) -> str:
        """Who registered ``name``: ``the module equimodal.balancers.amss``, ``plugin 'x' (pkg.mod)``."""
        self.get(name)
        return self._owners[name]

    def __contains__(self, name: object) -> bool:
        PLUGINS.load()
        return name in self._items or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
