"""UME: Uni-Modal Ensemble (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning",
ICML 2023): every encoder trained alone with a head of its own; the prediction averages the members."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput
from .base import Balancer, Batch
from .heads import own_heads
from .registry import register_balancer

Combine = Literal["probs", "logits"]


def ensemble_logits(logits: Mapping[str, Tensor], combine: Combine) -> Tensor:
    """The ensemble's evaluation logits from each member's logits.

    ``"probs"``: ``log(mean_m softmax(o_m))``, the log of the averaged probabilities (its argmax is the
    averaged probabilities' argmax and its CE the ensemble's negative log-likelihood). ``"logits"``:
    ``mean_m o_m``.
    """
    stacked = torch.stack(list(logits.values()))
    if combine == "logits":
        return stacked.mean(0)
    return torch.logsumexp(F.log_softmax(stacked.float(), dim=-1), dim=0) - math.log(stacked.shape[0])


@register_balancer("ume")
class UME(Balancer):
    """UME (Du et al., ICML 2023): the ensemble of unimodal models, trained inside one run.

    ``L = sum_m CE(head_m(z_m), y)``: each encoder learns only from the CE of a linear head of its own on its
    pooled feature ``z_m = out.features[m]``. The fused head receives no loss and no modality receives
    gradient from another (no shared parameter: the sum gives each member exactly the gradient of its own
    CE, as M separately trained unimodal models). :meth:`predict` averages the members:
    ``combine="probs"`` (default) returns ``log mean_m softmax(head_m(z_m))``, ``"logits"`` the mean of the
    members' logits; :meth:`predict_unimodal` returns each member's logits.

    Heads of the balancer's own (:class:`~equimodal.balancers.heads.UnimodalHeads`), not the fusion head's
    column blocks: a concat head's blocks share its bias, so the members would not be independent, and
    FiLM/gated/attention fusions cannot be split (their unimodal logits come from heads on detached
    features, which would never train the encoders). Put ``balancer.parameters()`` in the optimizer.

    Source: the paper (no official code is known, and BalanceBenchmark has no UME). The paper trains the
    unimodal models separately; here they train side by side in one run, on the same batches, which for
    models without shared parameters (and no batch-size-dependent coupling) is the same training with the
    same data order. Whether the paper averages probabilities or logits was not verified here (the paper's
    method section could not be read); ``combine`` chooses.

    Args:
        model: a contract model whose output carries ``features`` (pooled, not detached).
        combine: ``"probs"`` or ``"logits"`` (see above).
        feature_dims, num_classes: sizes of the heads, for models that declare neither.
        start_epoch, end_epoch: the window (outside it: joint training); seed: the heads' initialisation.
    """

    unused_parameters = True  # the fusion head gets no gradient (DDP needs to know)

    def __init__(
        self,
        model: nn.Module,
        *,
        combine: Combine = "probs",
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        combine = self.check_option("combine", combine, choices=("probs", "logits"))
        self.combine: Combine = combine
        self.heads = own_heads(self, model, feature_dims=feature_dims, num_classes=num_classes)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The members' heads (put them in the optimizer)."""
        return self.heads.parameters()

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The sum of the members' CEs (the fused logits are not used)."""
        logits = self.heads.logits(out)
        uni = torch.stack([F.cross_entropy(logits[m], target) for m in self.modalities])
        ensemble = F.cross_entropy(
            ensemble_logits({m: v.detach() for m, v in logits.items()}, self.combine), target
        )
        self.record("uni_loss", uni)
        self.record("ensemble_loss", ensemble)
        return uni.sum()

    def fused_prediction(self, out: MultimodalOutput) -> Tensor:
        """The ensemble of the members (see ``combine``)."""
        return ensemble_logits(self.heads.logits(out), self.combine)

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each member's logits."""
        return self.heads.logits(out)
