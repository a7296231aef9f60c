"""MMPareto (Wei & Hu, ICML 2024): Pareto-integrated gradients of the multimodal and unimodal losses."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput
from .base import Balancer, Batch
from .heads import HeadsMode, build_heads, require_encoder_unimodal_logits
from .registry import register_balancer

__all__ = ["MMPareto", "pareto_weights", "require_encoder_unimodal_logits"]


def pareto_step(g_mm: Tensor, g_uni: Tensor) -> tuple[Tensor, Tensor]:
    """MMPareto's weights ``(w_mm, w_uni)`` for one encoder's flattened gradients, and whether they conflict.

    Non-conflicting gradients (``cos > 0``) get ``(1/2, 1/2)``; conflicting ones (``cos <= 0``) get the
    two-task min-norm (MGDA) solution ``w_mm = <g_uni - g_mm, g_uni> / ||g_mm - g_uni||^2`` clipped to
    [0, 1]. A zero gradient is treated as non-conflicting, which is what the reference solver's
    0.999/0.001 clipping amounts to after the norm rescale (it never leaves the update at zero).
    Returns the weights and the conflict flag (a 0-d bool tensor: the min-norm branch ran).
    """
    v11, v12, v22 = g_mm.dot(g_mm), g_mm.dot(g_uni), g_uni.dot(g_uni)
    w_mm = ((v22 - v12) / (v11 + v22 - 2 * v12).clamp_min(torch.finfo(g_mm.dtype).tiny)).clamp(0.0, 1.0)
    conflict = (v12 <= 0) & (v11 > 0) & (v22 > 0)
    w_mm = torch.where(conflict, w_mm, torch.full_like(w_mm, 0.5))
    return torch.stack([w_mm, 1 - w_mm]), conflict


def pareto_weights(g_mm: Tensor, g_uni: Tensor) -> Tensor:
    """Weights ``(w_mm, w_uni)`` of MMPareto for one encoder's flattened gradients (see :func:`pareto_step`)."""
    return pareto_step(g_mm, g_uni)[0]


@register_balancer("mmpareto")
class MMPareto(Balancer):
    """MMPareto (Wei & Hu, ICML 2024): per-encoder Pareto combination of multimodal and unimodal gradients.

    ``loss`` returns ``L_mm + sum_m L_m`` (fused CE plus each modality's unimodal CE) and, during the
    same call, takes the gradients of ``L_mm`` and of ``L_m`` w.r.t. encoder ``m`` separately
    (``torch.autograd.grad`` with ``retain_graph``; M + 1 extra backward passes). They are accumulated
    with the weight the user's backward gives the loss (read by a hook on the returned loss, so
    ``loss / k``, AMP scaling and skipped backwards all count correctly). ``before_step`` then sets
    each encoder tensor's gradient to ``gamma * new * max(f, ||g_sum|| / ||new||)`` with
    ``new = 2 (w_mm g_mm + w_m g_m)``, ``g_sum`` the plain summed gradient in ``.grad`` and ``f`` the
    ratio of ``.grad`` to the accumulated gradients (1 without AMP; ``1 / scale`` after
    ``GradScaler.unscale_``). Head parameters keep the plain summed gradient. Because the
    combination is made once per optimizer step from the accumulated gradients, k micro-batches give
    the same update as one big batch. The two calls suffice: it does not need to own the step.

    Unimodal heads. ``heads="separate"`` (default, as the reference code's ``head_audio``/
    ``head_video``): ``L_m`` is the CE of a linear head of the balancer's own on ``out.features[m]``
    (not detached), so it works with every fusion, FiLM/gated/attention included. Those heads are
    :meth:`parameters` (put them in the optimizer; a two-call loop whose optimizer steps the model but
    not them raises :class:`~equimodal.DriverError` at its second step), are saved by
    :meth:`state_dict`, and are what :meth:`predict_unimodal` returns while the method is active (so
    reported per-modality accuracy is theirs; outside the epoch window the model's unimodal logits are
    reported and the heads do not train). ``heads="shared"``: ``L_m`` uses the model's unimodal logits (concat column blocks or
    sum heads), as before; the unimodal and fused gradients then share the fused head's weights, stay
    aligned and the min-norm branch rarely fires; auxiliary-head fusions are refused.

    Deviations from the reference code (``MMPareto.py``): any number of modalities; heads initialised
    as ``nn.Linear`` is but from a generator seeded by ``seed``; a zero gradient is treated as
    non-conflicting instead of going through the 0.999/0.001 clip (same update after rescaling); a zero
    combined gradient stays zero instead of becoming NaN. As in the reference the weights are computed
    per encoder and the norm rescale is applied per parameter tensor. Other loss terms added to the
    returned loss lose their encoder gradients (they are replaced). Under fp16 autocast the per-loss
    gradients are taken from unscaled losses and may underflow (bf16 is safe); a step whose gradients
    are not finite is left untouched for GradScaler to skip (decided on the device: the two-task solve
    is closed-form, so a step reads nothing on the host). Under DDP the accumulated per-loss gradients
    (a declared statistic) and the separate heads' gradients (outside the DDP wrapper) are averaged over
    ranks by the base class.

    ``stats()``: per modality ``cos/<m>`` (cosine of ``g_mm`` and ``g_m``), ``w_mm/<m>`` (the weight of
    ``g_mm``) and ``conflict/<m>`` (1.0 when ``cos <= 0``, i.e. the min-norm branch ran, else 0.0; its
    mean over an epoch is the rate at which the Pareto step acts).

    Args:
        model: a contract model; with ``heads="separate"`` its output must carry ``features``.
        gamma: final gradient scale (1.5 in the reference code and BalanceBenchmark).
        heads: ``"separate"`` (the reference's layout) or ``"shared"`` (the model's unimodal logits).
        feature_dims: feature size per modality for the separate heads, for encoders without ``out_dim``.
        num_classes: number of classes for the separate heads, for models without ``num_classes``.
        start_epoch: first epoch of the method.
        end_epoch: last epoch of the method (``None``: no end).
        seed: seed of the separate heads' initialisation (the method is otherwise deterministic).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        gamma: float = 1.5,
        heads: HeadsMode = "separate",
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, found {gamma}. The reference value is 1.5.")
        self.gamma = float(gamma)
        # Encoders without trainable parameters (frozen) have nothing to combine and are skipped.
        self._params = {m: ps for m in self.modalities if (ps := self.encoder_params(m))}
        if not self._params:
            raise ValueError(
                f"MMPareto found no trainable encoder parameters in modalities {self.modalities}; "
                "unfreeze at least one encoder (requires_grad=True)."
            )
        self.heads_mode = heads
        self.heads = build_heads(
            heads, model, self.modalities, method=self.name, feature_dims=feature_dims,
            num_classes=num_classes, seed=self.seed,
        )  # fmt: skip
        if self.heads is not None:
            missing = "Build the balancer with heads='shared' to load a state saved without unimodal heads."
            self.add_state("heads", self.heads, missing=missing)
        # rows g_mm and g_m of every combined encoder (in `_params` order), weighted as the backward weights
        # the loss; sized at the first micro-batch, averaged over ranks
        self.add_stat("pareto_grads", reduce="mean")

    def parameters(self) -> Iterator[nn.Parameter]:
        """The separate unimodal heads' parameters (none with ``heads="shared"``)."""
        return self.heads.parameters() if self.heads is not None else iter(())

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's logits: the separate heads' (``heads="separate"``) or the model's."""
        return self.heads.logits(out) if self.heads is not None else out.unimodal_logits

    @staticmethod
    def _flat(grads: tuple[Tensor | None, ...], params: list[nn.Parameter]) -> Tensor:
        parts = [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
        return torch.cat(parts)

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """Return ``L_mm + sum_m L_m`` and record the per-loss encoder gradients."""
        l_mm = F.cross_entropy(out.logits, target)
        uni = self.unimodal_prediction(out)
        l_uni = {m: F.cross_entropy(uni[m], target) for m in self.modalities}
        total = l_mm + sum(l_uni.values())
        if not (torch.is_grad_enabled() and total.requires_grad):
            return total
        every = [p for ps in self._params.values() for p in ps]
        g_all = torch.autograd.grad(l_mm, every, retain_graph=True, allow_unused=True)
        mm_parts, uni_parts, start = [], [], 0
        for m, params in self._params.items():
            mm_parts.append(self._flat(g_all[start : start + len(params)], params))
            start += len(params)
            g_m = torch.autograd.grad(l_uni[m], params, retain_graph=True, allow_unused=True)
            if all(g is None for g in g_m):
                source = f"out.features[{m!r}]" if self.heads is not None else f"the unimodal logits of {m!r}"
                raise RuntimeError(
                    f"{source} do not depend on the encoder of {m!r}, so MMPareto cannot combine gradients. "
                    "Return them computed from the (non-detached) encoder output."
                )
            uni_parts.append(self._flat(g_m, params))
        grads = torch.cat([*mm_parts, *uni_parts]).view(2, -1)
        # added with the weight the user's backward gives the loss (1/k, an AMP scale, or none if skipped)
        total.register_hook(lambda c: self.accumulate("pareto_grads", grads.float() * c.detach().float()))
        return total

    def adjust_gradients(self) -> None:
        """Replace each encoder's gradient by the rescaled Pareto combination (inf/NaN steps: unchanged)."""
        if self.pareto_grads is None:  # no backward of this balancer's loss since the last step
            return
        combined = list(self._params)
        grads = torch.cat(
            [self._flat(tuple(p.grad for p in self._params[m]), self._params[m]) for m in combined]
        )
        acc = self.pareto_grads
        b_sum = acc[0] + acc[1]
        finite = self.step_finite & torch.isfinite(b_sum).all()
        f = grads.float().dot(b_sum) / b_sum.dot(b_sum).clamp_min(torch.finfo().tiny)
        sizes = [sum(p.numel() for p in self._params[m]) for m in combined]
        cos, w_mm, conflicts = [], [], []
        for m, g_mm, g_m in zip(combined, acc[0].split(sizes), acc[1].split(sizes), strict=True):
            w, conflict = pareto_step(g_mm, g_m)
            cos.append(F.cosine_similarity(g_mm, g_m, dim=0))
            w_mm.append(w[0])
            conflicts.append(conflict.float())
            new_flat = 2 * (w[0] * g_mm + w[1] * g_m)
            for p, new in zip(
                self._params[m], new_flat.split([p.numel() for p in self._params[m]]), strict=True
            ):
                if p.grad is None:
                    continue
                new = new.view_as(p)
                new_norm = new.norm()
                scale = torch.where(new_norm > 0, torch.maximum(f, p.grad.float().norm() / new_norm), 0.0)
                p.grad.copy_(torch.where(finite, new * (self.gamma * scale), p.grad))
        for name, values in (("cos", cos), ("w_mm", w_mm), ("conflict", conflicts)):
            self.record(name, torch.stack(values), keys=combined)
