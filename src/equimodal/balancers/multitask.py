"""The multitask baseline: every encoder keeps a loss of its own while the fused loss trains the model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput
from .base import Balancer, Batch
from .heads import own_heads
from .registry import BALANCERS, register_balancer


@register_balancer("multitask")
class Multitask(Balancer):
    """The multitask baseline: the fused CE plus each modality's CE through a linear head of its own.

    ``L = CE(fused, y) + sum_m w_m CE(head_m(z_m), y)``

    A known baseline, not a method of equimodal's: it is MMPareto's "uniform baseline" (Wei & Hu, ICML
    2024; official code ``code/uniform_baseline.py``: ``loss_mm + loss_a + loss_v`` with separate heads,
    ``w = 1``, the default here), InfoReg's "Joint training*" (Huang et al., CVPR 2025), MCUT's "naive
    weight" and the warm-up of Data Remixing (``w = 0.5``). ``head_m`` is a linear head of the balancer's
    own on modality m's pooled features (not detached; it is used only for this loss and for the reported
    per-modality accuracy).

    ``own_signal`` is this baseline with ``w = 2``, under the name equimodal first gave it (it reached it
    from its own diagnosis, ``docs/diagnose.md``: in joint training the modality that fits the training
    data first drives the fused loss down, and the fused loss stops teaching the other encoders). The
    weight 2 was chosen on validation accuracy over six built-in tasks; on real data where joint training
    already beats the late-fusion ensemble it lost to joint training (see ``docs/balancers.md``).

    Two options of equimodal's go further and are off by default: ``adapt="starved"`` multiplies each
    ``w_m`` by ``(CE_m / CE_fused)^power`` (detached, capped at ``max_weight``), close to loss-ratio
    weightings such as DWA: the more the fused loss has fallen below what modality m's own head still
    misses, the more its own loss counts. It gained 6 pp on AVD-hard but, where the fused training loss
    approaches zero (mfeat), the weights sit at the cap and training diverged; use it only where joint
    training stays far from fitting the training set, and check it on validation data. ``normalize`` in
    ``[0, 1]`` equalises the encoders' gradient norms towards their mean (per optimizer step,
    ``g_m *= (mean_k n_k / n_m)^normalize`` with ``n`` the running norms, each factor clamped to
    ``[1 / max_scale, max_scale]``), close to GradNorm's aim: per-modality adaptive step sizes for SGD.

    Args:
        model: a contract model whose output carries ``features`` (pooled, not detached).
        weight: the unimodal losses' weight ``w`` (the base weight with ``adapt="starved"``).
        adapt: ``"none"`` (fixed weights) or ``"starved"`` (weights grow as the fused loss starves them).
        power: exponent of the ``"starved"`` factor.
        max_weight: cap of the ``"starved"`` factor.
        normalize: strength of the per-encoder gradient-norm equalisation (0: off).
        momentum: EMA momentum of the running gradient norms.
        max_scale: the equalisation's factors are clamped to ``[1 / max_scale, max_scale]``.
        feature_dims, num_classes: sizes for the heads, for models that declare neither.
        start_epoch, end_epoch: the method's window; seed: the heads' initialisation.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        weight: float = 1.0,
        adapt: Literal["none", "starved"] = "none",
        power: float = 1.0,
        max_weight: float = 5.0,
        normalize: float = 0.0,
        momentum: float = 0.9,
        max_scale: float = 4.0,
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        weight = self.check_option("weight", weight, low=0)
        power = self.check_option("power", power, low=0)
        max_weight = self.check_option("max_weight", max_weight, low=1)
        max_scale = self.check_option("max_scale", max_scale, low=1)
        adapt = self.check_option("adapt", adapt, choices=("none", "starved"))
        normalize = self.check_option("normalize", normalize, low=0, high=1)
        momentum = self.check_option("momentum", momentum, low=0, high=1, open_high=True)
        self.weight, self.adapt, self.power, self.max_weight = (
            float(weight),
            adapt,
            float(power),
            float(max_weight),
        )
        self.normalize, self.momentum, self.max_scale = float(normalize), float(momentum), float(max_scale)
        self.heads = own_heads(self, model, feature_dims=feature_dims, num_classes=num_classes)
        self.add_state("grad_norms", torch.zeros(len(self.modalities)))  # running encoder gradient norms
        self.add_state("norm_steps", torch.zeros((), dtype=torch.long))  # steps averaged into them

    def parameters(self) -> Iterator[nn.Parameter]:
        """The unimodal heads' parameters (put them in the optimizer)."""
        return self.heads.parameters()

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The fused CE plus the weighted unimodal CEs of the balancer's own heads."""
        fused = F.cross_entropy(out.logits, target)
        uni = torch.stack([F.cross_entropy(self.heads.logit(out, m), target) for m in self.modalities])
        w = torch.full_like(uni, self.weight)
        if self.adapt == "starved":
            ratio = (uni.detach() / fused.detach().clamp_min(1e-6)).pow(self.power)
            w = w * ratio.clamp(max=self.max_weight)
        self.record("w", w)
        self.record("uni_loss", uni)
        self.record("fused_loss", fused)
        return fused + (w * uni).sum()

    def adjust_gradients(self) -> None:
        """With ``normalize``: scale each encoder's gradients towards the mean running gradient norm."""
        if self.normalize <= 0:
            return
        grads = {m: [p.grad for p in self.encoder_params(m) if p.grad is not None] for m in self.modalities}
        if not all(grads.values()):
            return
        norms = torch.stack([torch.stack(torch._foreach_norm(g)).norm() for g in grads.values()]).float()
        # an overflow step (left to the GradScaler) keeps the running norms: the base class restores them
        ema = self.momentum * self.grad_norms + (1 - self.momentum) * norms
        self.grad_norms = torch.where(self.norm_steps > 0, ema, norms)
        self.norm_steps = self.norm_steps + 1
        scale = (self.grad_norms.mean() / self.grad_norms.clamp_min(1e-12)).pow(self.normalize)
        # bounded: unbounded, a diverging encoder raises the mean norm and so every other encoder's scale
        # (on mfeat fac+mor at weight 2, starved, normalize 0.5 the scales reached 10^2 and the loss inf)
        scale = torch.where(self.step_finite, scale.clamp(1.0 / self.max_scale, self.max_scale), 1.0)
        for i, m in enumerate(self.modalities):
            torch._foreach_mul_(grads[m], scale[i].to(grads[m][0].dtype))
        self.record("scale", scale)

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's own head (the reported per-modality accuracy while active)."""
        return self.heads.logits(out)


BALANCERS.alias(
    "own_signal",
    "multitask",
    "the multitask baseline with weight 2, under the name equimodal first gave it",
    weight=2.0,
)
