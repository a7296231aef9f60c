"""The encoder scan: one encoder's AMSS units, found by module type, and why other modules were left out.

A pre-order walk prunes ``amss_skip`` / excluded subtrees and stops at layers with units (attention,
RNNs); each visited module gives its units and their layer kind, then the selection
(:class:`~equimodal.amss.units.UnitSelection`: ``include``, ``linear_rows``, ``layer_kinds``) keeps some
and records why the others were declined, and a Parameter reached twice is masked once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from .attention import AttentionSpec, attention_spec, is_attention, sibling_outputs
from .layers import heads_of_linear, mha_units, rnn_units
from .selection import HeadDeclarations, UnitSelection, as_selector, head_spec, unit_selection
from .tensor import UnitTensor
from .weights import conv_unit, join, make_unit

Selector = Callable[[str, nn.Module], bool]


@dataclass
class EncoderScan:
    """What :func:`scan_encoder` found in one encoder, and why other modules were left out.

    Attributes:
        units: the masked tensors, in module order (tied duplicates removed).
        pruned: qualified module name -> reason, for subtrees never visited (``amss_skip``, ``exclude``).
        declined: qualified module name -> reason, for visited layers left unmasked (``include``,
            ``linear_rows``).
        tied: label of a dropped unit -> label of the unit that masks the same Parameter.
    """

    units: list[UnitTensor] = field(default_factory=list)
    pruned: dict[str, str] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)


def _pruned(module: nn.Module, name: str, exclude: Selector | None) -> str | None:
    if getattr(module, "amss_skip", False):
        return "skipped: amss_skip"
    if exclude is not None and exclude(name, module):
        return "skipped: exclude"
    return None


def _walk(
    module: nn.Module,
    prefix: str,
    exclude: Selector | None,
    scan: EncoderScan,
    seen: set[int],
) -> Iterator[tuple[str, nn.Module]]:
    """Pre-order walk (each module once) that prunes ``amss_skip``/excluded subtrees and stops at layers.

    It does not enter attention modules, RNNs or the ``parametrizations`` holder of a reparametrized
    module.
    """
    if id(module) in seen:
        return
    reason = _pruned(module, prefix, exclude)
    if reason is not None:
        scan.pruned[prefix] = reason
        return
    seen.add(id(module))  # after the pruning test: a module also reachable outside a pruned subtree counts
    yield prefix, module
    if is_attention(module) or isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return
    for child_name, child in module.named_children():
        if child_name == "parametrizations" and parametrize.is_parametrized(module):
            continue
        yield from _walk(child, join(prefix, child_name), exclude, scan, seen)


def _attention_units(
    name: str,
    spec: AttentionSpec,
    modality: str,
    heads: HeadDeclarations | None,
    exclude: Selector | None,
    scan: EncoderScan,
) -> list[UnitTensor]:
    """Head rows of q, k and v (each its own group) and head columns of a held output projection."""
    parts = [(n, lin, "head_rows") for n, lin in spec.qkv]
    parts += [(spec.out[0], spec.out[1], "head_cols")] if spec.out is not None else []
    out: list[UnitTensor] = []
    for child_name, linear, kind in parts:
        full = join(name, child_name)
        reason = _pruned(linear, full, exclude)
        if reason is not None:
            scan.pruned[full] = reason
            continue
        declared = head_spec(linear, heads)
        if declared is not None:
            unit = heads_of_linear(full, linear, declared[0], declared[1], modality)
        else:
            width = linear.out_features if kind == "head_rows" else linear.in_features
            unit = make_unit(full, linear, "weight", modality, kind, width // spec.head_size)  # type: ignore[arg-type]
        out += [unit] if unit is not None else []
    return out


def _module_units(
    name: str,
    module: nn.Module,
    modality: str,
    sel: UnitSelection,
    exclude: Selector | None,
    outputs: dict[int, int],
    scan: EncoderScan,
) -> tuple[list[UnitTensor], str]:
    """The units of one visited module and their layer kind (``"conv"``, ``"attention"``, ``"linear"``,
    ``"rnn"``; ``""``: no unit).

    Plain Linear rows are kind ``"linear"`` (``linear_rows`` applies to them); Linear layers declared or
    found as head projections (BERT's sibling ``output.dense``) are ``"attention"``.
    """
    head = head_spec(module, sel.heads)
    if head is not None:
        unit = heads_of_linear(name, module, head[0], head[1], modality)
        return ([unit] if unit is not None else []), "attention"
    if isinstance(module, nn.MultiheadAttention):
        return mha_units(name, module, modality), "attention"
    spec = attention_spec(module)
    if spec is not None:
        return _attention_units(name, spec, modality, sel.heads, exclude, scan), "attention"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return rnn_units(name, module, modality), "rnn"
    unit, layer = None, ""
    if isinstance(module, nn.Linear) and id(module) in outputs:
        width = module.in_features // outputs[id(module)]
        unit, layer = make_unit(name, module, "weight", modality, "head_cols", width), "attention"
    elif isinstance(module, _ConvNd) and not module.transposed:
        unit, layer = conv_unit(name, module, modality, sel.conv_units), "conv"
    elif isinstance(module, nn.Linear):
        unit, layer = make_unit(name, module, "weight", modality, "rows", module.out_features), "linear"
    return ([unit] if unit is not None else []), layer


def _untie(units: list[UnitTensor], tied: dict[str, str]) -> list[UnitTensor]:
    """Keep the first unit of every Parameter (tied weights, modules used twice): each masked once."""
    owner: dict[int, str] = {}
    kept: list[UnitTensor] = []
    for u in units:
        first = next((owner[id(t)] for t in u.tensors if id(t) in owner), None)
        if first is not None:
            tied[u.name] = first
            continue
        owner.update((id(t), u.name) for t in u.tensors)
        kept.append(u)
    return kept


def _module_path(param_name: str) -> str:
    """The qualified name of the module owning a parameter (a parametrization's originals: their layer)."""
    head, sep, _ = param_name.partition("parametrizations.")
    if sep and (not head or head.endswith(".")):
        return head[:-1]
    return param_name.rpartition(".")[0]


def _decline(
    scan: EncoderScan, found: list[tuple[str, UnitTensor, str]], sel: UnitSelection
) -> list[UnitTensor]:
    """The units ``sel`` keeps of those ``found``; records in ``scan.declined`` why the others are not."""
    structured = any(layer != "linear" for _, _, layer in found)
    linear_rows = sel.linear_rows
    rows_off = sel.include is None and (linear_rows is False or (linear_rows == "auto" and structured))
    if rows_off:
        why = (
            "Linear rows off (linear_rows=False)"
            if linear_rows is False
            else "Linear rows off (linear_rows='auto': the encoder has conv/attention/RNN units)"
        )
        scan.declined.update((name, why) for name, _, layer in found if layer == "linear")
    kinds = sel.layer_kinds
    for name, u, layer in found:
        if layer not in kinds:
            why = f"layer kind {layer!r} not selected (layer_kinds={', '.join(kinds)})"
            for path in {name, *map(_module_path, u.param_names)}:
                scan.declined.setdefault(path, why)
    return [u for _, u, layer in found if layer in kinds and not (rows_off and layer == "linear")]


def scan_encoder(
    encoder: nn.Module,
    modality: str,
    selection: UnitSelection | None = None,
    *,
    prefix: str = "",
    **options: Any,
) -> EncoderScan:
    """Find one encoder's AMSS units and record why other modules were left out (see :func:`encoder_units`)."""
    sel = unit_selection(selection, **options)
    inc = as_selector(sel.include, "include")
    exc = as_selector(sel.exclude, "exclude")
    scan = EncoderScan()
    visited = list(_walk(encoder, prefix, exc, scan, set()))
    outputs = sibling_outputs(visited)
    found: list[tuple[str, UnitTensor, str]] = []
    for name, module in visited:
        if inc is not None and not inc(name, module):
            scan.declined[name] = "not selected by include"
            continue
        units, layer = _module_units(name, module, modality, sel, exc, outputs, scan)
        found += [(name, u, layer) for u in units]
    scan.units = _untie(_decline(scan, found, sel), scan.tied)
    return scan


def encoder_units(
    encoder: nn.Module,
    modality: str,
    selection: UnitSelection | None = None,
    *,
    prefix: str = "",
    **options: Any,
) -> list[UnitTensor]:
    """Find the AMSS mask units of one modality's encoder by module type (see :mod:`equimodal.amss.units`).

    Args:
        encoder: the encoder module.
        modality: its modality name.
        selection: the unit selection (:class:`~equimodal.amss.units.UnitSelection`; its ``mask_encoders``
            and ``mask_fusion`` do not act here): ``include`` replaces the default choice (every module of
            a maskable type that it accepts is masked); ``exclude`` never masks modules (and their
            subtrees) besides ``amss_skip`` markers; ``heads`` declares separate q/k/v/o projections (it
            takes precedence over the heads found automatically on transformers' attention);
            ``linear_rows``, ``conv_units`` and ``layer_kinds`` as documented there. ``None``: the
            defaults, or a selection built from ``options``.
        prefix: name prefix for reports (e.g. ``"encoders.audio"``).
        **options: keyword shortcuts for the fields of a ``UnitSelection`` (``conv_units="weights"``),
            instead of ``selection``.

    A transformers attention module (see :func:`~equimodal.amss.units.attention_spec`) is selected as one
    module: ``include`` and ``exclude`` see it (and may also exclude one of its q/k/v children, or
    ``amss_skip`` it); a BERT-style ``output.dense`` is a unit of its own, found only next to a visited
    attention module.

    Raises:
        ValueError: a head count does not divide its projection, a weight is reparametrized in a way
            whose units cannot be mapped (see :mod:`equimodal.amss.units`), or an option is not one of
            its choices.
        TypeError: both ``selection`` and ``options``, or an unknown option.
    """
    return scan_encoder(encoder, modality, selection, prefix=prefix, **options).units
