"""Which units AMSS masks: the unit-selection part (:class:`UnitSelection`) and its checks.

One frozen object holds the eight options that decide what is masked; the balancer, the unit discovery
(:func:`~equimodal.amss.units.discover_units`, :func:`~equimodal.amss.units.scan_units`,
:func:`~equimodal.amss.units.encoder_units`) and the report (:func:`~equimodal.amss.explain.describe_units`) all
take it, so what a report shows is what the balancer masks. It checks itself when built: each error
names the option, what was expected and what was found.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, Union

from torch import nn

from ...registry import name_list, unknown_options_error

HeadLayout = Literal["rows", "cols"]
ModuleSelector = Union[Callable[[str, nn.Module], bool], Collection[nn.Module]]  # noqa: UP007
HeadDeclarations = Mapping[nn.Module, tuple[int, str]]
"""``{linear: (num_heads, "rows" | "cols")}``: Linear layers declared as attention-head projections."""
LinearRows = Literal[True, False, "auto"]
"""``True``: every Linear's rows (default); ``False``: none; ``"auto"``: only in encoders without
conv, attention or RNN units (the previous default, code-faithful for ResNet/BERT encoders)."""
MaskFusion = Literal[True, False, "concat", "all"]
"""``True`` / ``"concat"``: column blocks of a shared (concat) head; ``"all"``: also own per-modality
heads (sum, weighted); ``False``: no fusion head."""
ConvUnits = Literal["filters", "input_channels", "weights"]
"""What one unit of a conv weight is: an output filter (default), an input channel, or a single weight."""
LayerKind = Literal["conv", "attention", "linear", "rnn"]
LayerKinds = Union[str, Collection[str], None]  # noqa: UP007
"""``None`` (every kind), one kind, a comma-separated string of kinds, or a collection of kinds."""
CONV_UNITS: tuple[str, ...] = ("filters", "input_channels", "weights")
LAYER_KINDS: tuple[str, ...] = ("conv", "attention", "linear", "rnn")
LINEAR_ROWS: tuple[object, ...] = (True, False, "auto")
MASK_FUSION: tuple[object, ...] = (True, False, "concat", "all")


def check_conv_units(conv_units: object) -> str:
    """Return ``conv_units`` if it is one of :data:`CONV_UNITS`, else raise a ``ValueError``."""
    if not isinstance(conv_units, str) or conv_units not in CONV_UNITS:
        raise ValueError(
            f"conv_units must be one of {', '.join(map(repr, CONV_UNITS))}, found {conv_units!r}: 'filters' "
            "(an output filter per unit, the official code), 'input_channels' (the weights reading one input "
            "channel) or 'weights' (single weights, sampled per output filter)."
        )
    return conv_units


def check_layer_kinds(layer_kinds: LayerKinds) -> tuple[str, ...]:
    """The layer kinds selected by ``layer_kinds`` (``None``: all of :data:`LAYER_KINDS`), in that order.

    Accepts one kind (``"attention"``), a comma-separated string (``"conv,linear"``, as a command line
    gives it) or a collection of kinds.

    Raises:
        ValueError: an unknown kind, or no kind at all.
    """
    if layer_kinds is None:
        return LAYER_KINDS
    given = name_list(layer_kinds)
    if given is None:
        raise ValueError(
            f"layer_kinds must be None (every kind) or a collection of {', '.join(map(repr, LAYER_KINDS))}, "
            f"found {layer_kinds!r}."
        )
    unknown = [k for k in given if k not in LAYER_KINDS]
    if unknown:
        raise ValueError(
            f"layer_kinds: unknown layer kind(s) {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(map(repr, LAYER_KINDS))} (FFN neurons and other Linear rows are 'linear', q/k/v/output "
            "projections are 'attention')."
        )
    if not given:
        raise ValueError(
            f"layer_kinds must name at least one of {', '.join(map(repr, LAYER_KINDS))}, found {layer_kinds!r} "
            "(None masks every kind; to mask only the fusion head pass mask_encoders=False)."
        )
    return tuple(k for k in LAYER_KINDS if k in given)


def check_mask_fusion(mask_fusion: object) -> None:
    """Raise a ``ValueError`` unless ``mask_fusion`` is one of :data:`MASK_FUSION`."""
    if mask_fusion not in MASK_FUSION or not isinstance(mask_fusion, (bool, str)):
        raise ValueError(f"mask_fusion must be True, False, 'concat' or 'all', found {mask_fusion!r}.")


def as_selector(sel: ModuleSelector | None, what: str) -> Callable[[str, nn.Module], bool] | None:
    """``include`` / ``exclude`` as a callable ``(name, module) -> bool`` (``None`` stays ``None``).

    Raises:
        TypeError: ``sel`` is neither a callable nor a module or a collection of modules.
    """
    if sel is None:
        return None
    if callable(sel) and not isinstance(sel, nn.Module):
        return sel
    if isinstance(sel, nn.Module):
        ids = {id(sel)}
    elif isinstance(sel, Collection) and all(isinstance(x, nn.Module) for x in sel):
        ids = {id(x) for x in sel}
    else:
        raise TypeError(
            f"{what} must be a callable (name, module) -> bool or a collection of nn.Module objects, "
            f"found {type(sel).__name__}."
        )
    return lambda _name, module: id(module) in ids


def check_head_declaration(spec: object) -> tuple[int, str]:
    """A head declaration ``(num_heads, "rows" | "cols")`` as a checked tuple.

    Raises:
        ValueError: anything else.
    """
    if not (
        isinstance(spec, Sequence)
        and len(spec) == 2
        and isinstance(spec[0], int)
        and spec[1] in ("rows", "cols")
    ):
        raise ValueError(
            f"A head declaration must be (num_heads: int, 'rows' | 'cols'), found {spec!r}. Use 'rows' for "
            "query/key/value projections and 'cols' for the output projection."
        )
    return int(spec[0]), str(spec[1])


def head_spec(module: nn.Module, heads: HeadDeclarations | None) -> tuple[int, str] | None:
    """The head declaration of ``module``: from ``heads``, else its ``amss_heads`` attribute, else ``None``."""
    spec = next((value for key, value in (heads or {}).items() if key is module), None)
    if spec is None:
        spec = getattr(module, "amss_heads", None)
    return None if spec is None else check_head_declaration(spec)


@dataclass(frozen=True)
class UnitSelection:
    """What AMSS masks: the unit-selection part of the balancer (see :mod:`equimodal.amss.units`).

    Attributes:
        mask_encoders: mask the encoders' units (``False`` reproduces the three-modality code, bug B3).
        mask_fusion: the fusion head's blocks: ``True``/``"concat"`` (default) the column blocks of a head
            the modalities share (concat, the official text-image code); ``"all"`` also the per-modality
            heads of sum/weighted/channel fusion; ``False`` none (the audio-visual code, bug B2).
        linear_rows: plain ``Linear`` output rows: ``True`` (default: every Linear of an encoder),
            ``False`` (none) or ``"auto"`` (the official rule: only in encoders without conv, attention or
            RNN units). Ignored when ``include`` is given.
        conv_units: the unit of a conv weight: ``"filters"`` (default, the official code: an output
            filter), ``"input_channels"`` (every weight reading one input channel) or ``"weights"`` (every
            single weight, one sampling group per output filter).
        layer_kinds: the kinds of layers whose units are masked, any of ``"conv"``, ``"attention"``,
            ``"linear"`` and ``"rnn"``, as a collection or a comma-separated string; ``None`` (default):
            all. Kept as the tuple of the kinds selected, in that order. Applies after ``include`` /
            ``exclude`` and ``linear_rows``; never to the fusion head (``mask_fusion`` alone decides that).
        include: a callable ``(name, module) -> bool`` or modules; replaces the default choice: every
            module of a maskable type that it accepts is masked.
        exclude: a callable or modules never masked (with their submodules), besides ``amss_skip``.
        heads: ``{linear: (num_heads, "rows" | "cols")}`` for separate q/k/v/o projections.

    Raises:
        ValueError: a value outside its choices (the message names the option and the choices).
        TypeError: ``include`` / ``exclude`` is neither a callable nor modules.
    """

    mask_encoders: bool = True
    mask_fusion: MaskFusion = True
    linear_rows: LinearRows = True
    conv_units: ConvUnits = "filters"
    layer_kinds: LayerKinds = None
    include: ModuleSelector | None = None
    exclude: ModuleSelector | None = None
    heads: HeadDeclarations | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.mask_encoders, bool):
            raise ValueError(f"mask_encoders must be True or False, found {self.mask_encoders!r}.")
        check_mask_fusion(self.mask_fusion)
        if self.linear_rows not in LINEAR_ROWS or not isinstance(self.linear_rows, (bool, str)):
            raise ValueError(f"linear_rows must be True, False or 'auto', found {self.linear_rows!r}.")
        check_conv_units(self.conv_units)
        object.__setattr__(self, "layer_kinds", check_layer_kinds(self.layer_kinds))
        as_selector(self.include, "include")
        as_selector(self.exclude, "exclude")
        if self.heads is not None and not isinstance(self.heads, Mapping):
            raise TypeError(
                f"heads must map Linear modules to (num_heads, 'rows' | 'cols'), found {type(self.heads).__name__}."
            )
        for spec in (self.heads or {}).values():
            check_head_declaration(spec)

    def summary(self) -> dict[str, Any]:
        """The options a report shows: ``linear_rows``, ``mask_encoders``, ``mask_fusion``, and
        ``conv_units`` / ``layer_kinds`` when they differ from their defaults."""
        shown: dict[str, Any] = {
            "linear_rows": self.linear_rows,
            "mask_encoders": self.mask_encoders,
            "mask_fusion": self.mask_fusion,
        }
        if self.conv_units != "filters":
            shown["conv_units"] = self.conv_units
        if self.layer_kinds != LAYER_KINDS:
            shown["layer_kinds"] = self.layer_kinds
        return shown


UNIT_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(UnitSelection))
"""The names of the unit-selection options (the fields of :class:`UnitSelection`)."""


def unit_selection(selection: UnitSelection | None = None, **options: Any) -> UnitSelection:
    """``selection``, or one built from keyword shortcuts (``conv_units="weights"``, ...); not both.

    Raises:
        TypeError: both were given, or an unknown option name (with close matches).
    """
    unknown = [k for k in options if k not in UNIT_OPTIONS]
    if unknown:
        raise unknown_options_error("UnitSelection", unknown, list(UNIT_OPTIONS))
    if selection is None:
        return UnitSelection(**options)
    if not isinstance(selection, UnitSelection):
        raise TypeError(f"Expected a UnitSelection, found {type(selection).__name__}.")
    if options:
        raise TypeError(
            f"Pass the unit selection once: a UnitSelection or keyword options, found both ({selection!r} "
            f"and {', '.join(options)}). Put them in the UnitSelection: UnitSelection(..., "
            f"{', '.join(f'{k}=...' for k in options)})."
        )
    return selection
