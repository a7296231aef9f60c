"""The model scan: every modality's AMSS units (its encoder's, then its fusion-head block's), with the
records of every choice; and the fusion head's per-modality blocks (``mask_fusion``)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .scan import EncoderScan, scan_encoder
from .selection import MaskFusion, UnitSelection, check_mask_fusion, unit_selection
from .tensor import UnitTensor
from .weights import trainable

log = logging.getLogger(__name__)


def fusion_label(model: nn.Module) -> str:
    """The fusion head's registered name (``"concat"``, ``"sum"``, ...) or its class name."""
    fusion = getattr(model, "fusion", None)
    return str(getattr(fusion, "name", None) or type(fusion).__name__)


def scan_fusion(
    model: nn.Module, modalities: Sequence[str], mask_fusion: MaskFusion = True
) -> tuple[dict[str, list[UnitTensor]], str | None]:
    """The fusion head's masked blocks per modality, and why (some of) the head is not masked (or ``None``).

    Blocks come from ``model.fusion.modality_blocks()``: ``{modality: (weight, column slice)}``. A block
    of a weight shared by several modalities (a concat head) is masked element-wise, one sampling group
    per output row (the text-image code's ``--mask_ffn``); a weight that is a modality's own head (sum,
    weighted) is masked only with ``mask_fusion="all"``.
    """
    check_mask_fusion(mask_fusion)
    out: dict[str, list[UnitTensor]] = {m: [] for m in modalities}
    fusion = getattr(model, "fusion", None)
    if fusion is None:
        return out, None
    label = fusion_label(model)
    if mask_fusion is False:
        return out, "fusion head not masked: mask_fusion=False"
    blocks_fn = getattr(fusion, "modality_blocks", None)
    blocks = blocks_fn() if callable(blocks_fn) else {}
    if not blocks:
        return out, (
            f"fusion head not masked: {label} fusion has no per-modality column blocks (official code: "
            "concat only)"
        )
    users = Counter(id(param) for param, _ in blocks.values())
    reason = None
    for m, (param, cols) in blocks.items():
        if m not in out or not trainable(param):
            continue
        if users[id(param)] < 2 and mask_fusion != "all":
            reason = (
                f"fusion head not masked: {label} fusion, a head per modality (official code: concat only; "
                "mask_fusion='all' masks it)"
            )
            continue
        width = len(range(*cols.indices(param.shape[1])))
        if width == 0:
            continue
        rows = param.shape[0]
        out[m].append(
            UnitTensor(
                param,
                m,
                f"fusion[{m}]",
                "row_elements",
                rows,
                width,
                columns=cols,
                code_units=rows,
                param_names=(_param_name(model, param),),
            )  # fmt: skip
        )
    return out, reason


def _param_name(model: nn.Module, param: nn.Parameter) -> str:
    return next((n for n, p in model.named_parameters() if p is param), "fusion")


def fusion_units(
    model: nn.Module, modalities: Sequence[str], mask_fusion: MaskFusion = True
) -> dict[str, list[UnitTensor]]:
    """Find the fusion head's per-modality AMSS blocks (may be empty); see :func:`scan_fusion`."""
    return scan_fusion(model, modalities, mask_fusion)[0]


@dataclass
class ModelScan:
    """What :func:`scan_units` found: the masked tensors per modality and the records of every choice.

    Attributes:
        units: modality -> its masked tensors (encoder units, then its fusion-head block).
        encoders: modality -> the scan of its encoder (empty when ``mask_encoders=False``).
        fusion_reason: why (some of) the fusion head is not masked, or ``None``.
        selection: the unit selection used.
    """

    units: dict[str, list[UnitTensor]]
    encoders: dict[str, EncoderScan]
    fusion_reason: str | None
    selection: UnitSelection


def _claim(owner: dict[int, tuple[str, str]], m: str, scan: EncoderScan) -> None:
    """Record the tensors ``m``'s encoder masks in ``owner``; refuse one another modality's encoder masks
    (each modality has its own ratio)."""
    for u in scan.units:
        for t in u.tensors:
            other, where = owner.setdefault(id(t), (m, u.name))
            if other != m:
                raise ValueError(
                    f"Parameter {u.name} is shared by the encoders of {other!r} ({where}) and {m!r}; AMSS masks "
                    "each modality with its own ratio. Exclude the shared module from one modality "
                    "(exclude=[module], or amss_skip on a wrapper that only that modality uses)."
                )


def _no_units_error(m: str, sel: UnitSelection) -> ValueError:
    return ValueError(
        f"AMSS found no maskable units for modality {m!r} (expected Conv1d/2d/3d, attention, RNN or "
        f"Linear weights in model.encoders[{m!r}] or a fusion-head block; found none after amss_skip "
        f"markers, include/exclude, linear_rows, layer_kinds={', '.join(sel.layer_kinds)} and mask_encoders/"
        "mask_fusion). Remove amss_skip/exclude from some module, pass include=... or heads=..., select "
        "more layer_kinds, or enable mask_fusion with a concat fusion head (see equimodal.amss."
        "describe_units for what was found)."
    )


def scan_units(
    model: nn.Module, modalities: Sequence[str], selection: UnitSelection | None = None, **options: Any
) -> ModelScan:
    """Like :func:`discover_units`, also returning why modules were left out (for reports)."""
    sel = unit_selection(selection, **options)
    fusion, fusion_reason = scan_fusion(model, modalities, sel.mask_fusion)
    scans: dict[str, EncoderScan] = {}
    owner: dict[int, tuple[str, str]] = {}
    result: dict[str, list[UnitTensor]] = {}
    for m in modalities:
        encoder = model.encoders[m]
        scans[m] = (
            scan_encoder(encoder, m, sel, prefix=f"encoders.{m}") if sel.mask_encoders else EncoderScan()
        )
        _claim(owner, m, scans[m])
        if sel.mask_encoders and not scans[m].units and fusion[m]:
            log.warning(
                "AMSS: the encoder of %r has no maskable units; only its fusion-head block is masked.", m
            )
        result[m] = scans[m].units + fusion[m]
        if not result[m]:
            raise _no_units_error(m, sel)
    return ModelScan(result, scans, fusion_reason, sel)


def discover_units(
    model: nn.Module, modalities: Sequence[str], selection: UnitSelection | None = None, **options: Any
) -> dict[str, list[UnitTensor]]:
    """Return every modality's AMSS-masked tensors: its encoder's units plus its fusion-head block.

    Args:
        model: a model following the contract (``model.encoders``; optionally ``model.fusion``).
        modalities: the modalities, in model order.
        selection: what is masked (:class:`~equimodal.amss.units.UnitSelection`); ``None``: the defaults,
            or a selection built from ``options``.
        **options: keyword shortcuts for the fields of a ``UnitSelection`` (``layer_kinds="attention"``),
            instead of ``selection``.

    Raises:
        ValueError: a modality has no maskable units, a head count does not divide its projection, a
            parameter is masked in the encoders of two modalities, or a weight is reparametrized in a
            way whose units cannot be mapped.
        TypeError: both ``selection`` and ``options``, or an unknown option.
    """
    return scan_units(model, modalities, selection, **options).units
