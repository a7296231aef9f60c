"""CML (Ma, Zhang, Zhang, Wu, Fu, Zhou & Hu, "Calibrating Multimodal Learning", ICML 2023): confidence
must not rise when a modality is removed."""

from __future__ import annotations

import random
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput, output_features
from .base import Balancer, Batch
from .registry import register_balancer

Subsets = Literal["chain", "each"]
Reduction = Literal["mean", "sum"]
Mask = Literal["auto", "features", "logits"]


def confidence(logits: Tensor) -> Tensor:
    """Per-sample confidence: the largest softmax probability (that of the predicted class)."""
    return F.softmax(logits, dim=1).max(dim=1).values


def confidence_hinge(conf_subset: Tensor, conf_larger: Tensor, reduction: Reduction = "mean") -> Tensor:
    """``max(0, agg_i (conf_subset_i - conf_larger_i))``, ``agg`` the batch sum or mean (hinge of the batch
    aggregate, as BalanceBenchmark's ``conf_loss``)."""
    gap = conf_subset - conf_larger
    return F.relu(gap.sum() if reduction == "sum" else gap.mean())


@register_balancer("cml")
class CML(Balancer):
    """CML (Ma et al., ICML 2023): CE plus a hinge on confidence that rises when modalities are removed.

    With modalities removed by zeroing their features before the fusion head, the loss of a batch is

    ``L = (CE(o_0) + sum_k CE(o_k)) / M + lam * sum_k max(0, mean_i conf(o_k)_i - conf(o_{k-1})_i)``

    where ``o_0`` are the full fused logits, ``conf`` is the largest softmax probability and, with
    ``subsets="chain"`` (default), ``o_k`` (``k = 1 .. M-1``) removes one more modality than ``o_{k-1}``,
    in a random order redrawn every optimizer step: for two modalities, one of them is removed and the
    single-modality confidence may not exceed the fused one. ``subsets="each"`` compares each of the M
    leave-one-out subsets with the full logits instead (CE terms likewise, divided by ``M + 1``).

    Reference: the authors' code was not found; this follows BalanceBenchmark (GeWu-Lab/BalanceBenchmark
    ``balancemm/trainer/CML_trainer.py``): ``conf_loss`` (lines 19-22) is ``max(0, sum(conf_x - conf))``
    with ``conf`` from ``torch.max(softmax(.))`` (lines 141-145, 187-191); ``training_step`` (lines
    182-201) removes modalities one at a time from an order shuffled each epoch (line 67), taking
    ``out_p = out_s - unimodal[m] + bias / M`` (the concat head with modality m's features zeroed, since
    its unimodal logits carry ``bias / M``; ``avclassify_model.py`` ``unimodality_calculate``), adds
    ``CE(out_p)`` to the loss and compares each subset with the previous one, then takes
    ``loss / M + lam * sum``. Here the masked logits are ``model.fusion(features with m zeroed)``: the
    same numbers for the concat head, and defined for every fusion (one extra fusion-head forward per
    subset, no extra encoder pass). A model without ``model.fusion`` whose fused logits are the sum of its
    unimodal logits (the contract's additive heads) can use ``mask="logits"``: the removed modalities'
    unimodal logits are subtracted from the fused ones (their bias share goes with them).

    Args:
        model: a contract model with ``model.fusion(features) -> (fused, unimodal)`` (a
            ``MultimodalClassifier``) and ``features`` in its output, or additive unimodal logits.
        lam: ``lambda``, the hinge's weight. Default 0.1 (BalanceBenchmark ``trainer_config.yaml``).
        subsets: ``"chain"`` (default, BalanceBenchmark) or ``"each"`` (above).
        reduction: the batch aggregate inside the hinge: ``"mean"`` (default) or ``"sum"``
            (BalanceBenchmark's, which makes the term grow with the batch size: ``"sum"`` at batch B is
            ``"mean"`` with ``lam * B``).
        mask: how a modality is removed: ``"features"`` (zeroed before ``model.fusion``), ``"logits"``
            (its unimodal logits subtracted from the fused ones; only for additive heads) or ``"auto"``
            (default: ``"features"`` where the model has a ``fusion`` module, else ``"logits"``, refused
            for auxiliary-head models, whose unimodal logits are not terms of the fused ones).
        start_epoch, end_epoch: the window (default: always; BalanceBenchmark's config runs every
            method in epochs 0-80, ``end_epoch=80``); seed: the removal order.

    Deviations from BalanceBenchmark: the hinge's aggregate is the batch mean by default, not the sum
    (``reduction="sum"`` restores it), so ``lam`` means the same at every batch size and k accumulated
    micro-batches equal one larger batch (each micro-batch applies its own hinge,
    ``micro_batch_statistics``); the removal order is redrawn every optimizer step from the seeded
    generator (theirs once per epoch with Python's unseeded ``random``), identical on every DDP rank;
    any ``M >= 2`` (theirs: 2 or 3, with ``bias / 3`` hard-coded for 3). Their ``conf_loss`` also builds
    a "sign" mask that it never uses; it is not reproduced. At HEAD their trainer calls the renamed
    ``Unimodality_Calculate`` and fails. ``stats()``: ``hinge`` (the summed hinge), ``acting`` (the
    fraction of compared subsets whose hinge is positive), ``conf_gap`` (mean confidence of the subsets
    minus that of the full logits).
    """

    micro_batch_statistics = True  # the hinge is applied to each micro-batch's aggregate

    def __init__(
        self,
        model: nn.Module,
        *,
        lam: float = 0.1,
        subsets: Subsets = "chain",
        reduction: Reduction = "mean",
        mask: Mask = "auto",
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        lam = self.check_option("lam", lam, low=0)
        subsets = self.check_option("subsets", subsets, choices=("chain", "each"))
        reduction = self.check_option("reduction", reduction, choices=("mean", "sum"))
        mask = self.check_option("mask", mask, choices=("auto", "features", "logits"))
        has_fusion = isinstance(getattr(model, "fusion", None), nn.Module)
        if mask == "auto":
            mask = "features" if has_fusion else "logits"
        if mask == "features" and not has_fusion:
            raise ValueError(
                f"Balancer 'cml' with mask='features' zeroes a modality's features before the fusion head, so "
                f"it needs `model.fusion` (a module mapping {{modality: features}} to (fused, unimodal) logits, "
                f"as in equimodal.models.MultimodalClassifier); {type(model).__name__} has none. Use "
                "mask='logits' if its fused logits are the sum of its unimodal logits."
            )
        if mask == "logits" and getattr(model, "auxiliary_heads", False):
            raise ValueError(
                "Balancer 'cml' with mask='logits' subtracts a modality's unimodal logits from the fused ones, "
                "but this model's fusion computes them with auxiliary heads on detached features "
                "(model.auxiliary_heads is True): use mask='features'."
            )
        self.lam, self.subsets, self.reduction, self.mask = lam, subsets, reduction, mask

    def removal_order(self) -> list[str]:
        """This step's order of removal (``"chain"``), from the seed and the step count: no host read."""
        order = list(self.modalities)
        random.Random(self.seed * 1_000_003 + self.num_steps).shuffle(order)
        return order

    def masks(self) -> list[list[str]]:
        """The modalities removed in each compared subset, in order."""
        if self.subsets == "each":
            return [[m] for m in self.modalities]
        order = self.removal_order()
        return [order[: k + 1] for k in range(len(order) - 1)]

    def subset_logits(self, out: MultimodalOutput, removed: list[str]) -> Tensor:
        """The fused logits without ``removed``: their features zeroed, or their unimodal logits subtracted."""
        if self.mask == "logits":
            return out.logits - sum(out.unimodal_logits[m] for m in removed)
        features = output_features(out, "cml zeroes a modality's features before the fusion head")
        feats = {m: torch.zeros_like(z) if m in removed else z for m, z in features.items()}
        fused = self.model.fusion(feats)
        return fused[0] if isinstance(fused, tuple) else fused

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The averaged CEs of the full and masked logits plus ``lam`` times the confidence hinges."""
        subsets = self.masks()
        logits = [self.subset_logits(out, r) for r in subsets]
        confs = [confidence(o) for o in [out.logits, *logits]]
        ces = [F.cross_entropy(o, target) for o in [out.logits, *logits]]
        if self.subsets == "chain":
            pairs = [(confs[k + 1], confs[k]) for k in range(len(subsets))]
        else:
            pairs = [(c, confs[0]) for c in confs[1:]]
        hinges = torch.stack([confidence_hinge(s, big, self.reduction) for s, big in pairs])
        gap = torch.stack([(s - confs[0]).mean() for s, _ in pairs]).mean()
        self.record("hinge", hinges.detach().sum())
        self.record("acting", (hinges.detach() > 0).float().mean())
        self.record("conf_gap", gap.detach())
        return torch.stack(ces).sum() / len(ces) + self.lam * hinges.sum()
