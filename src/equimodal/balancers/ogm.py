"""OGM and OGM-GE: on-the-fly gradient modulation (Peng et al., "Balanced Multimodal Learning via
On-the-fly Gradient Modulation", CVPR 2022).

The pure math (:func:`true_class_scores`, :func:`score_ratios`, :func:`ogm_coefficients`) is kept in
small functions; PMR reuses the first two. Like AGM and MSLR, OGM works by multiplying gradients
(``scales_gradients``), so :meth:`~equimodal.Balancer.check_optimizer` warns under adaptive optimizers.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..types import MultimodalOutput
from .base import Balancer, Batch
from .registry import register_balancer

log = logging.getLogger(__name__)

Reference = Literal["mean", "min", "sum", "max"]
REFERENCES = ("mean", "min", "sum", "max")
_MODULATE = ("weights", "conv", "all")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def true_class_scores(logits: Tensor, target: Tensor) -> Tensor:
    """Sum over the batch of the softmax probability of the true class, ``sum_i softmax(o)_{i, y_i}``."""
    return torch.softmax(logits.detach().float(), dim=1).gather(1, target[:, None]).sum()


def score_ratios(scores: Tensor, reference: str = "mean") -> Tensor:
    """Each modality's score over a reference built from the *other* modalities' scores.

    ``"mean"``: their mean (ours); ``"min"``: their minimum (BalanceBenchmark's 3-modality OGM, whose
    coefficients this reproduces); ``"sum"``: their sum (the 3-modality OGM of the official MLA code);
    ``"max"``: their maximum (ours). For two modalities every reference gives ``rho_a = s_a / s_v`` and
    ``rho_v = s_v / s_a``, the rule of the OGM reference code.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, found {reference!r}.")
    m = scores.shape[0]
    j = torch.arange(m - 1, device=scores.device)[None, :]
    others = scores[j + (j >= torch.arange(m, device=scores.device)[:, None]).long()]  # row i: all but i
    if reference == "mean":
        ref = others.mean(1)
    elif reference == "min":
        ref = others.amin(1)
    elif reference == "sum":
        ref = others.sum(1)
    else:
        ref = others.amax(1)
    return scores / ref.clamp_min(torch.finfo(scores.dtype).tiny)


def ogm_coefficients(ratios: Tensor, alpha: float) -> Tensor:
    """OGM coefficients: ``k = 1 - tanh(alpha * relu(rho))`` where ``rho > 1`` (dominant), else 1.

    As in the reference code the argument is ``relu(rho)``, not ``rho - 1``, so ``k`` jumps to
    ``1 - tanh(alpha)`` as ``rho`` crosses 1.
    """
    return torch.where(ratios > 1, 1 - torch.tanh(alpha * torch.relu(ratios)), torch.ones_like(ratios))


@register_balancer("ogm")
class OGM(Balancer):
    """OGM (Peng et al., CVPR'22): shrink the dominant modality's encoder gradients by ``1 - tanh(alpha rho)``.

    Per optimizer step, ``s_m = sum_i softmax(o_m)_{i,y_i}`` is accumulated over the micro-batches
    (all-reduced under DDP), ``rho_m = s_m / ref_{k != m} s_k`` and every modality with ``rho_m > 1``
    has its selected encoder gradients multiplied by ``k_m`` (see :func:`ogm_coefficients`); the
    others keep ``k = 1``. ``"ogm_ge"`` adds Gaussian noise ``N(0, std(grad) + 1e-8)`` to the same
    tensors of every modality (std of the unscaled gradient, a fresh std per tensor), drawn from a
    generator seeded identically on all ranks. Under an adaptive optimizer (Adam, ...) the scaling
    mostly cancels; :meth:`check_optimizer` warns.

    Args:
        model: a model following the contract.
        alpha: modulation strength. Default 0.8, the CREMA-D value of the authors' README
            (0.1 for VGGSound; BalanceBenchmark uses 0.3).
        reference: for ``M >= 3``, what ``s_m`` is compared with (the OGM authors' code has two
            modalities only; all choices give their rule for ``M = 2``):

            - ``"mean"`` (default, ours): the mean of the other scores; every modality stronger than
              the average of the others is slowed.
            - ``"min"``: the minimum of the other scores, BalanceBenchmark's 3-modality OGM (it
              divides by the minimum over all modalities, itself included, which gives the same
              coefficients; its cosine-of-logits score for ``M = 3`` is not reproduced).
            - ``"sum"``: the sum of the other scores, the 3-modality OGM of the official MLA code
              (Zhang et al., CVPR'24); at most one modality can then have ``rho > 1``. That code
              also slows the last modality when none exceeds 1 (a leftover of the 2-modality
              if/else); here ``rho > 1`` is required, as for every other modality.
            - ``"max"``: the maximum of the other scores (ours); only a modality that beats all
              others is slowed.
        modulate: which encoder gradients are modulated. ``"weights"`` (default): every encoder
            parameter with two or more dimensions (conv kernels and linear weights, not biases or
            norm scales); ``"conv"``: only Conv1d/2d/3d weights, found by module type (the reference
            code touches 4-D conv weights only, which silently does nothing for MLP or
            transformer encoders, hence our default); ``"all"``: every trainable encoder parameter.
        start_epoch: first modulated epoch (reference ``modulation_starts`` 0).
        end_epoch: last modulated epoch, inclusive (reference ``modulation_ends`` 50).
        seed: seed of the noise generator (OGM-GE).

    Deviations from the reference code: any ``M >= 2`` (``reference`` above); the modulated set
    (``modulate``; ``"conv"`` is the reference's); scores summed over gradient-accumulation
    micro-batches and all-reduced under DDP; a step with non-finite gradients (AMP overflow) is left
    untouched (``k = 1``, no noise; OGM-GE's generator still advances). No host read per step: ``k`` and
    ``rho`` are recorded on the device (``stats()``: ``k/<m>``, ``ratio/<m>``).
    """

    scales_gradients: ClassVar[bool] = True

    gradient_noise: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float = 0.8,
        reference: Reference = "mean",
        modulate: Literal["weights", "conv", "all"] = "weights",
        end_epoch: int | None = 50,
        **options: Any,
    ) -> None:
        super().__init__(model, end_epoch=end_epoch, **options)
        alpha = self.check_option("alpha", alpha, low=0, open_low=True, hint="the paper uses 0.1-0.8")
        reference = self.check_option("reference", reference, choices=REFERENCES)
        modulate = self.check_option("modulate", modulate, choices=_MODULATE)
        self.alpha = float(alpha)
        self.reference = reference
        self.modulate = modulate
        self.targets: dict[str, list[nn.Parameter]] = {m: self._select(m) for m in self.modalities}
        self.add_stat("scores")  # each modality's true-class score, summed over the step's micro-batches

    def _select(self, modality: str) -> list[nn.Parameter]:
        encoder = self.model.encoders[modality]
        if self.modulate == "conv":
            params = [mod.weight for mod in encoder.modules() if isinstance(mod, _CONV)]
        elif self.modulate == "weights":
            params = [p for p in encoder.parameters() if p.dim() >= 2]
        else:
            params = list(encoder.parameters())
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError(
                f"OGM found no parameter to modulate in the encoder of modality {modality!r} with "
                f"modulate={self.modulate!r}. Use modulate='weights' (or 'all') for encoders without "
                "convolutions, or make the encoder trainable."
            )
        return params

    def observe(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> None:
        """Add each modality's true-class score."""
        self.accumulate(
            "scores",
            torch.stack([true_class_scores(out.unimodal_logits[m], target) for m in self.modalities]),
        )

    def coefficients(self, ratios: Tensor) -> Tensor:
        """Each modality's gradient coefficient from its score ratio (:func:`ogm_coefficients`; a variant,
        such as ``ogm_plus``, overrides this alone)."""
        return ogm_coefficients(ratios, self.alpha)

    def adjust_gradients(self) -> None:
        """Scale (and for OGM-GE, perturb) the selected encoder gradients once per optimizer step."""
        if self.scores is None:  # no loss() since the last step
            return
        finite = self.step_finite
        ratios = score_ratios(self.scores, self.reference)
        coeffs = torch.where(finite, self.coefficients(ratios), 1.0)  # k = 1: as if skipped
        gate = finite.float()
        for i, m in enumerate(self.modalities):
            for p in self.targets[m]:
                if p.grad is None:
                    continue
                noise = self._noise(p.grad, gate) if self.gradient_noise else None
                p.grad.mul_(coeffs[i])
                if noise is not None:
                    p.grad.add_(noise)
        self.record("k", coeffs)
        self.record("ratio", ratios)

    def _noise(self, grad: Tensor, gate: Tensor) -> Tensor:
        """``N(0, std(grad) + 1e-8)`` noise of ``grad``'s shape from the balancer's seeded generator, times
        ``gate`` (1, or 0 in a non-finite step)."""
        std = grad.std() if grad.numel() > 1 else grad.new_zeros(())
        gen = self.generator(grad.device)
        noise = torch.randn(grad.shape, generator=gen, device=gen.device, dtype=grad.dtype)
        return noise.to(grad.device).mul_((std + 1e-8) * gate)


@register_balancer("ogm_ge")
class OGMGE(OGM):
    """OGM-GE (Peng et al., CVPR'22): OGM plus generalisation-enhancing Gaussian gradient noise.

    Same options and defaults as :class:`OGM`; the noise ``N(0, std(grad) + 1e-8)`` is added to the
    modulated gradients of every modality (dominant or not) while the method is active.
    """

    gradient_noise = True
