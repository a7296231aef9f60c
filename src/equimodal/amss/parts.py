"""AMSS's options as parts: small frozen objects passed to the balancer, as a loss takes a distance and
a reducer in pytorch-metric-learning.

Four parts cover the four concerns of AMSS (Yang et al., TPAMI 2025), each checked when built (an error
names the option, what was expected and what was found):

- :class:`RatioRule` (``ratio=``): how the update ratios ``k_m`` follow from the significance;
- :class:`Significance` (``significance=``): how each modality's significance is measured;
- :class:`Sampler` (``sampler=``): how units are scored, sampled and reweighted;
- :class:`~equimodal.amss.units.UnitSelection` (``units=``): which units are masked.

::

    AMSS(model, ratio=RatioRule(temperature=0.5), sampler=Sampler("topk"),
         units=UnitSelection(conv_units="input_channels"))

Every field is also a flat option of the balancer (``temperature=0.5``, ``--set
balancer.options.temperature=0.5`` in a config): :data:`FLAT_OPTIONS` is the one mapping from flat names
to part fields, and :func:`resolve_parts` builds the parts from flat options, parts and a preset. A flat
option and a part that sets the same thing is an error naming both. The three flat options named like a
part take a plain value in its place: ``ratio=0.3`` is ``RatioRule(fixed=0.3)``, ``sampler="topk"`` is
``Sampler("topk")`` and ``significance="speed"`` is ``Significance("speed")``.

A preset (:data:`PRESETS`) switches on, in one place, what only reproduces the official code (its bugs
and quirks, ``docs/amss.md``); an explicit flat option overrides a preset's switch.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any, Literal

from ..registry import unknown_options_error
from .ratios import RatioForm, check_fixed_ratio, check_ratio_options
from .sampling import (
    INCLUSION_MODES,
    REWEIGHT_MODES,
    ROUNDINGS,
    SAMPLERS,
    SCORE_MODES,
    InclusionMode,
    ReweightMode,
    Rounding,
    SamplerName,
    ScoreMode,
)
from .significance import (
    FEATURE_ENTROPY_MODES,
    LABEL_ENTROPY_MODES,
    FeatureEntropyMode,
    LabelEntropyMode,
    check_choice,
)
from .units import UnitSelection

SignificanceKind = Literal["confidence", "speed"]
SIGNIFICANCE_KINDS: tuple[str, ...] = ("confidence", "speed")
Preset = Literal["official_code", "official_av", "official_it", "official_nv"]


@dataclass(frozen=True)
class RatioRule:
    """How the update ratios ``k_m`` follow from the significance (:func:`~equimodal.amss.ratios.update_ratios`).

    Attributes:
        temperature: softmax temperature ``T > 0`` (0.2 audio-visual / three-modality, 0.5 text-image).
        form: ``"one_minus_softmax"`` (default), ``"softmax_neg"`` or ``"softmax_own"`` (bug B1).
        bias: ``beta`` added to the ratios before clamping.
        k_min: lower bound of the ratios, in (0, 1].
        k_max: upper bound of the ratios, in (0, 1].
        fixed: a fixed update ratio ``k`` in (0, 1] for every modality at every step instead of the
            significance-based ratios (the paper's fixed-ratio ablation); ``None``: adaptive ratios. The
            other fields then do not act; the significance is still computed and logged.
        fallback: the ratio used when the fallback fires or a ratio is not finite (a float, or one per
            modality).
        momentum: EMA momentum of ``rho`` across steps, in [0, 1) (0: per step, as the code).
        stable_softmax: a stable softmax (default) or the code's raw ``exp``.
    """

    temperature: float = 0.2
    form: RatioForm = "one_minus_softmax"
    bias: float = 0.0
    k_min: float = 0.1
    k_max: float = 0.9
    fixed: float | None = None
    fallback: float | Mapping[str, float] = 0.5
    momentum: float = 0.0
    stable_softmax: bool = True

    def __post_init__(self) -> None:
        values = self.fallback.values() if isinstance(self.fallback, Mapping) else [self.fallback]
        for value in values:
            check_ratio_options(self.temperature, self.k_min, self.k_max, float(value), self.form)
        object.__setattr__(self, "fixed", check_fixed_ratio(self.fixed))
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(
                f"rho_momentum (RatioRule.momentum) must lie in [0, 1), found {self.momentum!r} (0 disables "
                "the EMA)."
            )

    def fallback_ratios(self, modalities: Sequence[str]) -> list[float]:
        """The fallback ratio of each of ``modalities``.

        Raises:
            ValueError: a per-modality fallback that does not map exactly ``modalities``.
        """
        fb = self.fallback
        if not isinstance(fb, Mapping):
            return [float(fb)] * len(modalities)
        if set(fb) != set(modalities):
            raise ValueError(
                f"fallback_ratio must map every modality {list(modalities)}, found keys {sorted(fb)}."
            )
        return [float(fb[m]) for m in modalities]


@dataclass(frozen=True)
class Significance:
    """How each modality's significance is measured (:func:`~equimodal.amss.significance.significance_from_sums`).

    Attributes:
        kind: ``"confidence"`` (the paper's mutual-information rate of each modality's unimodal logits)
            or ``"speed"`` (equimodal's: how fast each modality's own head's loss is falling, relative;
            the faster learner counts as dominant); ``"speed"`` uses heads of AMSS's own.
        label_entropy: ``"exact"`` (nats, default), ``"exact_bits"`` or ``"av_code"`` (the AV quirk).
        feature_entropy: ``"mean"`` (default), ``"nv_code"`` or ``"none"``.
        offset: offset ``c`` of ``rho_m = (I_m + c) / H_m``.
        fallback_offset: threshold offset of the fallback test ``any(I_m + offset' <= 0)``; ``None``:
            ``offset``.
        head_weight: weight of a unimodal loss per encoder through a linear head of AMSS's own on its
            features (0: none, the paper's AMSS).
        feature_dims: feature size per modality for the own heads, for encoders without ``out_dim``.
        num_classes: number of classes for the own heads, for models without ``num_classes``.
    """

    kind: SignificanceKind = "confidence"
    label_entropy: LabelEntropyMode = "exact"
    feature_entropy: FeatureEntropyMode = "mean"
    offset: float = 0.5
    fallback_offset: float | None = None
    head_weight: float = 0.0
    feature_dims: Mapping[str, int] | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SIGNIFICANCE_KINDS:
            raise ValueError(f"significance must be 'confidence' or 'speed', found {self.kind!r}.")
        check_choice("label_entropy", self.label_entropy, LABEL_ENTROPY_MODES)
        check_choice("feature_entropy", self.feature_entropy, FEATURE_ENTROPY_MODES)
        if not (math.isfinite(self.head_weight) and self.head_weight >= 0):
            raise ValueError(
                f"head_weight must be a finite number >= 0, found {self.head_weight!r} (0: no own heads)."
            )

    @property
    def own_heads(self) -> bool:
        """Whether AMSS trains unimodal heads of its own (``head_weight > 0`` or ``kind="speed"``)."""
        return self.head_weight > 0 or self.kind == "speed"


@dataclass(frozen=True)
class Sampler:
    """How units are scored, sampled and reweighted (:class:`~equimodal.amss.masker.GradientMasker`).

    Attributes:
        name: ``"adaptive"``, ``"topk"``, ``"uniform"``, ``"bernoulli"`` or ``"poisson"``; ``None``: the
            balancer's default (``"uniform"`` for ``uniform_mask``, else ``"adaptive"``).
        score: unit score ``"gn"`` (default), ``"gn_wn"`` or ``"sqrt_gn"``.
        rounding: ``"ceil"`` (default) or ``"floor"`` for the kept count.
        reweight: ``"none"``, ``"inverse_inclusion"`` or ``"code"`` (official, unstable); ``None``: the
            balancer's default (``"inverse_inclusion"`` for ``amss_plus``, else ``"none"``).
        inclusion: the adaptive sampler's inclusion probability, ``"conditional"`` (exact) or
            ``"first_order"``.
        max_weight: cap of the inverse-inclusion weights, >= 1 (``None``: uncapped); 10 by default.
        score_floor: defensive floor added to every unit's score, as a fraction of its group's mean score;
            ``None``: the balancer's default (0: no floor). ``score_floor=0.1, max_weight=100`` makes
            AMSS+'s masked gradient unbiased to 2 % at every ratio, at about twice the gradient error
            at the ratio floor (docs/amss.md, "AMSS+: which weights").
        code_bias: ``b`` of the official weight ``1 / (q + 1/N + b)``, >= 0.
        code_block_norm: normalise the official weight's ``q`` over a whole fusion block (text-image code).
    """

    name: SamplerName | None = None
    score: ScoreMode = "gn"
    rounding: Rounding = "ceil"
    reweight: ReweightMode | None = None
    inclusion: InclusionMode = "conditional"
    max_weight: float | None = 10.0
    score_floor: float | None = None
    code_bias: float = 0.0
    code_block_norm: bool = False

    def __post_init__(self) -> None:
        for option, value, valid in (
            ("sampler", self.name, (*SAMPLERS, None)),
            ("score", self.score, SCORE_MODES),
            ("rounding", self.rounding, ROUNDINGS),
            ("reweight", self.reweight, (*REWEIGHT_MODES, None)),
            ("inclusion", self.inclusion, INCLUSION_MODES),
        ):
            check_choice(option, value, valid)
        if self.max_weight is not None and not self.max_weight >= 1.0:
            raise ValueError(
                f"max_weight must be >= 1 or None (no cap), found {self.max_weight!r}; 10 is the default."
            )
        floor = self.score_floor
        if floor is not None and not (math.isfinite(floor) and floor >= 0):
            raise ValueError(f"score_floor must be a finite number >= 0, found {floor!r} (0: no floor).")
        if self.code_bias < 0:
            raise ValueError(
                f"code_bias must be >= 0, found {self.code_bias!r} (0 audio-visual, 0.2 text-image)."
            )

    def resolved(self, name: SamplerName, reweight: ReweightMode, score_floor: float) -> Sampler:
        """This sampler with its ``None`` fields filled in from a balancer's defaults (``score_floor``
        applies with ``reweight="inverse_inclusion"`` only; otherwise the floor is 0)."""
        reweight = self.reweight or reweight
        floor = self.score_floor
        if floor is None:
            floor = score_floor if reweight == "inverse_inclusion" else 0.0
        return replace(self, name=self.name or name, reweight=reweight, score_floor=float(floor))


@dataclass(frozen=True)
class AMSSParts:
    """The four parts of an AMSS balancer, as :func:`resolve_parts` builds them."""

    ratio: RatioRule
    significance: Significance
    sampler: Sampler
    units: UnitSelection


PARTS: Mapping[str, type] = MappingProxyType(
    {"ratio": RatioRule, "significance": Significance, "sampler": Sampler, "units": UnitSelection}
)
"""The balancer's part arguments and their classes."""

FLAT_OPTIONS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "temperature": ("ratio", "temperature"),
        "ratio_form": ("ratio", "form"),
        "ratio_bias": ("ratio", "bias"),
        "k_min": ("ratio", "k_min"),
        "k_max": ("ratio", "k_max"),
        "ratio": ("ratio", "fixed"),
        "fallback_ratio": ("ratio", "fallback"),
        "rho_momentum": ("ratio", "momentum"),
        "stable_softmax": ("ratio", "stable_softmax"),
        "significance": ("significance", "kind"),
        "label_entropy": ("significance", "label_entropy"),
        "feature_entropy": ("significance", "feature_entropy"),
        "offset": ("significance", "offset"),
        "fallback_offset": ("significance", "fallback_offset"),
        "head_weight": ("significance", "head_weight"),
        "feature_dims": ("significance", "feature_dims"),
        "num_classes": ("significance", "num_classes"),
        "sampler": ("sampler", "name"),
        "score": ("sampler", "score"),
        "rounding": ("sampler", "rounding"),
        "reweight": ("sampler", "reweight"),
        "inclusion": ("sampler", "inclusion"),
        "max_weight": ("sampler", "max_weight"),
        "score_floor": ("sampler", "score_floor"),
        "code_bias": ("sampler", "code_bias"),
        "code_block_norm": ("sampler", "code_block_norm"),
        **{name: ("units", name) for name in (f.name for f in fields(UnitSelection))},
    }
)
"""Flat option name -> ``(part, field)``: ``temperature`` is ``RatioRule.temperature``, ``ratio_form`` is
``RatioRule.form``, ``ratio`` is ``RatioRule.fixed``, ``sampler`` is ``Sampler.name``, ... (the table in
``docs/amss.md``)."""

_COMMON: Mapping[str, Any] = MappingProxyType(
    {"stable_softmax": False, "linear_rows": "auto", "reweight": "code"}
)
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        # what every official script does: the raw exp softmax (spec 17), no plain Linear rows next to
        # conv / attention units (B16), and AMSS+'s weights 1 / (q + 1/N + b) (spec 6)
        "official_code": _COMMON,
        # + the audio-visual script (AMSS/train_test.py): its label-entropy proxy (B6), fusion-head masks
        # never applied (B2)
        "official_av": MappingProxyType({**_COMMON, "label_entropy": "av_code", "mask_fusion": False}),
        # + the text-image script (AMSS_IT): each modality's own softmax weight (B1), entropies in bits and
        # no feature-entropy denominator (B6), the fusion-head weight normalised over its block (spec 17)
        "official_it": MappingProxyType(
            {
                **_COMMON,
                "ratio_form": "softmax_own",
                "label_entropy": "exact_bits",
                "feature_entropy": "none",
                "code_block_norm": True,
            }
        ),
        # + the three-modality script (AMSS_rod): entropies in bits, the feature entropy over 40 (B6), the
        # backbone masking loop dead (B3), so only the fusion head is masked, its count floored (B7)
        "official_nv": MappingProxyType(
            {
                **_COMMON,
                "label_entropy": "exact_bits",
                "feature_entropy": "nv_code",
                "mask_encoders": False,
                "rounding": "floor",
            }
        ),
    }
)
"""Preset name -> the flat options it sets. ``reweight="code"`` applies to a balancer that reweights
(``amss_plus``) only: the official AMSS does not reweight. The official scripts' hyperparameters
(temperature, offsets, ``code_bias``) are not switches: the configs ``amss_av``, ``amss_it`` and
``amss_nv`` set them."""


def preset_options(preset: str | None, *, reweights: bool) -> dict[str, Any]:
    """The flat options ``preset`` sets for a balancer that reweights its kept units or not.

    Raises:
        ValueError: an unknown preset.
    """
    if preset is None:
        return {}
    check_choice("preset", preset, tuple(PRESETS))
    options = dict(PRESETS[preset])
    if not reweights:
        del options["reweight"]
    return options


def _split(options: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` as the part objects given (by part name) and the flat options given (by flat name)."""
    unknown = [k for k in options if k not in FLAT_OPTIONS and k not in PARTS]
    if unknown:
        raise unknown_options_error(where, unknown, [*PARTS, *(k for k in FLAT_OPTIONS if k not in PARTS)])
    parts, flat = {}, {}
    for key, value in options.items():
        if key in PARTS and isinstance(value, PARTS[key]):
            parts[key] = value
        elif key in FLAT_OPTIONS:
            if not (key in PARTS and value is None):  # ratio=None, sampler=None: not given
                flat[key] = value
        elif value is not None:
            raise TypeError(f"{where}: {key} must be a {PARTS[key].__name__} or None, found {value!r}.")
    return parts, flat


def _given_part(part: str, obj: Any, flat: Mapping[str, Any], switches: Mapping[str, Any], where: str) -> Any:
    """A part object given as is: refused with a flat option of its own, or against a preset's switch."""
    cls = type(obj).__name__
    if flat:
        name, value = next(iter(flat.items()))
        field = FLAT_OPTIONS[name][1]
        raise ValueError(
            f"{where}: the flat option {name}={value!r} and the part {part}={cls}(...) both set {cls}.{field}. "
            f"Set it in one place: {cls}(..., {field}={value!r}), or the flat option without the part."
        )
    for name, value in switches.items():
        field = FLAT_OPTIONS[name][1]
        if getattr(obj, field) != value:
            raise ValueError(
                f"{where}: the preset sets {name}={value!r}, but the part {part}={cls}(...) has {field}="
                f"{getattr(obj, field)!r}. Build the part with {field}={value!r}, or leave the part out and "
                f"pass {name}={getattr(obj, field)!r} as a flat option, which overrides the preset."
            )
    return obj


def resolve_parts(
    options: Mapping[str, Any], *, preset: str | None = None, reweights: bool = False, where: str = "AMSS"
) -> AMSSParts:
    """Build AMSS's four parts from the options given: part objects, flat options and a preset.

    A part missing from ``options`` is built from its flat options over the preset's switches (a flat
    option wins over the preset); a part given is used as it is.

    Args:
        options: part objects under their part names (``ratio``, ``significance``, ``sampler``,
            ``units``) and flat options (:data:`FLAT_OPTIONS`); ``ratio``, ``sampler`` and
            ``significance`` given as plain values are the flat options of those names.
        preset: a preset of :data:`PRESETS`, or ``None``.
        reweights: whether the balancer reweights its kept units (then the preset's ``reweight`` acts).
        where: how messages name the balancer.

    Raises:
        TypeError: an unknown option (with close matches).
        ValueError: a flat option together with the part it belongs to, a part that contradicts the
            preset, an unknown preset, or a value a part refuses.
    """
    given, flat = _split(options, where)
    switches = preset_options(preset, reweights=reweights)
    built: dict[str, Any] = {}
    for part, cls in PARTS.items():
        own = {k: v for k, v in flat.items() if FLAT_OPTIONS[k][0] == part}
        preset_own = {k: v for k, v in switches.items() if FLAT_OPTIONS[k][0] == part and k not in own}
        if part in given:
            built[part] = _given_part(part, given[part], own, preset_own, where)
        else:
            built[part] = cls(**{FLAT_OPTIONS[k][1]: v for k, v in {**preset_own, **own}.items()})
    return AMSSParts(**built)


def options_signature(init: Callable[..., Any]) -> inspect.Signature:
    """The signature of ``init`` (a constructor taking ``**options``) with every flat option of
    :data:`FLAT_OPTIONS` in place of ``**options``: its part field's type and default.

    Set as ``init.__signature__``, it is what ``inspect.signature``, ``help`` and the registry's option
    checks (names, close matches, type coercion) see.
    """
    hints = typing.get_type_hints(init)
    params = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(init).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    taken = {p.name for p in params}
    part_fields = {part: {f.name: f for f in fields(cls)} for part, cls in PARTS.items()}
    part_hints = {part: typing.get_type_hints(cls) for part, cls in PARTS.items()}
    for name, (part, field) in FLAT_OPTIONS.items():
        if name not in taken:
            default = part_fields[part][field].default
            kind = inspect.Parameter.KEYWORD_ONLY
            params.append(inspect.Parameter(name, kind, default=default, annotation=part_hints[part][field]))
    return inspect.Signature(params)
