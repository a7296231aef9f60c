"""Mask units of AMSS (Yang et al., TPAMI 2025): which parameter blocks are kept or dropped together.

Units are found by module type wherever the module sits in an encoder, never by parameter-name
substrings, and every layer type is masked by default:

============================== ========================================== ===========================
module                          unit                                       sampling groups
============================== ========================================== ===========================
``Conv1d`` / ``Conv2d`` /       ``conv_units="filters"`` (default): one    the whole tensor
``Conv3d``                      output filter ``W[o]``
                                ``conv_units="input_channels"``: one       the whole tensor
                                input channel ``c``: every weight that
                                reads it (``W[:, c]``; grouped convs: the
                                filters of ``c``'s group, see below)
                                ``conv_units="weights"``: one single       each output filter ``o``
                                weight ``W[o, i, *k]``                     (its ``in/groups * prod(k)``
                                                                           weights)
``nn.MultiheadAttention``       a head: ``E/H`` consecutive rows of each   q, k and v each one group;
                                of q, k, v (``in_proj_weight`` or the       ``out_proj`` one group
                                separate ``q/k/v_proj_weight``); ``E/H``
                                consecutive *columns* of ``out_proj``
transformers-style attention    a head: ``d_head`` consecutive rows of     q, k and v each one group;
(Linear children ``query/key/   each of q, k, v; ``d_head`` consecutive    the output projection one
value``, ``q_proj/k_proj/       *columns* of the output projection         group
v_proj``, ``q_lin/...``,        (a child ``out_proj/o_proj/out_lin/o/
``q/k/v``, plus a head count    dense``, or the sibling ``output.dense``
or head size attribute)         of BERT-style ``BertAttention``)
``Linear`` declared a head      ``out/H`` consecutive rows (``"rows"``:    the whole tensor
projection                      q, k, v) or ``in/H`` columns (``"cols"``:
                                the output projection)
other ``Linear``                one output row (neuron)                    the whole tensor
``nn.LSTM`` / ``nn.GRU`` /      a hidden unit ``j``: its gate rows         one group per layer and
``nn.RNN`` (and the ``*Cell``   ``j, H+j, ...`` of ``weight_ih`` *and*     direction, spanning both
modules)                        ``weight_hh`` together (LSTM ``proj_size``  tensors
                                projections ``weight_hr``: output rows)
fusion-head block of modality   one weight element ``W[c, j]``, ``j`` in   each output row ``c``
m (``model.fusion.              the modality's column slice of a weight
modality_blocks()``)            shared by the modalities (a concat head)
============================== ========================================== ===========================

Selection (the defaults): a module (and everything under it) carrying ``amss_skip = True`` is never
visited (equimodal's ResNet encoders mark their stems and downsample convolutions this way); norm
layers, embeddings and biases are never masked (the official code masks weights only); every Linear is
masked (``linear_rows=True``); ``linear_rows="auto"`` is the previous, code-faithful rule (plain Linear
layers only in encoders without conv, attention or RNN units: no BERT FFN or ResNet projection) and
``linear_rows=False`` never masks plain Linear rows. The first convolution of an encoder is *not*
skipped implicitly: mark it ``amss_skip`` or pass it in ``exclude``.

Conv units (``conv_units``): ``"filters"`` (default, the official code) keeps or drops whole output
filters. ``"input_channels"`` keeps or drops input channels: unit ``c`` is every weight reading input
channel ``c``, i.e. the slice ``W[:, c]`` along weight dim 1; in a grouped conv (``groups = G``) input
channel ``c = g * in/G + j`` is read only by the filters of its group ``g``, so the unit is
``W[g*out/G:(g+1)*out/G, j]`` (a depthwise conv's input channel is then exactly its filters); there are
``in_channels`` units in one group. ``"weights"`` makes every single weight a unit, scored by its own
squared gradient; the units of one output filter (its ``in/groups * prod(kernel)`` weights) form one
sampling group, as the official fusion-head elements are sampled per output row, so ``ceil(k * n)``
weights of every filter are kept (``n`` = weights per filter) and the masker's padded matrix is
``sum(out_channels) x max(weights per filter)`` instead of ``tensors x max(numel)``: for two ResNet18
encoders and a 6-class concat head, 7 692 x 4 608 = 35.4 M entries for 22.0 M weights (1.6x), against
44 x 2.36 M = 104 M (4.7x) with one group per tensor. A step still needs about 60 bytes of temporaries
per entry (scores, keys, a sort): about 1 GB per ResNet18 encoder, against about 1 MB for filters.

Layer kinds (``layer_kinds``): every unit has a layer kind, ``"conv"`` (Conv1d/2d/3d), ``"attention"``
(``nn.MultiheadAttention``, transformers attention q/k/v/output projections, BERT's sibling
``output.dense``, Linear layers declared as head projections), ``"linear"`` (every other Linear's rows:
FFN neurons, MLPs, projections) or ``"rnn"`` (RNN hidden units and LSTM projections). ``layer_kinds``
(default ``None``: all four) masks only the units of the kinds it names; the others are left unmasked
and listed with the reason by :func:`~equimodal.amss.describe_units`. It applies after
``include`` / ``exclude`` and ``linear_rows`` (a Linear is masked only when both allow it), and never to
the fusion head (``mask_fusion`` decides that). A modality with no unit of the selected kinds is masked
through its fusion-head block only (with a warning), or refused when it has none.

Shared parameters: a Parameter reachable twice in one modality (tied weights, a module used twice) is
masked exactly once, with the units of its first occurrence in module order; a Parameter masked in the
encoders of two modalities is refused (each modality is masked with its own ratio): exclude it from one.

Reparametrized weights: ``torch.nn.utils.parametrizations.weight_norm`` (and the older
``torch.nn.utils.weight_norm``) with ``dim=0`` is masked through the parametrization: ``v``
(``original1`` / ``weight_v``) is partitioned like the weight and ``g`` (``original0`` / ``weight_g``,
one entry per output row) joins the unit of its row. Any other reparametrization (``spectral_norm``,
``orthogonal``, ``weight_norm`` with another ``dim``, weight norm on an output projection whose units
are columns or on a conv whose units are input channels or single weights) raises a ``ValueError`` naming the parameter, rather than being skipped silently.

Fusion heads (``mask_fusion``): ``True`` / ``"concat"`` (default, the official code) masks only column
blocks of a weight shared by the modalities (the concat head); ``"all"`` also masks heads that give each
modality its own weight (``sum``, ``weighted``); ``False`` masks no fusion head. FiLM, gated and
attention fusions declare no blocks and are never masked.

Transformers attention is found by structure, not by class name: a module with ``nn.Linear``
children named as one of the q/k/v triples above and an int ``num_attention_heads`` / ``num_heads`` /
``n_heads`` (or ``config.num_attention_heads``) or head size ``attention_head_size`` / ``head_dim`` /
``key_value_proj_dim`` (BERT, RoBERTa, ViT, BART, CLIP, T5, DistilBERT, LLaMA, ...). The head size
``d_head`` splits every projection, so grouped-query k/v projections get fewer heads than q. GPT-2's
fused ``Conv1D`` projection is not recognised: declare it with ``heads`` if needed.

Selection API for a user's own model: ``include`` / ``exclude`` (a callable ``(name, module) -> bool``
or a collection of modules), ``heads`` (``{linear_module: (num_heads, "rows" | "cols")}``, or the
attribute ``amss_heads = (num_heads, "rows" | "cols")`` on the module), ``linear_rows``,
``conv_units``, ``layer_kinds``, ``mask_encoders`` and ``mask_fusion``. :func:`equimodal.amss.describe_units` lists what is
masked and why everything else is not.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

log = logging.getLogger(__name__)

UnitKind = Literal[
    "filters",
    "rows",
    "head_rows",
    "head_cols",
    "gate_rows",
    "row_elements",
    "input_channels",
    "filter_elements",
]
HeadLayout = Literal["rows", "cols"]
ModuleSelector = Union[Callable[[str, nn.Module], bool], Collection[nn.Module]]  # noqa: UP007
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
ROW_KINDS: tuple[str, ...] = ("filters", "rows", "head_rows", "gate_rows")
"""Kinds whose units partition dim 0, so that a unit may span several tensors (``members``)."""


@dataclass(frozen=True, eq=False)
class UnitTensor:
    """One parameter tensor masked by AMSS, partitioned into ``groups x units`` mask units.

    Attributes:
        param: the parameter whose ``.grad`` is masked.
        modality: the modality it belongs to.
        name: qualified module name (for reports; ``.l0`` / ``.l0_reverse`` is added for an RNN layer).
        kind: ``"filters"`` / ``"rows"`` (dim 0 slices), ``"head_rows"`` (blocks of rows, ``groups``
            blocks of ``units`` heads), ``"head_cols"`` (blocks of columns), ``"gate_rows"`` (rows
            ``j, H+j, ..`` of ``gates`` stacked gates: RNN hidden units), ``"row_elements"`` (single
            elements of a column slice, one group per row), ``"input_channels"`` (conv input channels:
            slices along weight dim 1, within each of ``conv_groups`` filter groups), ``"filter_elements"``
            (single conv weights, one group per output filter).
        groups: number of independent sampling groups.
        units: units per group.
        columns: the column slice of a fusion block (``"row_elements"`` only).
        code_units: the official AMSS+ weight's ``R`` (units per group; output rows for the fusion head).
        members: further parameters whose dim 0 is partitioned exactly like ``param``'s and that belong
            to the same units (an RNN's ``weight_hh`` with its ``weight_ih``; weight norm's ``g`` with
            ``v``): a unit's score sums over all of them and its mask applies to all of them.
        gates: stacked gates of a ``"gate_rows"`` tensor (4 LSTM, 3 GRU, 1 RNN).
        param_names: qualified names of ``param`` and ``members`` (for reports).
        conv_groups: the conv's ``groups`` (``"input_channels"`` only): input channel ``g * in/G + j`` is
            the slice ``[g * out/G : (g+1) * out/G, j]``.
    """

    param: nn.Parameter
    modality: str
    name: str
    kind: UnitKind
    groups: int
    units: int
    columns: slice | None = None
    code_units: int = 0
    members: tuple[nn.Parameter, ...] = ()
    gates: int = 1
    param_names: tuple[str, ...] = ()
    conv_groups: int = 1

    def __post_init__(self) -> None:
        shape = tuple(self.param.shape)
        if self.kind == "input_channels" and (
            shape[0] % self.conv_groups or self.units != self.conv_groups * shape[1] or self.groups != 1
        ):
            raise ValueError(
                f"{self.name}: {self.units} input channels in {self.conv_groups} conv groups do not fit a "
                f"weight of shape {shape}."
            )
        if self.kind == "filter_elements" and (
            self.groups != shape[0] or self.groups * self.units != self.param.numel()
        ):
            raise ValueError(
                f"{self.name}: {self.groups} x {self.units} single weights do not fit a weight of shape {shape}."
            )
        for t in self.members:
            if self.kind not in ROW_KINDS or t.dim() != self.param.dim() or t.shape[0] != self.param.shape[0]:
                raise ValueError(
                    f"{self.name}: a member of a {self.kind!r} unit must have the shape[0] and dims of "
                    f"{tuple(self.param.shape)}, found {tuple(t.shape)}."
                )

    @property
    def tensors(self) -> tuple[nn.Parameter, ...]:
        """``param`` and its ``members``: every tensor this entry masks."""
        return (self.param, *self.members)

    @property
    def num_units(self) -> int:
        """Total units ``groups * units``."""
        return self.groups * self.units

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Shape of this tensor's per-unit values (norms, masks): ``(units,)``, or ``(groups, units)``."""
        if self.kind in ("head_rows", "row_elements", "filter_elements"):
            return (self.groups, self.units)
        return (self.units,)

    def _reduce_dims(self, ndim: int) -> tuple[int, ...]:
        if self.kind in ("filters", "rows"):
            return tuple(range(1, ndim))
        if self.kind == "head_rows":
            return tuple(range(2, ndim + 2))
        if self.kind == "gate_rows":
            return (0, *range(2, ndim + 1))
        if self.kind == "head_cols":
            return (0, 2)
        if self.kind == "input_channels":
            return (1, *range(3, ndim + 1))
        return ()

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        """Dims of :meth:`unit_view` reduced to get one value per unit (empty for single elements)."""
        return self._reduce_dims(self.param.dim())

    def unit_view(self, t: Tensor) -> Tensor:
        """A view of ``t`` (a gradient or weight of :attr:`tensors`) whose leading or marked dims index the units.

        ``(N, ...)`` for filters and rows, ``(groups, heads, rows_per_head, ...)`` for head rows,
        ``(gates, units, ...)`` for gate rows, ``(out, heads, cols_per_head)`` for head columns,
        ``(C, width)`` for fusion-block elements, ``(conv_groups, out/G, in/G, *kernel)`` for input
        channels, ``t`` itself for single conv weights. Splitting one dimension is always a view.
        """
        if self.kind in ("filters", "rows"):
            return t
        if self.kind == "head_rows":
            return t.unflatten(0, (self.groups, self.units, -1))
        if self.kind == "gate_rows":
            return t.unflatten(0, (self.gates, self.units))
        if self.kind == "head_cols":
            return t.unflatten(1, (self.units, -1))
        if self.kind == "input_channels":
            return t.unflatten(0, (self.conv_groups, -1))
        if self.kind == "filter_elements":
            return t
        return t[:, self.columns]

    def grid(self, padded: Tensor, row: int) -> Tensor:
        """This tensor's block of a padded ``(R, N_max)`` matrix whose rows ``row..`` hold its groups."""
        block = padded[row : row + self.groups, : self.units]
        return block if len(self.grid_shape) == 2 else block[0]

    def write_norms_(self, t: Tensor, out: Tensor) -> None:
        """Write the L2 norm of each unit of one tensor ``t`` into ``out`` (shaped :attr:`grid_shape`).

        No full-size temporary is made: the norm reduces a view of ``t`` directly (fusion elements and
        single conv weights are single weights, so their absolute value is written instead). ``out`` is
        viewed in the reduced shape of :meth:`unit_view` (``(G, in/G)`` for input channels, the weight's
        shape for single conv weights), which splits one of its dimensions: always a view.
        """
        view = self.unit_view(t.detach())
        dims = self._reduce_dims(t.dim())
        out = out.view([size for d, size in enumerate(view.shape) if d not in dims])
        if not dims:
            out.copy_(view.abs())
        elif view.dtype == out.dtype or view.dtype in (torch.float16, torch.bfloat16):
            torch.linalg.vector_norm(view, 2, dim=dims, dtype=out.dtype, out=out)
        else:
            out.copy_(torch.linalg.vector_norm(view, 2, dim=dims))

    def write_unit_norms_(self, tensors: Sequence[Tensor | None], out: Tensor) -> None:
        """Write each unit's L2 norm over all of ``tensors`` (one per :attr:`tensors`; ``None``: absent)."""
        present = [t for t in tensors if t is not None]
        if not present:
            out.zero_()
            return
        self.write_norms_(present[0], out)
        for t in present[1:]:
            extra = torch.empty_like(out)
            self.write_norms_(t, extra)
            torch.hypot(out, extra, out=out)

    def mask_view(self, grid: Tensor, ndim: int | None = None) -> Tensor:
        """A view of per-unit values ``grid`` that broadcasts over :meth:`unit_view` of an ``ndim``-dim tensor."""
        ndim = self.param.dim() if ndim is None else ndim
        if self.kind in ("filters", "rows"):
            return grid.view((self.units,) + (1,) * (ndim - 1))
        if self.kind == "head_rows":
            return grid.view((self.groups, self.units) + (1,) * ndim)
        if self.kind == "gate_rows":
            return grid.view((1, self.units) + (1,) * (ndim - 1))
        if self.kind == "head_cols":
            return grid.view(1, self.units, 1)
        if self.kind == "input_channels":
            return grid.view((self.conv_groups, 1, -1) + (1,) * (ndim - 2))
        if self.kind == "filter_elements":
            return grid.view(self.param.shape)
        return grid

    def sq_norms(self, t: Tensor) -> Tensor:
        """Squared norm of each unit of one tensor ``t``, flat ``(groups * units,)`` in float32."""
        out = torch.empty(self.grid_shape, dtype=torch.float32, device=t.device)
        self.write_norms_(t, out)
        return out.square().reshape(-1)

    def unit_sq_norms(self) -> Tensor:
        """Squared norm of each unit's gradient over all :attr:`tensors` (missing gradients count zero)."""
        out = torch.empty(self.grid_shape, dtype=torch.float32, device=self.param.device)
        self.write_unit_norms_([t.grad for t in self.tensors], out)
        return out.square().reshape(-1)

    def apply_(self, grad: Tensor, mask: Tensor) -> None:
        """Multiply one gradient ``grad`` in place by the flat per-unit ``mask`` (one ``mul_``)."""
        self.unit_view(grad).mul_(self.mask_view(mask.reshape(self.grid_shape), grad.dim()))


# ----------------------------------------------------------------------------- small helpers
def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _as_selector(sel: ModuleSelector | None, what: str) -> Callable[[str, nn.Module], bool] | None:
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


def _head_spec(
    module: nn.Module, heads: Mapping[nn.Module, tuple[int, str]] | None
) -> tuple[int, str] | None:
    spec = None
    if heads is not None:
        for key, value in heads.items():
            if key is module:
                spec = value
                break
    if spec is None:
        spec = getattr(module, "amss_heads", None)
    if spec is None:
        return None
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


def _trainable(p: object) -> bool:
    return isinstance(p, nn.Parameter) and p.requires_grad and p.dim() >= 2 and p.numel() > 0


# ----------------------------------------------------------------------- weights, reparametrized or not
@dataclass(frozen=True)
class _Weight:
    """The trainable tensors behind a module's weight: ``param`` partitioned like the weight, ``members``
    (weight norm's ``g``) partitioned along dim 0 only; ``names`` relative to the module."""

    param: nn.Parameter
    members: tuple[nn.Parameter, ...]
    names: tuple[str, ...]


def _refuse(where: str, what: str, attr: str) -> ValueError:
    return ValueError(
        f"{where} is reparametrized ({what}); AMSS cannot tell which entries of the trained tensors form "
        "one of its units, and will not skip it silently. Supported: torch.nn.utils.parametrizations."
        "weight_norm (or torch.nn.utils.weight_norm) with dim=0 on a weight whose units are rows (conv "
        "filters, Linear rows, q/k/v heads, RNN gates). Remove the reparametrization (torch.nn.utils."
        f"parametrize.remove_parametrizations(module, {attr!r}); for the hook API remove_spectral_norm or "
        "remove_weight_norm), or keep the module out of masking (module.amss_skip = True, or exclude=[module])."
    )


def _reparametrization(module: nn.Module, attr: str) -> tuple[str, int | None] | None:
    """``(what, dim)`` when ``module.attr`` is reparametrized (``dim``: a weight norm's), else ``None``."""
    if parametrize.is_parametrized(module, attr):
        plist = module.parametrizations[attr]
        kinds = [type(p).__name__ for p in plist]
        if kinds == ["_WeightNorm"]:
            return "torch.nn.utils.parametrizations.weight_norm", getattr(plist[0], "dim", None)
        return f"torch.nn.utils.parametrize with {', '.join(kinds)}", None
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "name", None) == attr and type(hook).__name__ == "WeightNorm":
            return "torch.nn.utils.weight_norm", getattr(hook, "dim", None)
    return None


def _trained_behind(module: nn.Module, attr: str) -> bool:
    """Whether a trainable tensor stands behind ``module.attr`` (itself, or what it is computed from)."""
    if parametrize.is_parametrized(module, attr):
        return any(p.requires_grad for p in module.parametrizations[attr].parameters())
    return any(p.requires_grad for n, p in module.named_parameters(recurse=False) if n.startswith(attr))


def _weight(
    module: nn.Module, attr: str, where: str, *, rows: bool = True, units: str = "columns"
) -> _Weight | None:
    """The trainable tensors of ``module.attr``, or ``None`` (absent, or not a trained tensor).

    Args:
        module: the layer.
        attr: its weight attribute.
        where: the qualified module name, for errors.
        rows: whether the units split dim 0 (weight norm's ``g`` can then join them).
        units: what the units are when they do not (for errors).

    Raises:
        ValueError: the weight is reparametrized in a way whose units cannot be mapped.
    """
    full = _join(where, attr)
    reparam = _reparametrization(module, attr)
    if (reparam is not None or isinstance(getattr(module, attr, None), Tensor)) and not _trained_behind(
        module, attr
    ):
        return None  # frozen: nothing to mask, whatever the parametrization
    if reparam is not None:
        what, dim = reparam
        if not what.endswith("weight_norm"):
            raise _refuse(full, what, attr)
        if dim != 0:
            raise _refuse(full, f"{what} with dim={dim}: its g does not follow the output rows", attr)
        if not rows:
            raise _refuse(full, f"{what}: its g is per output row, but these units are {units}", attr)
        if what == "torch.nn.utils.weight_norm":
            g, v = getattr(module, f"{attr}_g"), getattr(module, f"{attr}_v")
            names = (f"{attr}_v", f"{attr}_g")
        else:
            plist = module.parametrizations[attr]
            g, v = plist.original0, plist.original1
            names = (f"parametrizations.{attr}.original1", f"parametrizations.{attr}.original0")
        if not isinstance(v, nn.Parameter):
            return None
        members = (g,) if isinstance(g, nn.Parameter) and g.requires_grad else ()
        if members and (g.dim() != v.dim() or g.shape[0] != v.shape[0]):
            raise _refuse(full, f"{what} with g of shape {tuple(g.shape)}", attr)
        return _Weight(v, members, names[: 1 + len(members)])
    w = getattr(module, attr, None)
    if isinstance(w, nn.Parameter):
        return _Weight(w, (), (attr,))
    if isinstance(w, Tensor):
        hooks = ", ".join(type(h).__name__ for h in module._forward_pre_hooks.values()) or "no hook"
        raise _refuse(full, f"a tensor computed from other parameters, forward pre-hooks: {hooks}", attr)
    return None


def _unit(
    where: str,
    module: nn.Module,
    attr: str,
    modality: str,
    kind: UnitKind,
    units: int,
    *,
    label: str | None = None,
    groups: int = 1,
    conv_groups: int = 1,
) -> UnitTensor | None:
    """A :class:`UnitTensor` for ``module.attr`` when it is trained, else ``None``."""
    desc = {"input_channels": "input channels", "filter_elements": "single weights"}.get(kind, "columns")
    w = _weight(module, attr, where, rows=kind in ROW_KINDS, units=desc)
    if w is None or not _trainable(w.param):
        return None
    names = tuple(_join(where, n) for n in w.names)
    return UnitTensor(
        w.param, modality, label or where, kind, groups, units, code_units=units, members=w.members,
        param_names=names, conv_groups=conv_groups,
    )  # fmt: skip


def _conv_unit(name: str, conv: _ConvNd, modality: str, conv_units: str) -> UnitTensor | None:
    """The units of a (non-transposed) conv weight for ``conv_units`` (see the module docstring)."""
    if conv_units == "input_channels":
        return _unit(
            name, conv, "weight", modality, "input_channels", conv.in_channels, conv_groups=conv.groups
        )
    if conv_units == "weights":
        per_filter = (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
        return _unit(name, conv, "weight", modality, "filter_elements", per_filter, groups=conv.out_channels)
    return _unit(name, conv, "weight", modality, "filters", conv.out_channels)


# ------------------------------------------------------------------------------ unit builders
def _heads_of_linear(
    name: str, module: nn.Module, num_heads: int, layout: str, modality: str
) -> UnitTensor | None:
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"Heads were declared on {name} ({type(module).__name__}); only nn.Linear is supported."
        )
    size = module.out_features if layout == "rows" else module.in_features
    if num_heads < 1 or size % num_heads:
        dim = "output" if layout == "rows" else "input"
        raise ValueError(
            f"Head count {num_heads} does not divide the {dim} size {size} of {name} (expected a divisor of "
            f"{size}). Pass the attention layer's true number of heads."
        )
    return _unit(
        name, module, "weight", modality, "head_rows" if layout == "rows" else "head_cols", num_heads
    )


def _mha_units(name: str, mha: nn.MultiheadAttention, modality: str) -> list[UnitTensor]:
    h = mha.num_heads
    if mha.embed_dim % h:
        raise ValueError(f"{name}: num_heads {h} does not divide embed_dim {mha.embed_dim}.")
    found = [
        _unit(name, mha, "in_proj_weight", modality, "head_rows", h, label=_join(name, "in_proj"), groups=3),
        *(
            _unit(name, mha, f"{p}_proj_weight", modality, "head_rows", h, label=_join(name, f"{p}_proj"))
            for p in "qkv"
        ),
        _unit(_join(name, "out_proj"), mha.out_proj, "weight", modality, "head_cols", h),
    ]
    return [u for u in found if u is not None]


def _rnn_units(name: str, rnn: nn.Module, modality: str) -> list[UnitTensor]:
    """One ``"gate_rows"`` tensor per layer and direction (``weight_ih`` with ``weight_hh`` as member)."""
    hidden = int(rnn.hidden_size)  # type: ignore[arg-type]
    if isinstance(rnn, nn.RNNBase):
        gates = {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)
        dirs = ("", "_reverse") if rnn.bidirectional else ("",)
        cells = [f"_l{k}{d}" for k in range(rnn.num_layers) for d in dirs]
    else:
        gates = {nn.LSTMCell: 4, nn.GRUCell: 3}.get(type(rnn), 1)
        cells = [""]
    out: list[UnitTensor] = []
    for sfx in cells:
        label = _join(name, sfx[1:]) if sfx else name
        parts = [_weight(rnn, f"weight_{k}{sfx}", name) for k in ("ih", "hh")]
        parts = [w for w in parts if w is not None and _trainable(w.param)]
        for w in parts:
            if w.param.shape[0] != gates * hidden:
                raise ValueError(
                    f"{_join(name, w.names[0])}: expected {gates} x {hidden} gate rows, found {w.param.shape[0]}."
                )
        if parts:
            first, rest = parts[0], parts[1:]
            members = first.members + tuple(t for w in rest for t in (w.param, *w.members))
            names = first.names + tuple(n for w in rest for n in w.names)
            out.append(
                UnitTensor(
                    first.param,
                    modality,
                    label,
                    "gate_rows",
                    1,
                    hidden,
                    code_units=hidden,
                    members=members,
                    gates=gates,
                    param_names=tuple(_join(name, n) for n in names),
                )  # fmt: skip
            )
        if getattr(rnn, "proj_size", 0):
            proj = _unit(name, rnn, f"weight_hr{sfx}", modality, "rows", rnn.proj_size, label=f"{label}.proj")
            out += [proj] if proj is not None else []
    return out


# ----------------------------------------------------------------------- transformers-style attention
QKV_NAMES: tuple[tuple[str, str, str], ...] = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_lin", "k_lin", "v_lin"),
    ("q", "k", "v"),
)
"""Names of the q/k/v ``Linear`` children of transformers' attention modules (BERT, BART/LLaMA, DistilBERT, T5)."""
OUT_NAMES = ("out_proj", "o_proj", "out_lin", "o", "dense")
"""Names of an output projection held by the attention module itself."""
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "key_value_proj_dim")


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """The projections of a transformers-style attention module, found by :func:`attention_spec`.

    Attributes:
        qkv: ``(child name, Linear)`` of the query, key and value projections.
        out: the output projection when the module holds it (``out_proj``, ``o_proj``, ...), else ``None``.
        head_size: rows of q/k/v (columns of the output projection) per head.
    """

    qkv: tuple[tuple[str, nn.Linear], ...]
    out: tuple[str, nn.Linear] | None
    head_size: int


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _head_size(module: nn.Module, width: int) -> int | None:
    """Head size from the module's attributes: a head size, else ``width / head count``; ``None``: neither."""
    for attr in HEAD_SIZE_ATTRS:
        size = _positive_int(getattr(module, attr, None))
        if size is not None:
            return size
    config = getattr(module, "config", None)
    counts = [getattr(module, a, None) for a in HEAD_COUNT_ATTRS]
    counts.append(getattr(config, "num_attention_heads", None))
    heads = next((h for h in map(_positive_int, counts) if h is not None), None)
    if heads is None:
        return None
    if width % heads:
        raise ValueError(
            f"{type(module).__name__}: {heads} attention heads do not divide the query width {width}. Exclude "
            "the module (exclude=[module]) or declare its heads (heads={linear: (num_heads, 'rows')})."
        )
    return width // heads


def attention_spec(module: nn.Module) -> AttentionSpec | None:
    """The q/k/v (and output) projections of a transformers-style attention module, or ``None``.

    A module qualifies when it has ``nn.Linear`` children named as one of :data:`QKV_NAMES` and a head
    count or head size attribute (:data:`HEAD_COUNT_ATTRS`, :data:`HEAD_SIZE_ATTRS`, or
    ``config.num_attention_heads``), as ``BertSelfAttention`` (``query``/``key``/``value``,
    ``num_attention_heads``) or ``BartAttention`` (``q_proj``/..., ``num_heads``) have.

    Raises:
        ValueError: the head size does not divide a projection.
    """
    if isinstance(module, nn.MultiheadAttention):
        return None
    children = dict(module.named_children())
    for names in QKV_NAMES:
        linears = [children.get(n) for n in names]
        if all(isinstance(lin, nn.Linear) for lin in linears):
            break
    else:
        return None
    qkv = tuple(zip(names, linears, strict=True))
    size = _head_size(module, qkv[0][1].out_features)
    if size is None:
        return None
    out = next(((n, children[n]) for n in OUT_NAMES if isinstance(children.get(n), nn.Linear)), None)
    widths = [(n, lin.out_features) for n, lin in qkv] + ([(out[0], out[1].in_features)] if out else [])
    bad = [(n, w) for n, w in widths if w % size]
    if bad:
        raise ValueError(
            f"{type(module).__name__}: head size {size} does not divide the width of {bad} (expected multiples "
            f"of {size}). Exclude the module (exclude=[module]) or declare its heads with heads=..."
        )
    return AttentionSpec(qkv, out, size)  # type: ignore[arg-type]


def _is_attention(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.MultiheadAttention)
        or getattr(module, "amss_heads", None) is not None
        or attention_spec(module) is not None
    )


def _sibling_outputs(visited: Sequence[tuple[str, nn.Module]]) -> dict[int, int]:
    """``id(Linear) -> head size`` of BERT-style output projections: the ``output.dense`` next to attention.

    In ``BertAttention`` (and ViT's, RoBERTa's, ...) the self-attention module holds q/k/v and its sibling
    ``output`` (``BertSelfOutput``) holds the output projection ``dense``. Only visited (not skipped or
    excluded) attention modules count; the FFN's ``BertOutput.dense`` is never next to one.
    """
    ids = {id(m) for _, m in visited}
    found: dict[int, int] = {}
    for _, module in visited:
        children = dict(module.named_children())
        output = children.get("output")
        dense = getattr(output, "dense", None) if output is not None else None
        if not isinstance(dense, nn.Linear):
            continue
        for child_name, child in children.items():
            spec = attention_spec(child) if child_name != "output" and id(child) in ids else None
            if spec is not None and spec.out is None and dense.in_features == spec.qkv[0][1].out_features:
                found[id(dense)] = spec.head_size
    return found


# ------------------------------------------------------------------------------------ the scan
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


def _pruned(module: nn.Module, name: str, exclude: Callable[[str, nn.Module], bool] | None) -> str | None:
    if getattr(module, "amss_skip", False):
        return "skipped: amss_skip"
    if exclude is not None and exclude(name, module):
        return "skipped: exclude"
    return None


def _walk(
    module: nn.Module,
    prefix: str,
    exclude: Callable[[str, nn.Module], bool] | None,
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
    if _is_attention(module) or isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return
    for child_name, child in module.named_children():
        if child_name == "parametrizations" and parametrize.is_parametrized(module):
            continue
        yield from _walk(child, _join(prefix, child_name), exclude, scan, seen)


def _attention_units(
    name: str,
    spec: AttentionSpec,
    modality: str,
    heads: Mapping[nn.Module, tuple[int, str]] | None,
    exclude: Callable[[str, nn.Module], bool] | None,
    scan: EncoderScan,
) -> list[UnitTensor]:
    """Head rows of q, k and v (each its own group) and head columns of a held output projection."""
    parts = [(n, lin, "head_rows") for n, lin in spec.qkv]
    parts += [(spec.out[0], spec.out[1], "head_cols")] if spec.out is not None else []
    out: list[UnitTensor] = []
    for child_name, linear, kind in parts:
        full = _join(name, child_name)
        reason = _pruned(linear, full, exclude)
        if reason is not None:
            scan.pruned[full] = reason
            continue
        declared = _head_spec(linear, heads)
        if declared is not None:
            unit = _heads_of_linear(full, linear, declared[0], declared[1], modality)
        else:
            width = linear.out_features if kind == "head_rows" else linear.in_features
            unit = _unit(full, linear, "weight", modality, kind, width // spec.head_size)  # type: ignore[arg-type]
        out += [unit] if unit is not None else []
    return out


def _module_units(
    name: str,
    module: nn.Module,
    modality: str,
    heads: Mapping[nn.Module, tuple[int, str]] | None,
    exclude: Callable[[str, nn.Module], bool] | None,
    outputs: dict[int, int],
    scan: EncoderScan,
    conv_units: str = "filters",
) -> tuple[list[UnitTensor], str]:
    """The units of one visited module and their layer kind (see :data:`LAYER_KINDS`; ``""``: no unit).

    Plain Linear rows are kind ``"linear"`` (``linear_rows`` applies to them); Linear layers declared or
    found as head projections (BERT's sibling ``output.dense``) are ``"attention"``.
    """
    head = _head_spec(module, heads)
    if head is not None:
        unit = _heads_of_linear(name, module, head[0], head[1], modality)
        return ([unit] if unit is not None else []), "attention"
    if isinstance(module, nn.MultiheadAttention):
        return _mha_units(name, module, modality), "attention"
    spec = attention_spec(module)
    if spec is not None:
        return _attention_units(name, spec, modality, heads, exclude, scan), "attention"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return _rnn_units(name, module, modality), "rnn"
    unit, layer = None, ""
    if isinstance(module, nn.Linear) and id(module) in outputs:
        width = module.in_features // outputs[id(module)]
        unit, layer = _unit(name, module, "weight", modality, "head_cols", width), "attention"
    elif isinstance(module, _ConvNd) and not module.transposed:
        unit, layer = _conv_unit(name, module, modality, conv_units), "conv"
    elif isinstance(module, nn.Linear):
        unit, layer = _unit(name, module, "weight", modality, "rows", module.out_features), "linear"
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
    if isinstance(layer_kinds, str):
        given = [k.strip() for k in layer_kinds.split(",") if k.strip()]
    elif isinstance(layer_kinds, Collection) and all(isinstance(k, str) for k in layer_kinds):
        given = list(layer_kinds)
    else:
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


def _module_path(param_name: str) -> str:
    """The qualified name of the module owning a parameter (a parametrization's originals: their layer)."""
    head, sep, _ = param_name.partition("parametrizations.")
    if sep and (not head or head.endswith(".")):
        return head[:-1]
    return param_name.rpartition(".")[0]


def scan_encoder(
    encoder: nn.Module,
    modality: str,
    *,
    prefix: str = "",
    include: ModuleSelector | None = None,
    exclude: ModuleSelector | None = None,
    heads: Mapping[nn.Module, tuple[int, str]] | None = None,
    linear_rows: LinearRows = True,
    conv_units: ConvUnits = "filters",
    layer_kinds: LayerKinds = None,
) -> EncoderScan:
    """Find one encoder's AMSS units and record why other modules were left out (see :func:`encoder_units`)."""
    if linear_rows not in LINEAR_ROWS or not isinstance(linear_rows, (bool, str)):
        raise ValueError(f"linear_rows must be True, False or 'auto', found {linear_rows!r}.")
    check_conv_units(conv_units)
    kinds = check_layer_kinds(layer_kinds)
    inc = _as_selector(include, "include")
    exc = _as_selector(exclude, "exclude")
    scan = EncoderScan()
    visited = list(_walk(encoder, prefix, exc, scan, set()))
    outputs = _sibling_outputs(visited)
    found: list[tuple[str, UnitTensor, str]] = []
    for name, module in visited:
        if inc is not None and not inc(name, module):
            scan.declined[name] = "not selected by include"
            continue
        units, layer = _module_units(name, module, modality, heads, exc, outputs, scan, conv_units)
        found += [(name, u, layer) for u in units]
    structured = any(layer != "linear" for _, _, layer in found)
    rows_off = inc is None and (linear_rows is False or (linear_rows == "auto" and structured))
    if rows_off:
        why = (
            "Linear rows off (linear_rows=False)"
            if linear_rows is False
            else "Linear rows off (linear_rows='auto': the encoder has conv/attention/RNN units)"
        )
        scan.declined.update((name, why) for name, _, layer in found if layer == "linear")
    for name, u, layer in found:
        if layer not in kinds:
            why = f"layer kind {layer!r} not selected (layer_kinds={', '.join(kinds)})"
            for path in {name, *map(_module_path, u.param_names)}:
                scan.declined.setdefault(path, why)
    kept = [u for _, u, layer in found if layer in kinds and not (rows_off and layer == "linear")]
    scan.units = _untie(kept, scan.tied)
    return scan


def encoder_units(
    encoder: nn.Module,
    modality: str,
    *,
    prefix: str = "",
    include: ModuleSelector | None = None,
    exclude: ModuleSelector | None = None,
    heads: Mapping[nn.Module, tuple[int, str]] | None = None,
    linear_rows: LinearRows = True,
    conv_units: ConvUnits = "filters",
    layer_kinds: LayerKinds = None,
) -> list[UnitTensor]:
    """Find the AMSS mask units of one modality's encoder by module type (see the module docstring).

    Args:
        encoder: the encoder module.
        modality: its modality name.
        prefix: name prefix for reports (e.g. ``"encoders.audio"``).
        include: if given, replaces the default choice: every module of a maskable type (conv, attention,
            RNN, any ``Linear``) that ``include`` accepts is masked.
        exclude: modules (and their subtrees) never masked, in addition to ``amss_skip`` markers.
        heads: ``{linear: (num_heads, "rows" | "cols")}`` for separate q/k/v/o projections (takes
            precedence over the heads found automatically on transformers' attention).
        linear_rows: mask plain ``Linear`` output rows: ``True`` (default, every layer type), ``False``,
            or ``"auto"`` (only if the encoder has no conv, attention or RNN units). Ignored when
            ``include`` is given.
        conv_units: a conv weight's unit: ``"filters"`` (default), ``"input_channels"`` or ``"weights"``
            (single weights, one sampling group per output filter).
        layer_kinds: the layer kinds masked (``None``: all of ``"conv"``, ``"attention"``, ``"linear"``,
            ``"rnn"``); units of other kinds are left unmasked. Applies after ``include``/``exclude``
            and ``linear_rows``.

    A transformers attention module (see :func:`attention_spec`) is selected as one module: ``include``
    and ``exclude`` see it (and may also exclude one of its q/k/v children, or ``amss_skip`` it); a
    BERT-style ``output.dense`` is a unit of its own, found only next to a visited attention module.

    Raises:
        ValueError: a head count does not divide its projection, a weight is reparametrized in a way
            whose units cannot be mapped (see the module docstring), or ``conv_units`` / ``layer_kinds``
            is not one of the choices.
    """
    return scan_encoder(
        encoder,
        modality,
        prefix=prefix,
        include=include,
        exclude=exclude,
        heads=heads,
        linear_rows=linear_rows,
        conv_units=conv_units,
        layer_kinds=layer_kinds,
    ).units


# ------------------------------------------------------------------------------------ fusion heads
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
    if mask_fusion not in MASK_FUSION or not isinstance(mask_fusion, (bool, str)):
        raise ValueError(f"mask_fusion must be True, False, 'concat' or 'all', found {mask_fusion!r}.")
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
        if m not in out or not _trainable(param):
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


# ------------------------------------------------------------------------------------ the model
@dataclass
class ModelScan:
    """What :func:`scan_units` found: the masked tensors per modality and the records of every choice.

    Attributes:
        units: modality -> its masked tensors (encoder units, then its fusion-head block).
        encoders: modality -> the scan of its encoder (empty when ``mask_encoders=False``).
        fusion_reason: why (some of) the fusion head is not masked, or ``None``.
        options: the selection options used.
    """

    units: dict[str, list[UnitTensor]]
    encoders: dict[str, EncoderScan]
    fusion_reason: str | None
    options: dict[str, object]


def scan_units(
    model: nn.Module,
    modalities: Sequence[str],
    *,
    include: ModuleSelector | None = None,
    exclude: ModuleSelector | None = None,
    heads: Mapping[nn.Module, tuple[int, str]] | None = None,
    linear_rows: LinearRows = True,
    mask_encoders: bool = True,
    mask_fusion: MaskFusion = True,
    conv_units: ConvUnits = "filters",
    layer_kinds: LayerKinds = None,
) -> ModelScan:
    """Like :func:`discover_units`, also returning why modules were left out (for reports)."""
    check_conv_units(conv_units)
    kinds = check_layer_kinds(layer_kinds)
    encoders = model.encoders
    fusion, fusion_reason = scan_fusion(model, modalities, mask_fusion)
    scans: dict[str, EncoderScan] = {}
    owner: dict[int, tuple[str, str]] = {}
    result: dict[str, list[UnitTensor]] = {}
    for m in modalities:
        scan = (
            scan_encoder(
                encoders[m], m, prefix=f"encoders.{m}", include=include, exclude=exclude, heads=heads,
                linear_rows=linear_rows, conv_units=conv_units, layer_kinds=kinds,
            )
            if mask_encoders
            else EncoderScan()
        )  # fmt: skip
        scans[m] = scan
        for u in scan.units:
            for t in u.tensors:
                other, where = owner.setdefault(id(t), (m, u.name))
                if other != m:
                    raise ValueError(
                        f"Parameter {u.name} is shared by the encoders of {other!r} ({where}) and {m!r}; AMSS masks "
                        "each modality with its own ratio. Exclude the shared module from one modality "
                        "(exclude=[module], or amss_skip on a wrapper that only that modality uses)."
                    )
        if mask_encoders and not scan.units and fusion[m]:
            log.warning(
                "AMSS: the encoder of %r has no maskable units; only its fusion-head block is masked.", m
            )
        result[m] = scan.units + fusion[m]
        if not result[m]:
            raise ValueError(
                f"AMSS found no maskable units for modality {m!r} (expected Conv1d/2d/3d, attention, RNN or "
                f"Linear weights in model.encoders[{m!r}] or a fusion-head block; found none after amss_skip "
                f"markers, include/exclude, linear_rows, layer_kinds={', '.join(kinds)} and mask_encoders/"
                "mask_fusion). Remove amss_skip/exclude from some module, pass include=... or heads=..., select "
                "more layer_kinds, or enable mask_fusion with a concat fusion head (see equimodal.amss."
                "describe_units for what was found)."
            )
    options = dict(
        linear_rows=linear_rows, mask_encoders=mask_encoders, mask_fusion=mask_fusion, conv_units=conv_units,
        layer_kinds=kinds,
    )  # fmt: skip
    return ModelScan(result, scans, fusion_reason, options)


def discover_units(
    model: nn.Module,
    modalities: Sequence[str],
    *,
    include: ModuleSelector | None = None,
    exclude: ModuleSelector | None = None,
    heads: Mapping[nn.Module, tuple[int, str]] | None = None,
    linear_rows: LinearRows = True,
    mask_encoders: bool = True,
    mask_fusion: MaskFusion = True,
    conv_units: ConvUnits = "filters",
    layer_kinds: LayerKinds = None,
) -> dict[str, list[UnitTensor]]:
    """Return every modality's AMSS-masked tensors: its encoder's units plus its fusion-head block.

    ``conv_units`` and ``layer_kinds`` are described in the module docstring and :func:`encoder_units`.

    Raises:
        ValueError: a modality has no maskable units, a head count does not divide its projection, a
            parameter is masked in the encoders of two modalities, a weight is reparametrized in a
            way whose units cannot be mapped, or ``conv_units`` / ``layer_kinds`` is not one of the
            choices.
    """
    return scan_units(
        model, modalities, include=include, exclude=exclude, heads=heads, linear_rows=linear_rows,
        mask_encoders=mask_encoders, mask_fusion=mask_fusion, conv_units=conv_units, layer_kinds=layer_kinds,
    ).units  # fmt: skip
