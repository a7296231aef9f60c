"""Mask units of AMSS (Yang et al., TPAMI 2025): which parameter blocks are kept or dropped together.

Units are found by module type, never by parameter-name substrings:

============================== ========================================== ===========================
module                          unit                                       sampling groups
============================== ========================================== ===========================
``Conv1d`` / ``Conv2d`` /       one output filter ``W[o]``                 the whole tensor
``Conv3d``
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
fusion-head block of modality   one weight element ``W[c, j]``, ``j`` in   each output row ``c``
m (``model.fusion.              the modality's column slice
modality_blocks()``)
============================== ========================================== ===========================

Default selection (the official choices): a module (and everything under it) carrying
``amss_skip = True`` is never visited (equimodal's ResNet encoders mark their stems and downsample
convolutions this way); norms and biases are never masked; plain ``Linear`` layers are masked only when
the encoder has no convolution or attention units (``linear_rows="auto"``), so ResNet / BERT-style
encoders follow the code (no FFN or projection masking) while MLP encoders still have units. The first
convolution of an encoder is *not* skipped implicitly: guessing a stem from module order is the kind of
heuristic the library avoids; mark it ``amss_skip`` or pass it in ``exclude``.

Transformers attention is found by structure, not by class name: a module with ``nn.Linear``
children named as one of the q/k/v triples above and an int ``num_attention_heads`` / ``num_heads`` /
``n_heads`` (or ``config.num_attention_heads``) or head size ``attention_head_size`` / ``head_dim`` /
``key_value_proj_dim`` (BERT, RoBERTa, ViT, BART, CLIP, T5, DistilBERT, LLaMA, ...). The head size
``d_head`` splits every projection, so grouped-query k/v projections get fewer heads than q. This is
how the official text-image code masks BERT (q/k/v rows and ``attention.output.dense`` columns per
head); BERT's FFN, embeddings, pooler and LayerNorms are not masked (``linear_rows="auto"``). GPT-2's
fused ``Conv1D`` projection is not recognised: declare it with ``heads`` if needed.

Selection API for a user's own model: ``include`` / ``exclude`` (a callable ``(name, module) -> bool``
or a collection of modules), ``heads`` (``{linear_module: (num_heads, "rows" | "cols")}``, or the
attribute ``amss_heads = (num_heads, "rows" | "cols")`` on the module), ``linear_rows``,
``mask_encoders`` and ``mask_fusion``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

log = logging.getLogger(__name__)

UnitKind = Literal["filters", "rows", "head_rows", "head_cols", "row_elements"]
HeadLayout = Literal["rows", "cols"]
ModuleSelector = Union[Callable[[str, nn.Module], bool], Collection[nn.Module]]  # noqa: UP007
LinearRows = Union[bool, Literal["auto"]]  # noqa: UP007


@dataclass(frozen=True, eq=False)
class UnitTensor:
    """One parameter tensor masked by AMSS, partitioned into ``groups x units`` mask units.

    Attributes:
        param: the parameter whose ``.grad`` is masked.
        modality: the modality it belongs to.
        name: qualified module name (for reports).
        kind: ``"filters"`` / ``"rows"`` (dim 0 slices), ``"head_rows"`` (blocks of rows, ``groups``
            blocks of ``units`` heads), ``"head_cols"`` (blocks of columns), ``"row_elements"`` (single
            elements of a column slice, one group per row).
        groups: number of independent sampling groups.
        units: units per group.
        columns: the column slice of a fusion block (``"row_elements"`` only).
        code_units: the official AMSS+ weight's ``R`` (units per group; output rows for the fusion head).
    """

    param: nn.Parameter
    modality: str
    name: str
    kind: UnitKind
    groups: int
    units: int
    columns: slice | None = None
    code_units: int = 0

    @property
    def num_units(self) -> int:
        """Total units ``groups * units``."""
        return self.groups * self.units

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Shape of this tensor's per-unit values (norms, masks): ``(units,)``, or ``(groups, units)``."""
        if self.kind in ("head_rows", "row_elements"):
            return (self.groups, self.units)
        return (self.units,)

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        """Dims of :meth:`unit_view` reduced to get one value per unit (empty for single elements)."""
        ndim = self.param.dim()
        if self.kind in ("filters", "rows"):
            return tuple(range(1, ndim))
        if self.kind == "head_rows":
            return tuple(range(2, ndim + 2))
        if self.kind == "head_cols":
            return (0, 2)
        return ()

    def unit_view(self, t: Tensor) -> Tensor:
        """A view of ``t`` (the gradient or the weight) whose leading or marked dims index the units.

        ``(N, ...)`` for filters and rows, ``(groups, heads, rows_per_head, in)`` for head rows,
        ``(out, heads, cols_per_head)`` for head columns, ``(C, width)`` for fusion-block elements.
        Splitting one dimension is always a view, whatever the strides.
        """
        if self.kind in ("filters", "rows"):
            return t
        if self.kind == "head_rows":
            return t.unflatten(0, (self.groups, self.units, -1))
        if self.kind == "head_cols":
            return t.unflatten(1, (self.units, -1))
        return t[:, self.columns]

    def grid(self, padded: Tensor, row: int) -> Tensor:
        """This tensor's block of a padded ``(R, N_max)`` matrix whose rows ``row..`` hold its groups."""
        block = padded[row : row + self.groups, : self.units]
        return block if len(self.grid_shape) == 2 else block[0]

    def write_norms_(self, t: Tensor, out: Tensor) -> None:
        """Write the L2 norm of each unit of ``t`` into ``out`` (shaped :attr:`grid_shape`); one reduction.

        No full-size temporary is made: the norm reduces a view of ``t`` directly (fusion elements are
        single weights, so their absolute value is written instead).
        """
        view = self.unit_view(t.detach())
        dims = self.reduce_dims
        if not dims:
            out.copy_(view.abs())
        elif view.dtype == out.dtype or view.dtype in (torch.float16, torch.bfloat16):
            torch.linalg.vector_norm(view, 2, dim=dims, dtype=out.dtype, out=out)
        else:
            out.copy_(torch.linalg.vector_norm(view, 2, dim=dims))

    def mask_view(self, grid: Tensor) -> Tensor:
        """A view of per-unit values ``grid`` (shaped :attr:`grid_shape`) that broadcasts over :meth:`unit_view`."""
        if self.kind in ("filters", "rows"):
            return grid.view((self.units,) + (1,) * (self.param.dim() - 1))
        if self.kind == "head_rows":
            return grid[..., None, None]
        if self.kind == "head_cols":
            return grid.view(1, self.units, 1)
        return grid

    def sq_norms(self, t: Tensor) -> Tensor:
        """Squared norm of each unit of ``t``, flat ``(groups * units,)`` in float32."""
        out = torch.empty(self.grid_shape, dtype=torch.float32, device=t.device)
        self.write_norms_(t, out)
        return out.square().reshape(-1)

    def apply_(self, grad: Tensor, mask: Tensor) -> None:
        """Multiply ``grad`` in place by the flat per-unit ``mask`` (one ``mul_``)."""
        self.unit_view(grad).mul_(self.mask_view(mask.reshape(self.grid_shape)))


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


def _trainable(p: nn.Parameter | None) -> bool:
    return isinstance(p, nn.Parameter) and p.requires_grad and p.dim() >= 2 and p.numel() > 0


def _heads_of_linear(
    name: str, module: nn.Module, num_heads: int, layout: str, modality: str
) -> UnitTensor | None:
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"Heads were declared on {name} ({type(module).__name__}); only nn.Linear is supported."
        )
    w = module.weight
    size = w.shape[0] if layout == "rows" else w.shape[1]
    if num_heads < 1 or size % num_heads:
        dim = "output" if layout == "rows" else "input"
        raise ValueError(
            f"Head count {num_heads} does not divide the {dim} size {size} of {name} (expected a divisor of "
            f"{size}). Pass the attention layer's true number of heads."
        )
    if not _trainable(w):
        return None
    kind: UnitKind = "head_rows" if layout == "rows" else "head_cols"
    return UnitTensor(w, modality, name, kind, 1, num_heads, code_units=num_heads)


def _mha_units(name: str, mha: nn.MultiheadAttention, modality: str) -> list[UnitTensor]:
    h = mha.num_heads
    if mha.embed_dim % h:
        raise ValueError(f"{name}: num_heads {h} does not divide embed_dim {mha.embed_dim}.")
    out: list[UnitTensor] = []
    if mha.in_proj_weight is not None and _trainable(mha.in_proj_weight):
        out.append(
            UnitTensor(mha.in_proj_weight, modality, f"{name}.in_proj", "head_rows", 3, h, code_units=h)
        )
    for part in ("q", "k", "v"):
        w = getattr(mha, f"{part}_proj_weight", None)
        if w is not None and _trainable(w):
            out.append(UnitTensor(w, modality, f"{name}.{part}_proj", "head_rows", 1, h, code_units=h))
    if _trainable(mha.out_proj.weight):
        out.append(
            UnitTensor(mha.out_proj.weight, modality, f"{name}.out_proj", "head_cols", 1, h, code_units=h)
        )
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


def _attention_units(
    name: str,
    spec: AttentionSpec,
    modality: str,
    heads: Mapping[nn.Module, tuple[int, str]] | None,
    exclude: Callable[[str, nn.Module], bool] | None,
) -> list[UnitTensor]:
    """Head rows of q, k and v (each its own group) and head columns of a held output projection."""
    parts = [(n, lin, "head_rows") for n, lin in spec.qkv]
    parts += [(spec.out[0], spec.out[1], "head_cols")] if spec.out is not None else []
    out: list[UnitTensor] = []
    for child_name, linear, kind in parts:
        full = f"{name}.{child_name}" if name else child_name
        if getattr(linear, "amss_skip", False) or (exclude is not None and exclude(full, linear)):
            continue
        declared = _head_spec(linear, heads)
        if declared is not None:
            unit = _heads_of_linear(full, linear, declared[0], declared[1], modality)
            out += [unit] if unit is not None else []
            continue
        if not _trainable(linear.weight):
            continue
        width = linear.weight.shape[0] if kind == "head_rows" else linear.weight.shape[1]
        n = width // spec.head_size
        out.append(UnitTensor(linear.weight, modality, full, kind, 1, n, code_units=n))  # type: ignore[arg-type]
    return out


def _walk(
    module: nn.Module, prefix: str, exclude: Callable[[str, nn.Module], bool] | None
) -> Iterator[tuple[str, nn.Module]]:
    """Pre-order walk that prunes subtrees marked ``amss_skip`` or excluded, and does not enter attention."""
    if getattr(module, "amss_skip", False) or (exclude is not None and exclude(prefix, module)):
        return
    yield prefix, module
    if _is_attention(module):
        return
    for child_name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{child_name}" if prefix else child_name, exclude)


def encoder_units(
    encoder: nn.Module,
    modality: str,
    *,
    prefix: str = "",
    include: ModuleSelector | None = None,
    exclude: ModuleSelector | None = None,
    heads: Mapping[nn.Module, tuple[int, str]] | None = None,
    linear_rows: LinearRows = "auto",
) -> list[UnitTensor]:
    """Find the AMSS mask units of one modality's encoder by module type (see the module docstring).

    Args:
        encoder: the encoder module.
        modality: its modality name.
        prefix: name prefix for reports (e.g. ``"encoders.audio"``).
        include: if given, replaces the default choice: every module of a maskable type (conv, attention,
            any ``Linear``) that ``include`` accepts is masked.
        exclude: modules (and their subtrees) never masked, in addition to ``amss_skip`` markers.
        heads: ``{linear: (num_heads, "rows" | "cols")}`` for separate q/k/v/o projections (takes
            precedence over the heads found automatically on transformers' attention).
        linear_rows: mask plain ``Linear`` output rows: ``"auto"`` (only if the encoder has no conv or
            attention units), ``True`` or ``False``. Ignored when ``include`` is given.

    A transformers attention module (see :func:`attention_spec`) is selected as one module: ``include``
    and ``exclude`` see it (and may also exclude one of its q/k/v children, or ``amss_skip`` it); a
    BERT-style ``output.dense`` is a unit of its own, found only next to a visited attention module.
    """
    if linear_rows not in ("auto", True, False):
        raise ValueError(f"linear_rows must be 'auto', True or False, found {linear_rows!r}.")
    inc = _as_selector(include, "include")
    exc = _as_selector(exclude, "exclude")
    structured: list[UnitTensor] = []
    linear: list[UnitTensor] = []
    visited = list(_walk(encoder, prefix, exc))
    outputs = _sibling_outputs(visited)
    for name, module in visited:
        if inc is not None and not inc(name, module):
            continue
        head = _head_spec(module, heads)
        spec = attention_spec(module) if head is None else None
        if head is not None:
            unit = _heads_of_linear(name, module, head[0], head[1], modality)
            structured += [unit] if unit is not None else []
        elif isinstance(module, nn.MultiheadAttention):
            structured += _mha_units(name, module, modality)
        elif spec is not None:
            structured += _attention_units(name, spec, modality, heads, exc)
        elif id(module) in outputs and _trainable(module.weight):
            n = module.weight.shape[1] // outputs[id(module)]
            structured.append(UnitTensor(module.weight, modality, name, "head_cols", 1, n, code_units=n))
        elif isinstance(module, _ConvNd) and not module.transposed:
            if _trainable(module.weight):
                n = module.weight.shape[0]
                structured.append(UnitTensor(module.weight, modality, name, "filters", 1, n, code_units=n))
        elif isinstance(module, nn.Linear) and _trainable(module.weight):
            n = module.weight.shape[0]
            linear.append(UnitTensor(module.weight, modality, name, "rows", 1, n, code_units=n))
    if inc is not None or linear_rows is True or (linear_rows == "auto" and not structured):
        return structured + linear
    return structured


def fusion_units(model: nn.Module, modalities: Sequence[str]) -> dict[str, list[UnitTensor]]:
    """Find the fusion head's per-modality AMSS blocks via ``model.fusion.modality_blocks()`` (may be empty).

    Each block ``W[:, slice_m]`` is masked element-wise, one sampling group per output row (the
    text-image code's ``--mask_ffn``). A head without ``modality_blocks`` contributes nothing.
    """
    fusion = getattr(model, "fusion", None)
    blocks_fn = getattr(fusion, "modality_blocks", None)
    out: dict[str, list[UnitTensor]] = {m: [] for m in modalities}
    if not callable(blocks_fn):
        return out
    for m, (param, cols) in blocks_fn().items():
        if m not in out or not _trainable(param):
            continue
        width = len(range(*cols.indices(param.shape[1])))
        if width == 0:
            continue
        rows = param.shape[0]
        out[m].append(
            UnitTensor(param, m, f"fusion[{m}]", "row_elements", rows, width, columns=cols, code_units=rows)
        )
    return out


def discover_units(
    model: nn.Module,
    modalities: Sequence[str],
    *,
    include: ModuleSelector | None = None,
    exclude: ModuleSelector | None = None,
    heads: Mapping[nn.Module, tuple[int, str]] | None = None,
    linear_rows: LinearRows = "auto",
    mask_encoders: bool = True,
    mask_fusion: bool = True,
) -> dict[str, list[UnitTensor]]:
    """Return every modality's AMSS-masked tensors: its encoder's units plus its fusion-head block.

    Raises:
        ValueError: a modality has no maskable units, a head count does not divide its projection, or a
            parameter belongs to the encoders of two modalities.
    """
    encoders = model.encoders
    result: dict[str, list[UnitTensor]] = {}
    fusion = fusion_units(model, modalities) if mask_fusion else {m: [] for m in modalities}
    owner: dict[int, str] = {}
    for m in modalities:
        enc = (
            encoder_units(
                encoders[m],
                m,
                prefix=f"encoders.{m}",
                include=include,
                exclude=exclude,
                heads=heads,
                linear_rows=linear_rows,
            )
            if mask_encoders
            else []
        )
        for u in enc:
            other = owner.setdefault(id(u.param), m)
            if other != m:
                raise ValueError(
                    f"Parameter {u.name} is shared by the encoders of {other!r} and {m!r}; AMSS masks each modality "
                    "with its own ratio. Exclude the shared module from one modality (exclude=[module])."
                )
        if mask_encoders and not enc and fusion[m]:
            log.warning(
                "AMSS: the encoder of %r has no maskable units; only its fusion-head block is masked.", m
            )
        result[m] = enc + fusion[m]
        if not result[m]:
            raise ValueError(
                f"AMSS found no maskable units for modality {m!r} (expected Conv1d/2d/3d, attention or Linear "
                f"weights in model.encoders[{m!r}] or a fusion-head block; found none after amss_skip markers, "
                "include/exclude and mask_encoders/mask_fusion). Remove amss_skip/exclude from some module, "
                "pass include=... or heads=..., or enable mask_fusion with a fusion head that declares "
                "modality_blocks()."
            )
    return result
