"""MMPareto (Wei & Hu, ICML 2024): Pareto-integrated gradients of the multimodal and unimodal losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_mean, is_distributed
from ..types import MultimodalOutput
from .base import Balancer, Batch
from .registry import register_balancer


def require_encoder_unimodal_logits(model: nn.Module, method: str) -> None:
    """Raise when the model's unimodal logits cannot carry gradient to the encoders.

    Fusions that cannot be split (FiLM, gated, attention) compute unimodal logits with auxiliary
    heads on *detached* features, so a unimodal loss never reaches its encoder.
    """
    if getattr(model, "auxiliary_heads", False):
        fusion = type(getattr(model, "fusion", model)).__name__
        raise ValueError(
            f"{method} trains the encoders through the unimodal logits, but this model's fusion ({fusion}) "
            "computes them with auxiliary heads on detached features (model.auxiliary_heads is True). "
            "Use a splittable fusion: fusion='concat', 'sum' or 'weighted'."
        )


def pareto_weights(g_mm: Tensor, g_uni: Tensor) -> Tensor:
    """Weights ``(w_mm, w_uni)`` of MMPareto for one encoder's flattened gradients.

    Non-conflicting gradients (``cos > 0``) get ``(1/2, 1/2)``; conflicting ones get the two-task
    min-norm (MGDA) solution ``w_mm = <g_uni - g_mm, g_uni> / ||g_mm - g_uni||^2`` clipped to [0, 1].
    A zero gradient is treated as non-conflicting, which is what the reference solver's 0.999/0.001
    clipping amounts to after the norm rescale (it never leaves the update at zero).
    """
    v11, v12, v22 = g_mm.dot(g_mm), g_mm.dot(g_uni), g_uni.dot(g_uni)
    w_mm = ((v22 - v12) / (v11 + v22 - 2 * v12).clamp_min(torch.finfo(g_mm.dtype).tiny)).clamp(0.0, 1.0)
    conflict = (v12 <= 0) & (v11 > 0) & (v22 > 0)
    w_mm = torch.where(conflict, w_mm, torch.full_like(w_mm, 0.5))
    return torch.stack([w_mm, 1 - w_mm])


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

    Deviations from the reference code (``MMPareto.py``): the unimodal logits are the fusion's exact
    per-modality terms (concat column blocks or sum heads), so ``L_m`` also trains the shared head
    weights (the reference has separate unimodal heads); any number of modalities; a zero gradient
    is treated as non-conflicting instead of going through the 0.999/0.001 clip (same update after
    rescaling); a zero combined gradient stays zero instead of becoming NaN. As in the reference the
    weights are computed per encoder and the norm rescale is applied per parameter tensor. Other loss
    terms added to the returned loss lose their encoder gradients (they are replaced). Under fp16
    autocast the per-loss gradients are taken from unscaled losses and may underflow (bf16 is safe); a
    step whose gradients are not finite is left untouched for GradScaler to skip. Under DDP the
    accumulated per-loss gradients are all-reduced (two extra encoder-sized all-reduces per step).

    Args:
        model: a model whose unimodal logits carry gradient to the encoders (not an auxiliary-head
            fusion).
        gamma: final gradient scale (1.5 in the reference code and BalanceBenchmark).
        start_epoch: first epoch of the method.
        end_epoch: last epoch of the method (``None``: no end).
        seed: unused (the method is deterministic); kept for a uniform signature.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        gamma: float = 1.5,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, start_epoch=start_epoch, end_epoch=end_epoch, seed=seed)
        require_encoder_unimodal_logits(model, "MMPareto")
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
        self._acc: dict[str, tuple[Tensor, Tensor]] = {}
        self._tensor_stats: dict[str, Tensor] = {}

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
        l_uni = {m: F.cross_entropy(out.unimodal_logits[m], target) for m in self.modalities}
        total = l_mm + sum(l_uni.values())
        if not (torch.is_grad_enabled() and total.requires_grad):
            return total
        every = [p for ps in self._params.values() for p in ps]
        g_all = torch.autograd.grad(l_mm, every, retain_graph=True, allow_unused=True)
        pending, start = {}, 0
        for m, params in self._params.items():
            g_mm = self._flat(g_all[start : start + len(params)], params)
            start += len(params)
            g_m = torch.autograd.grad(l_uni[m], params, retain_graph=True, allow_unused=True)
            if all(g is None for g in g_m):
                raise RuntimeError(
                    f"The unimodal logits of {m!r} do not depend on its encoder, so MMPareto cannot combine "
                    "gradients. Return unimodal logits computed from the (non-detached) encoder features."
                )
            pending[m] = (g_mm, self._flat(g_m, params))
        total.register_hook(lambda c: self._accumulate(pending, c))
        return total

    def _accumulate(self, pending: dict[str, tuple[Tensor, Tensor]], c: Tensor) -> None:
        """Add one micro-batch's gradients, weighted as the user's backward weights the loss."""
        c = c.detach().float()
        for m, (g_mm, g_m) in pending.items():
            if m in self._acc:
                self._acc[m][0].add_(g_mm.float() * c)
                self._acc[m][1].add_(g_m.float() * c)
            else:
                self._acc[m] = (g_mm.float() * c, g_m.float() * c)

    def adjust_gradients(self) -> None:
        """Replace each encoder's gradient by the rescaled Pareto combination (inf/NaN steps are skipped)."""
        acc, self._acc = self._acc, {}
        every = [p for ps in self._params.values() for p in ps]
        if not acc or not self.grads_finite(every):
            return
        if is_distributed():
            flat = all_reduce_mean(torch.cat([g for m in acc for g in acc[m]]))
            sizes = [g.numel() for m in acc for g in acc[m]]
            parts = iter(flat.split(sizes))
            acc = {m: (next(parts), next(parts)) for m in acc}
        grads = {m: self._flat(tuple(p.grad for p in self._params[m]), self._params[m]) for m in acc}
        b_sum = torch.cat([acc[m][0] + acc[m][1] for m in acc])
        if not bool(torch.isfinite(b_sum).all()):
            return
        f = torch.cat(list(grads.values())).float().dot(b_sum) / b_sum.dot(b_sum).clamp_min(
            torch.finfo().tiny
        )
        for m, (g_mm, g_m) in acc.items():
            w = pareto_weights(g_mm, g_m)
            self._tensor_stats[f"cos/{m}"] = F.cosine_similarity(g_mm, g_m, dim=0)
            self._tensor_stats[f"w_mm/{m}"] = w[0]
            new_flat = 2 * (w[0] * g_mm + w[1] * g_m)
            sizes = [p.numel() for p in self._params[m]]
            for p, new in zip(self._params[m], new_flat.split(sizes), strict=True):
                if p.grad is None:
                    continue
                new = new.view_as(p)
                new_norm = new.norm()
                scale = torch.where(new_norm > 0, torch.maximum(f, p.grad.float().norm() / new_norm), 0.0)
                p.grad.copy_(new * (self.gamma * scale))

    def stats(self) -> dict[str, float]:
        """Per-modality cosine of ``g_mm`` and ``g_m`` and the weight of ``g_mm`` at the last step."""
        return {k: float(v) for k, v in self._tensor_stats.items()}
