"""Unimodal reference training: one modality's path trained alone inside the multimodal model."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import unknown_name_error
from ..types import MultimodalOutput
from .base import Balancer, Batch
from .registry import register_balancer


@register_balancer("unimodal")
class Unimodal(Balancer):
    """Train only ``modality``'s path: the loss is the CE of that modality's unimodal logits.

    A reference row, not a published balancer: the encoder of ``modality`` and its part of the
    head learn as a unimodal classifier, and the other encoders receive no gradient. With a
    splittable fusion (concat, sum, weighted) the unimodal logits are the exact per-modality
    share of the head. With an auxiliary-head fusion (FiLM, gated, attention) the modality's
    auxiliary head is applied to the *undetached* feature, so the encoder trains too.
    :meth:`predict` returns the modality's unimodal logits. Outside the ``start_epoch``/``end_epoch``
    window it falls back to plain joint training (and fused predictions).

    Args:
        model: a model following the contract.
        modality: the modality to train (a key of ``model.encoders``); required.
        start_epoch, end_epoch: window of unimodal training (default: all epochs).
        seed: unused.
    """

    unused_parameters = True  # the other encoders get no gradient (DDP needs to know)

    def __init__(
        self,
        model: nn.Module,
        *,
        modality: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        if modality is None:
            raise ValueError(
                f"The 'unimodal' balancer needs modality=, one of {self.modalities}; found none. "
                "Example: create_balancer('unimodal', model, modality=" + repr(self.modalities[0]) + ")."
            )
        if modality not in self.modalities:
            raise unknown_name_error("modality", str(modality), self.modalities)
        self.modality = modality
        self._aux_head: nn.Module | None = None
        if getattr(model, "auxiliary_heads", False):
            heads = getattr(getattr(model, "fusion", None), "aux", None)
            if not isinstance(heads, nn.ModuleDict) or modality not in heads:
                raise ValueError(
                    f"The model's unimodal logits come from auxiliary heads on detached features, so "
                    f"training them would not reach the {modality!r} encoder, and no `model.fusion.aux"
                    f"[{modality!r}]` head was found to apply to the undetached feature. Use a "
                    "splittable fusion (concat, sum, weighted) or an equimodal auxiliary-head fusion."
                )
            self._aux_head = heads[modality]

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """CE of the chosen modality's unimodal logits."""
        if self._aux_head is None:
            return F.cross_entropy(out.unimodal_logits[self.modality], target)
        if out.features is None:
            raise ValueError(
                "Unimodal training with an auxiliary-head fusion needs MultimodalOutput.features; found None."
            )
        return F.cross_entropy(self._aux_head(out.features[self.modality]), target)

    def auxiliary_loss(self, out: MultimodalOutput, target: Tensor) -> Tensor:
        """None while active: the objective trains the chosen modality's head itself, the others are unused."""
        return out.logits.new_zeros(())

    def fused_prediction(self, out: MultimodalOutput) -> Tensor:
        """The chosen modality's unimodal logits."""
        return out.unimodal_logits[self.modality]
