"""The mask units of one parameter tensor (:class:`UnitTensor`): how its gradient is split into units,
how a unit's norm is read and how a per-unit mask is applied, all through views (no full-size copy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

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
