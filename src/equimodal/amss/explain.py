"""What AMSS will mask in a model, and why every other trained parameter is not.

:func:`describe_units` runs exactly the unit discovery the AMSS balancers run (same code, same
defaults, same option checks as ``create_balancer``) and lists, per modality, every trained parameter
of its encoder and of its fusion-head block: masked ones with their unit kind and count, the others
with the reason. ``equimodal units CONFIG`` prints it for a config, as ``equimodal train`` builds the
model::

    report = equimodal.amss.explain.describe_units(model, linear_rows="auto")   # or units=UnitSelection(...)
    print(report)                       # a plain-text listing
    report.totals()["audio"]            # {"tensors": 16, "units": 1920, ...}
    [r.name for r in report.unmasked("audio")]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..types import modality_names
from .units import EncoderScan, ModelScan, UnitSelection, UnitTensor, scan_units

BIAS = "bias: not masked (official code: weights only)"
BIAS_OF_MASKED = "bias of a masked layer: not masked (official code: weights only)"
NORM = "norm layer parameters are not masked"
EMBEDDING = "embedding: no unit rule (official code: not masked)"
AUXILIARY = "auxiliary unimodal head (detached features): not masked"
OUTSIDE = "outside model.encoders and the fusion head's blocks: not masked"
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
_REPARAM = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original\d*$")


@dataclass(frozen=True)
class ParamRow:
    """One trained parameter (or a fusion-head block) of the report.

    Attributes:
        name: qualified parameter name, as in ``model.named_parameters()``.
        shape: the parameter's shape.
        kind: the unit kind when masked (see :class:`~equimodal.amss.units.UnitTensor`), else ``None``.
        groups: independent sampling groups (0 when not masked).
        units: units per group (0 when not masked).
        numel: weights the row covers (a fusion block covers its columns only).
        note: how it is masked, or why it is not.
    """

    name: str
    shape: tuple[int, ...]
    kind: str | None
    groups: int
    units: int
    numel: int
    note: str

    @property
    def masked(self) -> bool:
        """Whether AMSS masks this parameter's gradient."""
        return self.kind is not None


@dataclass(frozen=True)
class UnitsReport:
    """The result of :func:`describe_units`.

    Attributes:
        modalities: modality -> rows of its encoder's trained parameters and of its fusion-head block,
            in parameter order.
        other: trained parameters outside the encoders and the modality blocks (fusion bias, FiLM
            layers, auxiliary heads, ...), all unmasked, with the reason.
        units: modality -> the masked tensors, exactly what the balancer masks (``balancer.units``).
        selection: the unit selection used (``balancer.parts.units``).
        frozen: parameters not listed because they do not require grad.
    """

    modalities: dict[str, tuple[ParamRow, ...]]
    other: tuple[ParamRow, ...]
    units: dict[str, list[UnitTensor]]
    selection: UnitSelection
    frozen: int

    def masked(self, modality: str) -> list[ParamRow]:
        """The masked rows of ``modality``."""
        return [r for r in self.modalities[modality] if r.masked]

    def unmasked(self, modality: str | None = None) -> list[ParamRow]:
        """The unmasked rows of ``modality`` (``None``: of :attr:`other`)."""
        rows = self.other if modality is None else self.modalities[modality]
        return [r for r in rows if not r.masked]

    def totals(self) -> dict[str, dict[str, int]]:
        """Per modality: masked ``tensors`` and ``units`` (as sampled), ``masked_weights``, ``weights``
        (trained weights listed under the modality) and ``unmasked`` (parameters left unmasked)."""
        out = {}
        for m, rows in self.modalities.items():
            out[m] = {
                "tensors": len(self.units[m]),
                "units": sum(u.num_units for u in self.units[m]),
                "masked_weights": sum(r.numel for r in rows if r.masked),
                "weights": sum(r.numel for r in rows),
                "unmasked": sum(not r.masked for r in rows),
            }
        return out

    def __str__(self) -> str:
        shown = self.selection.summary()
        lines = [f"AMSS units ({', '.join(f'{k}={v!r}' for k, v in shown.items())})"]
        sections = [(m, rows) for m, rows in self.modalities.items()] + [("other", self.other)]
        for title, rows in sections:
            lines.append(f"{title}:")
            for r in rows:
                lines.append(f"  {r.name}  {r.kind or '-'}  {count_text(r)}  {r.note}".rstrip())
        for m, t in self.totals().items():
            lines.append(
                f"total {m}: {t['tensors']} tensors, {t['units']} units, {t['masked_weights']} of "
                f"{t['weights']} weights masked, {t['unmasked']} parameters not masked"
            )
        return "\n".join(lines)


def count_text(row: ParamRow) -> str:
    if not row.masked:
        return ""
    return f"{row.groups}x{row.units}" if row.groups > 1 else str(row.units)


# ------------------------------------------------------------------------------ options
def amss_balancers() -> list[str]:
    """Registered balancers that mask AMSS units (``AMSS`` and its subclasses)."""
    from ..balancers.amss import AMSS
    from ..balancers.registry import BALANCERS

    return [n for n in BALANCERS.names() if issubclass(BALANCERS.get(n), AMSS)]


def unit_options(balancer: str = "amss", units: UnitSelection | None = None, **options: Any) -> UnitSelection:
    """The unit selection ``create_balancer(balancer, model, units=units, **options)`` would use.

    Every option of the balancer is accepted and checked as ``create_balancer`` checks it (unknown
    names fail with close matches), and the selection is built as the balancer builds it (flat options,
    the ``units`` part, a ``preset``), so a report never disagrees with the balancer.
    """
    from ..balancers.registry import BALANCERS

    family = amss_balancers()
    if balancer not in family:
        BALANCERS.get(balancer)  # an unknown name fails with close matches
        raise ValueError(
            f"Balancer {balancer!r} masks no AMSS units; describe_units applies to {', '.join(family)}."
        )
    given = options if units is None else {**options, "units": units}
    checked = BALANCERS.check(balancer, given, complete=False)
    return BALANCERS.get(balancer).parts_from(checked).units


# ------------------------------------------------------------------------------ rows
def _masked_rows(units: list[UnitTensor]) -> dict[int, tuple[UnitTensor, int]]:
    return {id(t): (u, i) for u in units for i, t in enumerate(u.tensors)}


def _unit_note(u: UnitTensor, i: int) -> str:
    if i > 0:
        first = u.param_names[0].rsplit(".", 1)[-1] if u.param_names else u.name
        return f"same units as {first}"
    if u.kind == "filters":
        return "output filters"
    if u.kind == "rows":
        return "output rows (neurons)"
    if u.kind == "head_rows":
        return "heads: q, k, v rows" if u.groups == 3 else "heads: rows"
    if u.kind == "head_cols":
        return "heads: output columns"
    if u.kind == "gate_rows":
        return f"hidden units, {u.gates} gate rows each"
    if u.kind == "input_channels":
        return "input channels" + (f" ({u.conv_groups} conv groups)" if u.conv_groups > 1 else "")
    if u.kind == "filter_elements":
        return "single weights, per output filter"
    cols = u.columns or slice(None)
    return f"concat columns {cols.start}:{cols.stop}, per class"


def _row(name: str, p: nn.Parameter, note: str, unit: tuple[UnitTensor, int] | None = None) -> ParamRow:
    shape = tuple(p.shape)
    if unit is None:
        return ParamRow(name, shape, None, 0, 0, p.numel(), note)
    u, i = unit
    numel = u.num_units if u.kind == "row_elements" else p.numel()
    return ParamRow(name, shape, u.kind, u.groups, u.units, numel, _unit_note(u, i))


def _owner(name: str) -> tuple[str, str]:
    """``(module path, attribute)`` of a parameter name; a parametrization's originals map to their weight."""
    match = _REPARAM.match(name)
    if match:
        return match.group(1) or "", match.group(2)
    path, _, attr = name.rpartition(".")
    return path, attr


def _pruned_by(path: str, scan: EncoderScan) -> str | None:
    parts = path.split(".")
    for k in range(2, len(parts) + 1):
        prefix = ".".join(parts[:k])
        if prefix in scan.pruned:
            return f"{scan.pruned[prefix]} on {prefix}"
    return None


def _reason(
    name: str, modules: Mapping[str, nn.Module], scan: EncoderScan, mask_encoders: bool, owners: set[str]
) -> str:
    """Why the encoder parameter ``name`` is not masked."""
    path, attr = _owner(name)
    module = modules.get(path)
    pruned = _pruned_by(path, scan)
    if pruned is not None:
        return pruned
    if not mask_encoders:
        return "encoder not masked: mask_encoders=False"
    if isinstance(module, _NORMS) or type(module).__name__.endswith("Norm"):
        return NORM
    if attr.startswith("bias") or attr.endswith("_bias"):
        return BIAS_OF_MASKED if path in owners else BIAS
    if path in scan.declined:
        return scan.declined[path]
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return EMBEDDING
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolution: no unit rule"
    return f"no unit rule for {type(module).__name__}.{attr}"


def _encoder_rows(
    model: nn.Module, m: str, scan: ModelScan, masked: dict[int, tuple[UnitTensor, int]]
) -> tuple[list[ParamRow], int]:
    encoder, prefix = model.encoders[m], f"encoders.{m}"
    modules = dict(encoder.named_modules(prefix=prefix, remove_duplicate=False))
    owners = {_owner(n)[0] for u in scan.units[m] for n in u.param_names}
    rows, frozen = [], 0
    for name, p in encoder.named_parameters(prefix=prefix, remove_duplicate=False):
        if not p.requires_grad:
            frozen += 1
            continue
        hit = masked.get(id(p))
        if hit is None:
            note = _reason(name, modules, scan.encoders[m], scan.selection.mask_encoders, owners)
            rows.append(_row(name, p, note))
        elif hit[0].modality != m:
            rows.append(_row(name, p, f"shared with {hit[0].modality!r}: masked there ({hit[0].name})"))
        elif name in hit[0].param_names or not hit[0].param_names:
            rows.append(_row(name, p, "", hit))
        else:
            first = hit[0].param_names[hit[1]]
            rows.append(_row(name, p, f"tied: same Parameter as {first}, masked once there"))
    return rows, frozen


def _fusion_rows(
    model: nn.Module, scan: ModelScan, encoder_ids: set[int], masked: dict[int, tuple[UnitTensor, int]]
) -> tuple[dict[str, list[ParamRow]], list[ParamRow], int]:
    """Rows of the modality blocks (per modality) and of every other parameter outside the encoders."""
    fusion = getattr(model, "fusion", None)
    blocks_fn = getattr(fusion, "modality_blocks", None)
    blocks = blocks_fn() if callable(blocks_fn) else {}
    block_of: dict[int, list[tuple[str, slice]]] = {}
    for m, (p, cols) in blocks.items():
        block_of.setdefault(id(p), []).append((m, cols))
    per_mod: dict[str, list[ParamRow]] = {m: [] for m in scan.units}
    other: list[ParamRow] = []
    frozen = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith("encoders.") or id(p) in encoder_ids:
            continue
        if not p.requires_grad:
            frozen += 1
            continue
        fused = [u for m in scan.units for u in scan.units[m] if u.param is p and u.kind == "row_elements"]
        for u in fused:
            per_mod[u.modality].append(_row(name, p, "", (u, 0)))
        if fused:
            continue
        hit = masked.get(id(p))
        if hit is not None:
            other.append(_row(name, p, f"tied: same Parameter as {hit[0].param_names[hit[1]]}, masked there"))
        elif id(p) in block_of:
            for m, cols in (b for b in block_of[id(p)] if b[0] in per_mod):
                width = len(range(*cols.indices(p.shape[1]))) if p.dim() == 2 else p.shape[-1]
                note = scan.fusion_reason or "fusion block not masked"
                per_mod[m].append(ParamRow(name, tuple(p.shape), None, 0, 0, p.shape[0] * width, note))
        elif not name.startswith("fusion."):
            other.append(_row(name, p, OUTSIDE))
        elif getattr(fusion, "auxiliary", False) and name.startswith("fusion.aux."):
            other.append(_row(name, p, AUXILIARY))
        elif _owner(name)[1].startswith("bias"):
            other.append(_row(name, p, BIAS))
        else:
            other.append(
                _row(name, p, scan.fusion_reason or "fusion-head parameter outside the modality blocks")
            )
    return per_mod, other, frozen


def describe_units(
    model: nn.Module, balancer: str = "amss", units: UnitSelection | None = None, **options: Any
) -> UnitsReport:
    """List what AMSS will mask in ``model`` and why every other trained parameter is not.

    Args:
        model: a model following the contract (``model.encoders``; optionally ``model.fusion``).
        balancer: an AMSS-family balancer name (``amss``, ``amss_plus``, ``uniform_mask``); its
            defaults fill in the options not given.
        units: the unit selection (:class:`~equimodal.amss.units.UnitSelection`), as the balancer's
            ``units=`` part.
        **options: any of the balancer's options, checked as ``create_balancer`` checks them; those that
            select units (the flat fields of a ``UnitSelection``, and ``preset``) are used, e.g.
            ``linear_rows="auto"``, ``mask_fusion=False``, ``exclude=[model.encoders["video"].stem]``.

    Returns:
        A :class:`UnitsReport`: per modality each trained parameter with its unit kind and count, or the
        reason it is not masked; ``report.units`` equals ``create_balancer(balancer, model, ...).units``.

    Raises:
        ValueError / TypeError: as ``create_balancer`` would (an unknown option, a modality without
            units, a parameter masked in two modalities, an unsupported reparametrization, a flat
            option together with ``units``, ...).
    """
    selection = unit_options(balancer, units, **options)
    modalities = modality_names(model)
    scan = scan_units(model, modalities, selection)
    masked = {k: v for m in modalities for k, v in _masked_rows(scan.units[m]).items()}
    rows: dict[str, list[ParamRow]] = {}
    frozen = 0
    for m in modalities:
        rows[m], n = _encoder_rows(model, m, scan, masked)
        frozen += n
    encoder_ids = {id(p) for p in model.encoders.parameters()}
    fusion_rows, other, n = _fusion_rows(model, scan, encoder_ids, masked)
    for m in modalities:
        rows[m] += fusion_rows[m]
    return UnitsReport(
        {m: tuple(r) for m, r in rows.items()}, tuple(other), scan.units, selection, frozen + n
    )
