"""The vectorised gradient masker of AMSS / AMSS+ (Yang et al., TPAMI 2025).

One :meth:`GradientMasker.apply` call scores, samples, reweights and applies the masks of every masked
tensor of every modality:

1. one norm reduction per tensor writes each unit's norm straight into a persistent padded ``(R, N)``
   matrix (one row per sampling group; no full-size temporary, no concatenation);
2. one :func:`~equimodal.amss.sampling.sample_units` call samples every group of every modality, each
   row keeping ``n = ceil(k_m * N)`` units of its modality's ratio;
3. the kept-unit weights are copied into a persistent mask matrix whose fixed views broadcast over each
   gradient, and one ``torch._foreach_mul_`` multiplies every gradient in place.

No Python loop runs per unit or per sample and nothing synchronises with the host: a step whose
gradients hold inf/NaN (an AMP overflow) is detected on the device and leaves the gradients untouched
through a ``where``; per-modality statistics come back as one small tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .sampling import (
    InclusionMode,
    ReweightMode,
    Rounding,
    SamplerName,
    ScoreMode,
    code_weights,
    floored_scores,
    inverse_inclusion_weights,
    keep_counts,
    sample_units,
    unit_scores,
)
from .units import UnitTensor

#: Rows of the statistics tensor returned by :meth:`GradientMasker.apply` (each a ``(M,)`` vector).
MASK_STATS: tuple[str, ...] = ("kept_fraction", "kept_grad_norm", "mean_weight", "grad_norm_ratio")


@dataclass(frozen=True)
class _Layout:
    """Index tensors and persistent buffers of the padded ``(R, N_max)`` unit matrix, on one device.

    ``norms`` and ``masks`` are reused every step: each masked tensor owns fixed views into them
    (``norm_grids`` receive its unit norms, ``mask_views`` broadcast its mask over the gradient), so a
    step needs one reduction per tensor and one ``_foreach_mul_`` for all of them. Padding stays zero.
    """

    device: torch.device
    valid: Tensor  # (R, N) bool
    row_modality: Tensor  # (R,) long
    row_units: Tensor  # (R,) long, units per group
    row_code_units: Tensor  # (R,) long, the code weight's R
    row_block: Tensor  # (R,) long, normalisation block for the code weight's q
    num_blocks: int
    row_tensor: Tensor  # (R,) long, index of the row's unit tensor in ``GradientMasker.tensors``
    units_per_tensor: Tensor  # (T,) float
    units_per_modality: Tensor  # (M,) float
    norms: Tensor  # (R, N) float32 buffer
    weight_norms: Tensor  # (R, N) float32 buffer (gn_wn only)
    masks: Tensor  # (R, N) float32 buffer
    norm_grids: list[Tensor]
    weight_grids: list[Tensor]
    mask_views: list[list[Tensor]]  # per unit tensor, one view per tensor it masks (param, members)


class GradientMasker:
    """Score, sample, reweight and mask the gradients of AMSS's unit tensors in one vectorised pass.

    Args:
        units: per modality (in model order), the masked tensors (from
            :func:`~equimodal.amss.units.discover_units`).
        score: unit score mode (``"gn"``, ``"gn_wn"``, ``"sqrt_gn"``).
        sampler: ``"adaptive"``, ``"topk"``, ``"uniform"``, ``"bernoulli"`` or ``"poisson"``.
        rounding: ``"ceil"`` or ``"floor"`` for the number of kept units.
        reweight: ``"none"`` (AMSS), ``"inverse_inclusion"`` (AMSS+ default) or ``"code"`` (official).
        inclusion: inclusion probability of the adaptive sampler (``"conditional"`` or ``"first_order"``).
        max_weight: cap of the inverse-inclusion weights (``None``: no cap).
        code_bias: ``b`` of the official weight ``1 / (q + 1/R + b)``.
        code_block_norm: normalise the official weight's ``q`` over a whole fusion block instead of per
            row (the text-image code, spec section 17).
    """

    def __init__(
        self,
        units: Mapping[str, Sequence[UnitTensor]],
        *,
        score: ScoreMode = "gn",
        sampler: SamplerName = "adaptive",
        rounding: Rounding = "ceil",
        reweight: ReweightMode = "none",
        inclusion: InclusionMode = "conditional",
        max_weight: float | None = 10.0,
        code_bias: float = 0.0,
        code_block_norm: bool = False,
        score_floor: float = 0.0,
    ) -> None:
        self.modalities = list(units)
        self.tensors: list[UnitTensor] = [u for m in self.modalities for u in units[m]]
        self.score, self.sampler, self.rounding = score, sampler, rounding
        self.reweight, self.inclusion, self.score_floor = reweight, inclusion, float(score_floor)
        self.max_weight, self.code_bias, self.code_block_norm = max_weight, code_bias, code_block_norm
        self._layout: _Layout | None = None
        self._keep: Tensor | None = None

    def kept_fraction_per_tensor(self) -> Tensor | None:
        """Per masked tensor (in ``tensors`` order), the fraction of its units the last :meth:`apply`
        kept (``None`` before the first call); on the device, no host sync."""
        if self._keep is None:
            return None
        lay = self.layout()
        kept = self._keep.to(torch.float32).sum(1)
        per_tensor = torch.zeros(len(self.tensors), device=lay.device).index_add_(0, lay.row_tensor, kept)
        return per_tensor / lay.units_per_tensor

    @property
    def device(self) -> torch.device:
        """Device of the masked parameters."""
        return self.tensors[0].param.device

    def _build_layout(self, device: torch.device) -> _Layout:
        width = max(u.units for u in self.tensors)
        rows_mod, rows_units, rows_code, rows_block, rows_tensor, starts = [], [], [], [], [], []
        row = 0
        for block, u in enumerate(self.tensors):
            starts.append(row)
            m = self.modalities.index(u.modality)
            for g in range(u.groups):
                rows_tensor.append(block)
                rows_mod.append(m)
                rows_units.append(u.units)
                rows_code.append(u.code_units)
                is_block = self.code_block_norm and u.kind == "row_elements"
                rows_block.append(block if is_block else len(self.tensors) + row + g)
            row += u.groups
        row_units = torch.tensor(rows_units)
        valid = torch.arange(width).unsqueeze(0) < row_units.unsqueeze(1)
        per_mod = torch.zeros(len(self.modalities)).index_add_(0, torch.tensor(rows_mod), row_units.float())
        block_ids = torch.tensor(rows_block).unique(return_inverse=True)[1]
        norms = torch.zeros(row, width, device=device)
        weight_norms = torch.zeros(row, width, device=device) if self.score == "gn_wn" else norms
        masks = torch.ones(row, width, device=device)
        return _Layout(
            device=device,
            valid=valid.to(device),
            row_modality=torch.tensor(rows_mod, device=device),
            row_units=row_units.to(device),
            row_code_units=torch.tensor(rows_code, device=device),
            row_block=block_ids.to(device),
            num_blocks=int(block_ids.max()) + 1,
            row_tensor=torch.tensor(rows_tensor, device=device),
            units_per_tensor=torch.tensor([float(u.groups * u.units) for u in self.tensors], device=device),
            units_per_modality=per_mod.to(device),
            norms=norms,
            weight_norms=weight_norms,
            masks=masks,
            norm_grids=[u.grid(norms, r) for u, r in zip(self.tensors, starts, strict=True)],
            weight_grids=[u.grid(weight_norms, r) for u, r in zip(self.tensors, starts, strict=True)],
            mask_views=[
                [u.mask_view(u.grid(masks, r), t.dim()) for t in u.tensors]
                for u, r in zip(self.tensors, starts, strict=True)
            ],
        )

    def layout(self) -> _Layout:
        """The index tensors and buffers on the parameters' current device (rebuilt if the model moved)."""
        device = self.device
        if self._layout is None or self._layout.device != device:
            self._layout = self._build_layout(device)
        return self._layout

    @torch.no_grad()
    def apply(self, ratios: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Apply AMSS: mask every unit tensor's ``.grad`` in place for update ratios ``ratios`` (``(M,)``).

        Args:
            ratios: update ratio of each modality, ``(M,)`` in model order.
            generator: source of randomness (seeded alike on every DDP rank).

        Parameters without a gradient this step are left alone (their units score zero for sampling and
        statistics). A unit spanning several tensors (an RNN's ``weight_ih`` and ``weight_hh``, weight
        norm's ``v`` and ``g``) is scored over all of them and kept or dropped in all of them. A step
        with any non-finite gradient in a masked tensor is left unmasked.

        Returns:
            ``(stats, finite)``: a ``(len(MASK_STATS), M)`` tensor (see :data:`MASK_STATS`) and a 0-d bool
            tensor, false when the step was skipped for non-finite gradients.
        """
        lay = self.layout()
        grads = [[t.grad for t in u.tensors] for u in self.tensors]
        sq, scores, finite = self._scores(lay, grads)
        n = keep_counts(ratios.to(lay.device)[lay.row_modality], lay.row_units, self.rounding)
        keep, pi = sample_units(
            scores, n, sampler=self.sampler, generator=generator, valid=lay.valid, inclusion=self.inclusion
        )
        mu = self._weights(lay, keep, pi, scores)
        mu = torch.where(finite, mu, torch.ones_like(mu))
        self._mask_grads(lay, grads, mu)
        self._keep = keep
        stats = self._statistics(lay, keep, sq, mu)
        return torch.where(finite, stats, torch.ones_like(stats)), finite

    def _scores(self, lay: _Layout, grads: list[list[Tensor | None]]) -> tuple[Tensor, Tensor, Tensor]:
        """Each unit's squared gradient norm (non-finite entries zeroed), its score, and whether every
        norm was finite (a 0-d bool tensor)."""
        for u, gs, out in zip(self.tensors, grads, lay.norm_grids, strict=True):
            u.write_unit_norms_(gs, out)
        sq = lay.norms.square_()
        finite = torch.isfinite(sq).all()
        sq = torch.nan_to_num_(sq, nan=0.0, posinf=0.0, neginf=0.0)
        wsq = None
        if self.score == "gn_wn":
            for u, out in zip(self.tensors, lay.weight_grids, strict=True):
                u.write_unit_norms_(u.tensors, out)
            wsq = lay.weight_norms.square_()
        return sq, floored_scores(unit_scores(sq, self.score, wsq), self.score_floor, lay.valid), finite

    def _weights(self, lay: _Layout, keep: Tensor, pi: Tensor, scores: Tensor) -> Tensor:
        """The weight of every unit: 0 when dropped, else 1 (AMSS) or the AMSS+ weight of ``reweight``."""
        if self.reweight == "inverse_inclusion":
            return inverse_inclusion_weights(keep, pi, self.max_weight)
        if self.reweight == "code":
            block_sum = scores.new_zeros(lay.num_blocks).index_add_(0, lay.row_block, scores.sum(1))
            q = scores / block_sum[lay.row_block].clamp_min(torch.finfo(scores.dtype).tiny).unsqueeze(1)
            return code_weights(keep, q, lay.row_code_units, self.code_bias)
        return keep.to(scores.dtype)

    def _mask_grads(self, lay: _Layout, grads: list[list[Tensor | None]], mu: Tensor) -> None:
        """Multiply every gradient in place by its units' weights ``mu`` (one ``_foreach_mul_``)."""
        lay.masks.copy_(mu)
        pairs = [
            (u.unit_view(g), v)
            for u, gs, vs in zip(self.tensors, grads, lay.mask_views, strict=True)
            for g, v in zip(gs, vs, strict=True)
            if g is not None
        ]
        targets, views = [t for t, _ in pairs], [v for _, v in pairs]
        if targets:
            torch._foreach_mul_(targets, views)

    def _statistics(self, lay: _Layout, keep: Tensor, sq: Tensor, mu: Tensor) -> Tensor:
        """The ``(len(MASK_STATS), M)`` statistics of one step (see :data:`MASK_STATS`)."""
        keepf = keep.to(sq.dtype)
        per_row = torch.stack(
            [keepf.sum(1), sq.sum(1), (sq * keepf).sum(1), (mu * keepf).sum(1), (sq * mu * mu).sum(1)], 1
        )
        per_mod = per_row.new_zeros(len(self.modalities), 5).index_add_(0, lay.row_modality, per_row)
        kept, total_sq, kept_sq, weight_sum, weighted_sq = per_mod.unbind(1)
        tiny = torch.finfo(per_mod.dtype).tiny
        return torch.stack(
            [
                kept / lay.units_per_modality,
                (kept_sq / total_sq.clamp_min(tiny)).sqrt(),
                weight_sum / kept.clamp_min(1),
                (weighted_sq / total_sq.clamp_min(tiny)).sqrt(),
            ]
        )
