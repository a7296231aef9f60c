"""Plain joint training: cross-entropy on the fused logits, no rebalancing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Balancer
from .registry import register_balancer


@register_balancer("none")
class JointTraining(Balancer):
    """Identity balancer: ``loss`` is CE on the fused logits and ``before_step`` leaves gradients alone.

    The smallest complete example of the contract; every other balancer is compared against it. With
    ``monitor=True`` it also reports, every optimizer step, each modality's encoder gradient norm
    (``grad_norm/<m>``) and its share of the squared norms (``grad_share/<m>``), leaving the gradients
    untouched (one norm pass per step, recorded on the device); ``equimodal diagnose`` uses it.

    Args:
        model: a model following the contract.
        monitor: log the encoders' gradient norms (default off: no cost).
        start_epoch, end_epoch, seed: as for every balancer (unused: nothing changes outside a window).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        monitor: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        self.monitor = bool(monitor)

    def adjust_gradients(self) -> None:
        """With ``monitor``: record each encoder's gradient norm and share (the gradients are not changed)."""
        if not self.monitor:
            return
        norms = []
        for m in self.modalities:
            grads = [p.grad for p in self.encoder_params(m) if p.grad is not None]
            norms.append(torch.stack(torch._foreach_norm(grads)).norm() if grads else torch.zeros(()))
        norms_t = torch.stack([n.float().to(norms[0].device) for n in norms])
        squares = norms_t.double().square()
        total = squares[0]
        for sq in squares[1:]:  # summed in order, in float64, as Python's sum() of the floats would be
            total = total + sq
        self.record("grad_norm", norms_t)
        self.record("grad_share", squares / torch.where(total == 0, torch.ones_like(total), total))
