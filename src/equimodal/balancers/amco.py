"""AMCo: adaptive mask co-optimization (Zhou, Liang, Zheng, Xuan and Kumada, "Adaptive Mask Co-Optimization
for Modal Dependence in Multimodal Learning", ICASSP 2023).

No code of the authors is public; the reference is BalanceBenchmark's (BalanceMM) reimplementation,
``balancemm/trainer/AMCo_trainer.py`` with ``BaseClassifierAMCoModel`` in
``balancemm/models/avclassify_model.py`` and the defaults of ``configs/trainer_config.yaml``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput
from .base import Balancer, Batch
from .registry import register_balancer


def amco_ratio(t: float, eps: float) -> float:
    """The masked share of the classes, ``p_t = sin(pi/2 * min(eps, t) / eps)`` (0 at ``t = 0``, 1 from
    ``t = eps`` on)."""
    return math.sin(math.pi / 2 * min(eps, t) / eps)


def logit_shares(logits: Sequence[Tensor]) -> Tensor:
    """Each modality's share of the probability mass, summed over the batch: the softmax is taken over all
    modalities' class logits side by side (``(B, M * C)``) and each modality's block is summed."""
    probs = torch.softmax(torch.cat([z.detach().float() for z in logits], dim=1), dim=1)
    return probs.reshape(probs.shape[0], len(logits), -1).sum(dim=(0, 2))


@register_balancer("amco")
class AMCo(Balancer):
    """AMCo (Zhou et al., ICASSP'23): mask random classes of the dependent modality's logits, plus unimodal CEs.

    A modality is *dependent* when its share of the probability mass exceeds ``sigma``: the softmax over all
    modalities' unimodal logits side by side, ``(B, M * C)``, summed over modality m's ``C`` columns and
    averaged over the batch (:func:`logit_shares`). The decision is taken on one optimizer step's (masked)
    unimodal logits and used in the next step; every modality starts each epoch independent. In a step,
    ``N = int(p_t C)`` classes, drawn at random (one draw per step, from the balancer's seeded generator,
    shared by the dependent modalities and the samples) are zeroed in each dependent modality's unimodal
    logits, ``p_t = sin(pi/2 * min(eps, t) / eps)`` (:func:`amco_ratio`) with ``t = rate * epoch * b``
    (``b`` the step's index in the epoch: BalanceMM's ``l_t``, reset each epoch and raised by
    ``epoch / 10`` per batch). The fused logits are the sum of the (masked) unimodal logits, and the loss
    is ``CE(fused) + uni_weight * sum_m CE(unimodal_m)``, the masked logits in both (BalanceMM
    ``AMCo_trainer.py`` ``training_step`` lines 139-155, the mask in ``train_loop`` lines 72-83, the
    logits in ``avclassify_model.py`` ``unimodality_calculate`` lines 357-384).

    Args:
        model: a model whose fused logits are the sum of its unimodal logits (the ``concat`` and ``sum``
            fusions; BalanceMM's concat head), since the masked logits replace them in the sum. Other
            equimodal fusions are refused at construction; a model without ``model.fusion`` is checked at
            the first ``loss()`` (one host read).
        sigma: the share above which a modality is dependent (BalanceMM 0.5; with ``M >= 3`` at most one
            modality can exceed 0.5).
        eps: the value of ``t`` at which the whole ramp is done (BalanceMM 0.3).
        rate: ``t`` grows by ``rate * epoch`` per step (BalanceMM's ``current_epoch / 10``: 0.1).
        uni_weight: weight of the unimodal CEs (BalanceMM 1).
        start_epoch, end_epoch: the window (BalanceMM ``modulation_starts`` 0, ``modulation_ends`` 80).
        seed: the mask draws.

    Defaults and what they mean: with ``rate=0.1`` and ``eps=0.3``, nothing is masked in epoch 0 (``t``
    stays 0), and from epoch 1 on ``p_t`` reaches 1 after ``ceil(3 / epoch)`` steps, so for the rest of
    each epoch a dependent modality's logits are zeroed entirely (it leaves the fused sum and its own CE
    is that of uniform logits). BalanceMM's ``U`` (512) and ``alpha`` options are read but never used; the
    paper's ``U`` is not available to us.

    Deviations from BalanceMM: its mask is built as ``(2, C)`` (``mask_t.expand(2, -1)``) and multiplies
    ``(B, C)`` logits, which fails for any batch of more than 2 samples once a modality is dependent; we
    use one ``(C,)`` row for the whole batch, what it meant. BalanceMM's AMCo model adds a trainable
    ``C x C`` linear layer (``linear_star``) on the fused logits, not reproduced (no model change here).
    Its masks come from NumPy's global generator; ours from the balancer's. Any ``M >= 2``; the shares
    are taken over the whole optimizer step (micro-batches summed, all-reduced under DDP). ``stats()``:
    ``mask_ratio/<m>`` (the share of classes masked in modality m's logits this step: 0 unless dependent),
    ``share/<m>`` and ``ratio`` (``p_t``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma: float = 0.5,
        eps: float = 0.3,
        rate: float = 0.1,
        uni_weight: float = 1.0,
        end_epoch: int | None = 80,
        **options: Any,
    ) -> None:
        super().__init__(model, end_epoch=end_epoch, **options)
        sigma = self.check_option("sigma", sigma, low=0, high=1)
        eps = self.check_option("eps", eps, low=0, open_low=True)
        rate = self.check_option("rate", rate, low=0)
        uni_weight = self.check_option("uni_weight", uni_weight, low=0)
        fusion = getattr(model, "fusion", None)
        name = getattr(type(fusion), "name", type(fusion).__name__)
        if getattr(model, "auxiliary_heads", False) or (fusion is not None and name not in ("concat", "sum")):
            raise ValueError(
                f"amco masks the unimodal logits and sums them into the fused logits, which needs a fusion whose "
                f"fused logits are that sum; this model's fusion is {name!r}. Use fusion='concat' or 'sum'."
            )
        self._verify_sum = fusion is None  # a model of the user's own: checked once, at the first loss()
        self.sigma, self.eps, self.rate, self.uni_weight = (
            float(sigma),
            float(eps),
            float(rate),
            float(uni_weight),
        )
        num = len(self.modalities)
        self.add_stat("shares", torch.zeros(num))  # probability share per modality, summed over samples
        self.add_stat("count", torch.zeros(()))
        self.add_state("dependent", torch.zeros(num, dtype=torch.bool))  # decided at the previous step
        self.add_state("epoch_step", 0)  # steps taken in the current epoch (BalanceMM's batch_idx)
        self.add_state("counted_epoch", -1)  # the epoch epoch_step counts
        self.mask: Tensor | None = (
            None  # this step's class mask (1 keeps, 0 masks), drawn at its first loss()
        )

    def set_epoch(self, epoch: int) -> None:
        """Start an epoch: the step count and the dependent flags restart (kept when a resumed run calls it
        again for the epoch it was in)."""
        super().set_epoch(epoch)
        if self.counted_epoch != self.epoch:
            self.counted_epoch, self.epoch_step = self.epoch, 0
            self.dependent = torch.zeros_like(self.dependent)

    @property
    def ratio(self) -> float:
        """This step's masked share of the classes, ``p_t`` (a host number: no device read)."""
        return amco_ratio(self.rate * self.epoch * self.epoch_step, self.eps)

    def _draw_mask(self, num_classes: int, device: torch.device) -> Tensor:
        count = int(self.ratio * num_classes)
        gen = self.generator(device)
        order = torch.randperm(num_classes, generator=gen, device=gen.device).to(device)
        return (order >= count).float()  # the classes at the first `count` random places are masked

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """CE of the fused sum of the masked unimodal logits plus the unimodal CEs."""
        uni = [out.unimodal_logits[m] for m in self.modalities]
        if self._verify_sum:  # one host read, at the first call only
            if not torch.allclose(out.logits.detach(), sum(z.detach() for z in uni), rtol=1e-4, atol=1e-5):
                raise ValueError(
                    "amco masks the unimodal logits and sums them into the fused logits, but this model's fused "
                    "logits are not the sum of its unimodal logits (its fusion is another). Use a model whose "
                    "fused logits are that sum (equimodal's fusion='concat' or 'sum')."
                )
            self._verify_sum = False
        if self.mask is None:
            self.mask = self._draw_mask(uni[0].shape[1], uni[0].device)
        dependent = self.dependent.to(uni[0].device)
        masks = [torch.where(dependent[i], self.mask, 1.0).to(z.dtype) for i, z in enumerate(uni)]
        masked = [z * k for z, k in zip(uni, masks, strict=True)]
        fused = out.logits + sum((k - 1) * z for z, k in zip(uni, masks, strict=True))
        self.accumulate("shares", logit_shares(masked))
        self.accumulate("count", torch.full((), float(target.shape[0]), device=self.count.device))
        own = sum(F.cross_entropy(z, target) for z in masked)
        return F.cross_entropy(fused, target) + self.uni_weight * own

    def adjust_gradients(self) -> None:
        """Decide the dependent modalities of the next step; count the step (gradients are not edited)."""
        mask = self.mask
        self.mask = None
        seen = self.count > 0
        share = self.shares / self.count.clamp_min(1.0)
        masked = torch.zeros_like(share) if mask is None else (1 - mask.mean()) * self.dependent.float()
        self.record("mask_ratio", masked)
        self.record("share", share)
        self.record("ratio", torch.full((), self.ratio, device=share.device))
        self.dependent = torch.where(self.step_finite & seen, share > self.sigma, self.dependent)
        self.epoch_step += 1
