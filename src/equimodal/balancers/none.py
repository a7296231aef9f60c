"""Plain joint training: cross-entropy on the fused logits, no rebalancing."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Balancer
from .registry import register_balancer


@register_balancer("none")
class JointTraining(Balancer):
    """Identity balancer: ``loss`` is CE on the fused logits and ``before_step`` leaves gradients alone.

    The smallest complete example of the contract; every other balancer is compared against it. With
    ``monitor=True`` it also reports, every optimizer step, each modality's encoder gradient norm
    (``grad_norm/<m>``) and its share of the squared norms (``grad_share/<m>``), leaving the gradients
    untouched (one norm pass and one host sync per step); ``equimodal diagnose`` uses it.

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
        start_epoch: int = 0,
        end_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, start_epoch=start_epoch, end_epoch=end_epoch, seed=seed)
        self.monitor = bool(monitor)
        self._norms: Tensor | None = None

    def adjust_gradients(self) -> None:
        """With ``monitor``: record each encoder's gradient norm (the gradients are not changed)."""
        if not self.monitor:
            return
        norms = []
        for m in self.modalities:
            grads = [p.grad for p in self.encoder_params(m) if p.grad is not None]
            norms.append(torch.stack(torch._foreach_norm(grads)).norm() if grads else torch.zeros(()))
        self._norms = torch.stack([n.float().to(norms[0].device) for n in norms])

    def stats(self) -> dict[str, float]:
        """``grad_norm/<m>`` and ``grad_share/<m>`` of the last step (with ``monitor``), else ``{}``."""
        if self._norms is None:
            return {}
        norms = self._norms.tolist()
        total = sum(n * n for n in norms) or 1.0
        out: dict[str, Any] = {f"grad_norm/{m}": n for m, n in zip(self.modalities, norms, strict=True)}
        out.update({f"grad_share/{m}": n * n / total for m, n in zip(self.modalities, norms, strict=True)})
        return out
