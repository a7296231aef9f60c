"""Gradient-Blending (Wang, Tran & Feiszli, CVPR 2020): head loss weights from the OGR of each head."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_grads, all_reduce_sum
from ..types import MultimodalOutput
from .base import Balancer, Batch, EpochData
from .epoch_data import Split
from .heads import HeadsMode, UnimodalHeads, build_heads
from .registry import register_balancer

log = logging.getLogger(__name__)


def blend_weights(
    train_start: Tensor,
    held_start: Tensor,
    train_end: Tensor,
    held_end: Tensor,
    estimator: Literal["delta", "multibench"] = "delta",
) -> Tensor:
    """Normalised G-Blending weights from per-head mean losses (Wang et al., CVPR 2020).

    ``"delta"``: ``dG = L_held(end) - L_held(start)``, ``O = L_held - L_train``,
    ``dO = O(end) - O(start)``, ``w_k ∝ |dG_k / dO_k^2|``. ``"multibench"`` (MultiBench's
    simplification): ``w_k ∝ |L_held(end) / O(end)^2|``. Weights sum to 1; when none is positive and
    finite the weights are uniform.
    """
    o_end = held_end - train_end
    if estimator == "delta":
        num, den = held_end - held_start, o_end - (held_start - train_start)
    else:
        num, den = held_end, o_end
    w = (num / den.square().clamp_min(1e-12)).abs()
    w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    if not float(w.sum()) > 0:
        return torch.full_like(w, 1.0 / w.numel())
    return w / w.sum()


@register_balancer("gblending")
class GradientBlending(Balancer):
    """Gradient-Blending (Wang, Tran & Feiszli, CVPR 2020): ``loss = sum_k w_k CE(o_k)`` over all heads.

    The heads are the fused logits and each modality's unimodal logits. At the start of a
    recomputation epoch :meth:`prepare_epoch` measures every head's mean CE on train and on the
    held-out split (carved from train by the trainer, ``heldout_fraction``; never val/test), then for
    each head k trains a deep copy of the model (and of the unimodal heads) from the current state for
    ``super_epoch_len`` epochs on train with that head's CE only, measures again, and sets ``w_k`` by
    :func:`blend_weights`. ``mode="online"`` recomputes every ``super_epoch`` epochs of the window,
    ``"offline"`` once at its first epoch. Outside the window the loss is the fused CE.

    Unimodal heads. ``heads="separate"`` (default): each modality's logits come from a linear head of
    the balancer's own on ``out.features[m]`` (not detached), as in the paper's per-modality
    classifiers and MultiBench's ``gradient_blend.py`` (``unimodal_classification_heads``); it works
    with every fusion, FiLM/gated/attention included. The heads are :meth:`parameters` (put them in the
    optimizer; a two-call loop whose optimizer steps the model but not them raises
    :class:`~equimodal.DriverError` at its second step), saved by :meth:`state_dict`, averaged over DDP
    ranks in :meth:`before_step` by the base class (they are outside the DDP wrapper), and are what
    :meth:`predict_unimodal` returns while the method is active (``stats()``: ``weight/<head>``). A
    unimodal copy trains its encoder
    with its own head (as MultiBench's). ``heads="shared"``: the model's unimodal logits (concat column
    blocks or sum heads, which share the fused head's weights); auxiliary-head fusions are refused.

    Cost per recomputation: ``(M + 1) * super_epoch_len`` training epochs of a model copy plus
    ``M + 2`` forward-only passes over train and held-out (one model copy in memory at a time);
    ``max_batches`` caps every pass. With the BalanceBenchmark defaults (online, 10, 10) that is about
    ``M + 1`` times the cost of plain training; ``super_epoch_len=1`` makes it ``(M + 1) / 10``.

    Deviations from the reference code (BalanceBenchmark ``GBlending_trainer.py``): losses are
    per-sample means (the reference sums batch losses, so train and validation sums of different
    lengths are subtracted), measured before the copy trains (the reference starts after its first
    epoch) and in eval mode; unimodal copies train their own unimodal logits (the reference feeds
    zero-padded inputs to the fused head); held-out data comes from train (the reference uses the
    test set). The copies use their own optimizer (``copy_optimizer``/``copy_lr``), not the user's.
    Under DDP the copies' gradients and the measured losses are reduced over ranks, so every
    rank trains the same copies and gets the weights one process gets at the same global batch.

    Args:
        model: a contract model; with ``heads="separate"`` its output must carry ``features``.
        mode: ``"online"`` (recompute every ``super_epoch`` epochs) or ``"offline"`` (once).
        super_epoch: epochs between recomputations (10, BalanceBenchmark).
        super_epoch_len: epochs each copy trains; ``None`` uses ``super_epoch`` (BalanceBenchmark).
        estimator: ``"delta"`` (the paper) or ``"multibench"`` (MultiBench's end-point ratio).
        copy_optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (momentum 0.9) for the copies
            (AdamW: BalanceBenchmark's default optimizer).
        copy_lr: learning rate of the copies (1e-3, BalanceBenchmark's default).
        max_batches: cap on batches per pass (copy training and loss measurement); ``None``: all.
        heads: ``"separate"`` (per-modality heads of the balancer's own) or ``"shared"`` (the model's).
        feature_dims: feature size per modality for the separate heads, for encoders without ``out_dim``.
        num_classes: number of classes for the separate heads, for models without ``num_classes``.
        start_epoch: first epoch of the method.
        end_epoch: last epoch of the method (``None``: no end).
        seed: seeds the separate heads' initialisation and the random draws (e.g. dropout) of the copy
            training.
    """

    heldout_fraction = 0.1

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: Literal["online", "offline"] = "online",
        super_epoch: int = 10,
        super_epoch_len: int | None = None,
        estimator: Literal["delta", "multibench"] = "delta",
        copy_optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        copy_lr: float = 1e-3,
        max_batches: int | None = None,
        heads: HeadsMode = "separate",
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        mode = self.check_option("mode", mode, choices=("online", "offline"))
        estimator = self.check_option("estimator", estimator, choices=("delta", "multibench"))
        copy_optimizer = self.check_option("copy_optimizer", copy_optimizer, choices=("adamw", "adam", "sgd"))
        super_epoch = self.check_option("super_epoch", super_epoch, low=1, integer=True)
        super_epoch_len = self.check_option(
            "super_epoch_len", super_epoch_len, low=1, integer=True, allow_none=True
        )
        max_batches = self.check_option("max_batches", max_batches, low=1, integer=True, allow_none=True)
        copy_lr = self.check_option("copy_lr", copy_lr, low=0, open_low=True)
        self.mode, self.estimator, self.copy_optimizer = mode, estimator, copy_optimizer
        self.super_epoch, self.copy_lr, self.max_batches = super_epoch, float(copy_lr), max_batches
        self.super_epoch_len = super_epoch_len or super_epoch
        self.head_names = ["fused", *self.modalities]  # names for logging; index 0 is the fused head
        self.heads_mode = heads
        self.heads = build_heads(
            heads, model, self.modalities, method=self.name, feature_dims=feature_dims,
            num_classes=num_classes, seed=self.seed,
        )  # fmt: skip
        missing = "Build the balancer with heads='shared' to load a state saved without unimodal heads."
        if self.heads is not None:
            self.add_state("heads", self.heads, missing=missing)
        self.add_state("weights", None)  # the head weights, set at each recomputation
        self.add_state("weights_epoch", None)  # the epoch they were computed in

    def parameters(self) -> Iterator[nn.Parameter]:
        """The separate unimodal heads' parameters (none with ``heads="shared"``)."""
        return self.heads.parameters() if self.heads is not None else iter(())

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's logits: the separate heads' (``heads="separate"``) or the model's."""
        return self.heads.logits(out) if self.heads is not None else out.unimodal_logits

    def _head(self, out: MultimodalOutput, k: int, heads: UnimodalHeads | None) -> Tensor:
        """Logits of head k: 0 is the fused head, k >= 1 modality k - 1 (through ``heads`` when separate)."""
        if k == 0:
            return out.logits
        m = self.modalities[k - 1]
        return heads.logit(out, m) if heads is not None else out.unimodal_logits[m]

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """``sum_k w_k CE(o_k)`` over the fused and unimodal heads."""
        if self.weights is None:  # unreachable through the public calls (prepare_epoch sets them)
            raise RuntimeError(
                "G-Blending has no weights yet: call balancer.prepare_epoch(EpochData(train=..., "
                "heldout=..., device=...)) after set_epoch(epoch)."
            )
        w = self.weights
        ce = [F.cross_entropy(self._head(out, k, self.heads), target) for k in range(len(w))]
        return (w * torch.stack(ce)).sum()

    def adjust_gradients(self) -> None:
        """Record the head weights (the base class averages the separate heads' gradients over ranks)."""
        if self.weights is not None:
            self.record("weight", self.weights, keys=self.head_names)

    def _due(self) -> bool:
        if self.weights_epoch == self.epoch:
            return False
        if self.weights is None:
            return True
        return self.mode == "online" and (self.epoch - self.first_epoch) % self.super_epoch == 0

    def _batches(self, data: EpochData, split: Split) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        """One pass over ``split`` (at most ``max_batches`` batches), on ``data.device``."""
        for i, pair in enumerate(data.batches(split)):
            if self.max_batches is not None and i >= self.max_batches:
                return
            yield pair

    @torch.no_grad()
    def _losses(
        self,
        model: nn.Module,
        heads: UnimodalHeads | None,
        data: EpochData,
        split: Split,
    ) -> Tensor:
        """Mean CE of every head over a split, in eval mode (sums and counts reduced over DDP ranks)."""
        was_training = model.training
        model.eval()
        n = len(self.head_names)
        total = torch.zeros(n + 1, device=data.device)  # per-head CE sums, then the count
        for batch, y in self._batches(data, split):
            out = model(batch)
            ce = [F.cross_entropy(self._head(out, k, heads), y, reduction="sum") for k in range(n)]
            total += torch.stack([*ce, ce[0].new_tensor(float(len(y)))]).float()
        model.train(was_training)
        total = all_reduce_sum(total)
        return total[:-1] / total[-1].clamp_min(1)

    def _train_copy(self, k: int, data: EpochData) -> tuple[nn.Module, UnimodalHeads | None]:
        """Deep copies of the model and the unimodal heads, trained for ``super_epoch_len`` epochs on
        train with head k's CE."""
        clone = copy.deepcopy(self.model).train()
        heads = copy.deepcopy(self.heads)
        params = [p for p in clone.parameters() if p.requires_grad]
        if heads is not None:
            params += list(heads.parameters())
        if self.copy_optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=self.copy_lr, momentum=0.9)
        else:
            opt = (torch.optim.AdamW if self.copy_optimizer == "adamw" else torch.optim.Adam)(
                params, lr=self.copy_lr
            )
        for _ in range(self.super_epoch_len):
            for batch, y in self._batches(data, "train"):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(self._head(clone(batch), k, heads), y).backward()
                all_reduce_grads(params)  # the copy is not DDP-wrapped: average its gradients over ranks
                opt.step()
        return clone, heads

    def on_epoch_start(self, data: EpochData) -> None:
        """Recompute the head weights when due (see the class docstring for when and at what cost)."""
        if not self._due():
            return
        if data.heldout is None:  # prepare_epoch checks it unless heldout_fraction was set to 0
            raise ValueError(
                "G-Blending needs EpochData.heldout (a part of train, never val/test); found None."
            )
        devices = [data.device] if data.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1009 + self.epoch)
            start = [self._losses(self.model, self.heads, data, s) for s in ("train", "heldout")]
            end = torch.zeros(2, len(self.head_names), device=data.device)
            for k in range(len(self.head_names)):
                clone, heads = self._train_copy(k, data)
                end[0, k] = self._losses(clone, heads, data, "train")[k]
                end[1, k] = self._losses(clone, heads, data, "heldout")[k]
                del clone, heads
        losses = torch.stack([*start, *end])  # already reduced over ranks by _losses
        self.weights = blend_weights(*losses, estimator=self.estimator).to(self.device)
        self.weights_epoch = self.epoch
        weights = dict(zip(self.head_names, self.weights.tolist(), strict=True))  # once per recomputation
        log.info("G-Blending weights at epoch %d: %s", self.epoch, weights)
