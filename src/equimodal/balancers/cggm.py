"""CGGM: classifier-guided gradient modulation (Guo, Jin, Chen and Zhao, "Classifier-guided Gradient
Modulation for Enhanced Multimodal Learning", NeurIPS 2024).

The pure math (:func:`cggm_coefficients`, :func:`direction_loss`) is kept in small functions; the
balancer holds the unimodal classifiers and the previous step's accuracies. Like OGM and AGM it works by
multiplying gradients (``scales_gradients``), so :meth:`~equimodal.Balancer.check_optimizer` warns under
adaptive optimizers (the authors ran Adam/AdamW; their coefficients change every step, which Adam does
not cancel as it cancels a constant factor).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput
from .agm import head_blocks
from .base import Balancer, Batch
from .heads import own_heads
from .registry import register_balancer

log = logging.getLogger(__name__)

ZeroSum = Literal["unit", "code"]
ZERO_SUMS = ("unit", "code")
SUM_EPS = 1e-8  # added to the sum of the accuracy changes in the official code
ZERO_TOL = 1e-6  # |sum of changes| at or below this counts as zero with zero_sum="unit"


def cggm_coefficients(change: Tensor, zero_sum: str = "unit") -> Tensor:
    """CGGM's per-modality coefficients ``c_m = (S - d_m) / S`` with ``S = sum_k d_k + 1e-8``.

    ``change`` holds ``d_m``, each unimodal classifier's batch accuracy minus its accuracy at the previous
    step. For two modalities ``c_1 = d_2 / (d_1 + d_2)``: the modality whose classifier improved less
    gets the larger coefficient. The coefficients sum to ``M - 1`` and may be negative. When the changes
    cancel (``S = 0`` but some ``d_m != 0``, e.g. one classifier gains a sample and another loses one)
    the released code divides by ``1e-8`` and gives coefficients of order ``1e8 |d_m|`` of either sign
    (``zero_sum="code"``); ``"unit"`` (ours) gives every modality ``c_m = 1`` when ``|S| <= 1e-6``, the
    value the released code gives when no accuracy changed at all.
    """
    if zero_sum not in ZERO_SUMS:
        raise ValueError(f"zero_sum must be one of {ZERO_SUMS}, found {zero_sum!r}.")
    raw = change.sum()
    total = raw + SUM_EPS
    coeff = (total - change) / total
    if zero_sum == "unit":
        coeff = torch.where(raw.abs() <= ZERO_TOL, torch.ones_like(coeff), coeff)
    return coeff


def direction_loss(
    coeff: Tensor, classifier_weights: Sequence[Tensor], fusion_weights: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """CGGM's direction term ``L_gm = (1/M) sum_m (|c_m| - c_m cos(W_m, F_m))``.

    ``W_m`` is the output weight of modality m's classifier and ``F_m`` the fusion head's weight it is
    compared with (the official code compares each classifier's ``out_layer.weight`` with the fusion's
    ``out_layer.weight``, flattened, ``src/eval_metrics.py`` ``cal_cos``). Minimising it turns the fusion
    head towards each classifier, the more so the larger ``c_m``. Returns ``L_gm`` and the cosines
    (autograd gives the gradient with respect to whichever weights require it).
    """
    cos = torch.stack(
        [
            F.cosine_similarity(w.reshape(-1), f.reshape(-1), dim=0)
            for w, f in zip(classifier_weights, fusion_weights, strict=True)
        ]
    )
    return (coeff.abs().sum() - (coeff * cos).sum()) / coeff.shape[0], cos


@register_balancer("cggm")
class CGGM(Balancer):
    """CGGM (Guo et al., NeurIPS'24): scale each encoder's gradients by how little its own classifier improves.

    Each modality m has a classifier of the balancer's own, ``head_m``, on its **detached** features,
    trained with its own CE (added to the loss; it moves only the head). Per optimizer step:

    1. ``acc_m`` = the classifier's accuracy on the step's batch (before its update; correct counts summed
       over micro-batches and DDP ranks), ``d_m = acc_m - acc_m(previous step)``; the previous accuracies
       start at 0, so the first step's ``d_m`` is ``acc_m`` itself (official ``acc1 = [0] * num_mod``).
    2. ``c_m = (S - d_m) / S`` with ``S = sum_k d_k + 1e-8`` (:func:`cggm_coefficients`), and every
       gradient of encoder m is multiplied by ``rho * c_m``.
    3. The direction term ``lam * L_gm``, ``L_gm = (1/M) sum_m |c_m| - c_m cos(W_m, F_m)``
       (:func:`direction_loss`), with ``W_m`` head m's weight (held fixed: the official code zeroes the
       classifiers' gradients after this term's backward) and ``F_m`` the fusion head's weight block of
       modality m. ``L_gm`` depends on weights only, not on the batch, so its gradient is added to the
       fusion head's ``.grad`` here (the same update as adding it to the loss).

    Official code (github zrguo/CGGM): ``src/foodtrain.py`` ``train`` lines 85-135 (2 modalities),
    ``src/msatrain.py`` lines 75-127 (3 modalities), ``src/eval_metrics.py`` ``cal_cos`` (lines 165-173)
    and ``train_eval_food`` (argmax accuracy), ``models/msamodel.py`` ``ClassifierGuided.cal_coeff``.

    Args:
        model: a contract model whose output carries ``features`` (pooled, ``(B, d_m)``).
        rho: the gradient scale ``rho`` (the authors' ``--rou``, 1.3 in all of ``run/*_run.py``).
        lam: the direction term's weight (the authors' ``--lamda``: 0.05 in ``run/food_run.py``, the
            two-modality script; 0.2 in ``mosi_run.py`` / ``iemo_run.py``).
        stale: ``False`` (default): the direction term of step t uses step t's coefficients and weights.
            ``True``: the released order, where ``l_gm`` computed at step t is added to the loss of step
            t+1 (``foodtrain.py`` lines 86-87 and 122), so its gradient is taken at the previous step's
            weights and coefficients, and the first step has none.
        zero_sum: ``"unit"`` (default): ``c_m = 1`` when the accuracy changes cancel (``|S| <= 1e-6``);
            ``"code"``: the released ``S + 1e-8``, which then gives coefficients of order ``1e8``.
        feature_dims, num_classes: sizes of the classifiers, for models that declare neither.
        start_epoch, end_epoch: the method's window; seed: the classifiers' initialisation.

    Deviations from the official code: the classifiers are linear heads on the pooled features (theirs: a
    two-layer transformer and an MLP on the token sequence, ``models/msamodel.py`` ``Classifier``) trained
    by the user's optimizer (theirs: their own Adam, lr 5e-4, weight decay 3e-3); the direction term's
    time (``stale``) and the ``S = 0`` case (``zero_sum``), above; any ``M >= 2`` (the released scripts
    write the coefficient sum out for 2 or 3 modalities); the fusion weight compared with ``W_m`` is the
    block the fusion declares for modality m (the concat head's columns of m, a ``sum`` head's own head;
    the authors' transformer fusion has one output layer of the same shape as each classifier's); a
    fusion that declares no blocks (FiLM, gated, attention) gets no direction term, with a warning;
    accuracies from the whole optimizer step (all micro-batches, all ranks); a non-finite step (an AMP
    overflow) changes neither gradients nor state. ``stats()``: ``coeff/<m>`` (``rho c_m``, the factor
    applied to encoder m), ``acc/<m>``, ``change/<m>``, ``cos/<m>`` and ``direction_loss``.
    """

    scales_gradients: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        *,
        rho: float = 1.3,
        lam: float = 0.05,
        stale: bool = False,
        zero_sum: ZeroSum = "unit",
        feature_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        authors = "the authors use rho=1.3, lam=0.05 or 0.2"
        rho = self.check_option("rho", rho, low=0, hint=authors)
        lam = self.check_option("lam", lam, low=0, hint=authors)
        zero_sum = self.check_option("zero_sum", zero_sum, choices=ZERO_SUMS)
        stale = self.check_option("stale", stale, choices=(True, False))
        self.rho, self.lam, self.stale, self.zero_sum = rho, lam, stale, zero_sum
        self.heads = own_heads(self, model, feature_dims=feature_dims, num_classes=num_classes)
        blocks, _ = head_blocks(model, self.modalities)
        self.blocks: dict[str, tuple[nn.Parameter, slice]] = {m: b[0] for m, b in blocks.items() if b}
        if self.lam > 0 and len(self.blocks) < len(self.modalities):
            log.warning(
                "cggm: the fusion declares no weight block for %s, so the direction term (lam=%g) leaves them "
                "out; use a fusion with per-modality blocks (concat, sum) to have it.",
                sorted(set(self.modalities) - set(self.blocks)),
                self.lam,
            )
        num = len(self.modalities)
        self.add_stat(
            "correct", torch.zeros(num)
        )  # classifier hits per modality, over the step's micro-batches
        self.add_stat("count", torch.zeros(()))  # samples seen in the step
        self.add_state("prev_acc", torch.zeros(num))  # the classifiers' accuracies at the previous step
        if self.stale:  # what the released code carries to the next step: coefficients and weights
            self.add_state("prev_coeff", torch.zeros(num))
            self.add_state("prev_heads", self._flat(self._head_weights()))
            self.add_state("prev_blocks", self._flat(self._fusion_weights()))
            self.add_state("has_prev", torch.zeros((), dtype=torch.bool))

    def parameters(self) -> Iterator[nn.Parameter]:
        """The unimodal classifiers' parameters (put them in the optimizer)."""
        return self.heads.parameters()

    # ------------------------------------------------------------------ the loss
    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The fused CE plus each classifier's CE on detached features (which trains the classifiers only)."""
        detached = out._replace(features={m: z.detach() for m, z in (out.features or {}).items()} or None)
        logits = self.heads.logits(detached)
        hits = torch.stack([(logits[m].argmax(1) == target).sum() for m in self.modalities])
        self.accumulate("correct", hits.to(self.correct.dtype))
        self.accumulate("count", torch.full((), float(target.shape[0]), device=self.count.device))
        own = sum(F.cross_entropy(logits[m], target) for m in self.modalities)
        return F.cross_entropy(out.logits, target) + own

    # ------------------------------------------------------------------ the step
    def adjust_gradients(self) -> None:
        """Scale every encoder's gradients by ``rho * c_m`` and add the direction term's gradient."""
        seen = self.count > 0  # False in a step without a loss() call
        finite = self.step_finite & seen
        acc = self.correct / self.count.clamp_min(1.0)
        change = acc.double() - self.prev_acc.double()  # float64: S - d_m cancels when one d_m is S
        coeff = cggm_coefficients(change, self.zero_sum)
        scale = torch.where(finite, self.rho * coeff, 1.0)
        for i, m in enumerate(self.modalities):
            grads = [p.grad for p in self.encoder_params(m) if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale[i].to(grads[0].dtype))
        if self.lam > 0 and self.blocks:
            self._add_direction(coeff, finite)
        self.prev_acc = torch.where(seen, acc, self.prev_acc)
        self.record("coeff", scale)
        self.record("acc", acc)
        self.record("change", change.float())

    def _add_direction(self, coeff: Tensor, finite: Tensor) -> None:
        """Add ``lam * dL_gm/dF_m`` to each fusion block's gradient (from the previous step with ``stale``)."""
        names = list(self.blocks)
        idx = [self.modalities.index(m) for m in names]
        heads, fusion = self._head_weights(), self._fusion_weights()
        gate = finite
        if self.stale:
            use_coeff = torch.stack([self.prev_coeff[i] for i in idx])
            use_heads = self._unflat(self.prev_heads, heads)
            use_fusion = self._unflat(self.prev_blocks, fusion)
            gate = finite & self.has_prev
            self.prev_coeff = torch.where(finite, coeff.float(), self.prev_coeff)
            self.prev_heads = torch.where(finite, self._flat(heads), self.prev_heads)
            self.prev_blocks = torch.where(finite, self._flat(fusion), self.prev_blocks)
            self.has_prev = self.has_prev | finite
        else:
            use_coeff, use_heads, use_fusion = torch.stack([coeff[i] for i in idx]), heads, fusion
        with torch.enable_grad():
            leaves = [f.detach().float().requires_grad_(True) for f in use_fusion]
            value, cos = direction_loss(use_coeff.float(), [h.detach().float() for h in use_heads], leaves)
            grads = torch.autograd.grad(value, leaves)
        for m, g in zip(names, grads, strict=True):
            weight, cols = self.blocks[m]
            if weight.grad is not None:
                weight.grad[:, cols] += torch.where(gate, self.lam * g, 0.0).to(weight.grad.dtype)
        self.record("cos", cos.detach(), keys=names)
        self.record("direction_loss", value.detach())

    def _head_weights(self) -> list[Tensor]:
        return [self.heads.linears[m].weight.detach() for m in self.blocks]

    def _fusion_weights(self) -> list[Tensor]:
        return [self.blocks[m][0].detach()[:, self.blocks[m][1]] for m in self.blocks]

    @staticmethod
    def _flat(tensors: Sequence[Tensor]) -> Tensor:
        if not tensors:
            return torch.zeros(0)
        return torch.cat([t.detach().reshape(-1).float() for t in tensors])

    @staticmethod
    def _unflat(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
        parts, start = [], 0
        for t in like:
            parts.append(flat[start : start + t.numel()].reshape(t.shape))
            start += t.numel()
        return parts

    def unimodal_prediction(self, out: MultimodalOutput) -> dict[str, Tensor]:
        """Each modality's own classifier (the reported per-modality accuracy while active)."""
        return self.heads.logits(out)
