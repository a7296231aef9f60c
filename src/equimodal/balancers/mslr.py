"""MSLR: modality-specific learning rates (Yao & Mihalcea, "Modality-specific Learning Rates for
Effective Multimodal Additive Late-fusion", Findings of ACL 2022)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_sum
from ..types import MultimodalOutput
from .agm import eval_mode, head_blocks, scale_modality_gradients
from .base import Balancer, Batch, EpochData, Requirements
from .registry import register_balancer


def accuracy_ratio(memory: Sequence[float], current: float) -> float:
    """``current / mean(memory)``: above 1 while a modality's held-out accuracy is still rising.

    Returns 1 for an empty memory or a zero mean.
    """
    mean = sum(memory) / len(memory) if memory else 0.0
    return current / mean if mean > 0 else 1.0


@register_balancer("mslr")
class MSLR(Balancer):
    """MSLR (Yao & Mihalcea, Findings-ACL'22): a unimodal warm start, then per-modality learning rates.

    The paper builds an additive late-fusion model *from fine-tuned unimodal models*, each modality
    keeping a learning rate of its own, because the best unimodal models of different modalities
    train at very different learning rates. Both parts are here:

    1. Warm start (``warmup_epochs``, default 5): the loss is ``sum_m CE(o_m, y)``, so each encoder
       and its part of the head train as that modality's own unimodal classifier (the fused
       prediction is their sum). With an auxiliary-head fusion (FiLM, gated, attention) each
       modality's auxiliary head is applied to the *undetached* feature, so the encoders train; the
       fusion body waits for the next phase (``requirements.unused_parameters`` says so to DDP).
    2. Late fusion: the fused CE, with modality m's learning rate multiplied by ``scale_m``.

    ``before_step`` realises the learning rates by multiplying the gradients of modality m's
    encoder, of its columns of the fusion head and of its bias share (``fusion.modality_blocks()``;
    a shared concat bias gets the mean scale, an own ``sum`` head's bias its modality's; see
    :func:`~equimodal.balancers.agm.head_blocks`) by ``scale_m``, in both phases. For plain SGD that
    is exactly a learning rate ``lr * scale_m``; with momentum or weight decay it is close but not
    identical (decay is not scaled, a changed scale does not rescale the momentum buffer). Adam-type
    optimizers divide the scale out again (:meth:`check_optimizer` warns); for those, build
    per-modality parameter groups instead. The warm start acts under any optimizer.

    ``mode="keep"`` keeps the initial ``scales`` (the paper's "keep": each modality at its best
    unimodal learning rate, expressed relative to the optimizer's). ``mode="dynamic"`` (default):
    at each epoch start :meth:`prepare_epoch` measures each modality's unimodal accuracy on
    ``EpochData.heldout`` (carved from train, ``heldout_fraction`` = 0.1) and, once the warm start
    is over, sets ``scale_m = initial_m * acc_m / mean(stored accs_m)`` over the last ``window``
    stored accuracies (those of the warm start included), so it acts from the first fused epoch.

    Args:
        model: a model following the contract.
        scales: initial per-modality multipliers of the optimizer's learning rate (default 1.0
            each: the paper's values are each modality's best unimodal learning rate, which depend
            on the data and encoders; the AGM authors' reimplementation uses e.g. audio 0.9, visual
            1.4, text 0.7 on UR-Funny, audio 1.3, visual 0.7 on AV-MNIST).
        mode: ``"dynamic"`` (default) or ``"keep"``.
        window: number of past held-out accuracies averaged (default 5, as in the reimplementation).
        warmup_epochs: epochs of unimodal warm start at the start of the window (default 5, so that
            the dynamic mode has a full window of accuracies when fusion starts); 0 starts with the
            fused model, as the reimplementation does.
        start_epoch, end_epoch: window in which the method acts (default: always).
        seed: unused.

    Deviations from the paper and the reimplementation: the warm start is a fixed number of epochs
    inside one run (the paper fine-tunes each unimodal model separately first; ``warmup_epochs=0``
    and your own fine-tuned encoders reproduce that); scales act on gradients, not on optimizer
    groups (see above); accuracies come from a held-out part of train, never the test set (the
    reimplementation used test accuracy); the untrained model (before the first optimizer step) is
    not measured; the dynamic rule uses the accuracies stored so far, at least one, where the
    reimplementation waits until ``window`` are stored; the "smooth" variant is not implemented.

    The scales change only at epoch starts (where the held-out accuracies are read on the host); a step
    reads nothing on the host (``stats()``: ``scale/<m>``, ``heldout_acc/<m>``, ``warmup``).
    """

    scales_gradients: ClassVar[bool] = True
    heldout_fraction = 0.1

    def __init__(
        self,
        model: nn.Module,
        *,
        scales: Mapping[str, float] | None = None,
        mode: Literal["keep", "dynamic"] = "dynamic",
        window: int = 5,
        warmup_epochs: int = 5,
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        mode = self.check_option("mode", mode, choices=("keep", "dynamic"))
        window = self.check_option("window", window, low=1, integer=True)
        warmup_epochs = self.check_option("warmup_epochs", warmup_epochs, low=0, integer=True)
        self.mode = mode  # "keep" needs no epoch data, so no held-out part (see `uses_epoch_data`)
        self.window = window
        self.warmup_epochs = warmup_epochs
        self.initial = self._check_scales(scales)
        self.add_state("scales", dict(self.initial))  # per modality, a multiplier of the learning rate
        self.add_state("memory", {m: [] for m in self.modalities})  # the last `window` held-out accuracies
        self._heldout_acc: dict[str, float] = {}
        self._figures: tuple[tuple[float, ...], Tensor] | None = None  # the scales and figures on the device
        self.head_blocks, self.head_biases = head_blocks(model, self.modalities)
        self._aux_heads = self._find_aux_heads(model) if warmup_epochs else None
        self.unused_parameters = bool(warmup_epochs) and self._warmup_leaves_parameters_unused(model)

    def _check_scales(self, scales: Mapping[str, float] | None) -> dict[str, float]:
        scales = dict(scales or {})
        unknown = [m for m in scales if m not in self.modalities]
        if unknown:
            raise ValueError(f"scales has unknown modality {unknown}; expected keys among {self.modalities}.")
        bad = {
            m: s
            for m, s in scales.items()
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0)
        }
        if bad:
            raise ValueError(f"scales must be positive finite numbers, found {bad}.")
        return {m: float(scales.get(m, 1.0)) for m in self.modalities}

    def _find_aux_heads(self, model: nn.Module) -> nn.ModuleDict | None:
        """The auxiliary heads the warm start applies to undetached features (auxiliary fusions only)."""
        if not getattr(model, "auxiliary_heads", False):
            return None
        heads = getattr(getattr(model, "fusion", None), "aux", None)
        if not isinstance(heads, nn.ModuleDict) or any(m not in heads for m in self.modalities):
            raise ValueError(
                "MSLR's unimodal warm start trains each encoder through its unimodal logits, but this "
                "fusion's come from auxiliary heads on detached features and no `model.fusion.aux[m]` "
                "head was found for every modality. Use a splittable fusion (concat, sum, weighted), an "
                "equimodal auxiliary-head fusion, or warmup_epochs=0."
            )
        return heads

    def _warmup_leaves_parameters_unused(self, model: nn.Module) -> bool:
        """Whether some fusion parameter gets no gradient from the warm-start loss (DDP must know)."""
        fusion = getattr(model, "fusion", None)
        if not isinstance(fusion, nn.Module):
            return False
        used = {id(w) for blocks in self.head_blocks.values() for w, _ in blocks}
        used |= {id(b) for b, _ in self.head_biases}
        if self._aux_heads is not None:
            used |= {id(p) for p in self._aux_heads.parameters()}
        return any(p.requires_grad and id(p) not in used for p in fusion.parameters())

    @property
    def uses_epoch_data(self) -> bool:
        """Only the dynamic mode measures held-out accuracy at epoch starts."""
        return self.mode == "dynamic"

    @property
    def requirements(self) -> Requirements:
        """As derived by the base class; the warm start also makes ``set_epoch`` necessary."""
        req = super().requirements
        return dataclasses.replace(req, set_epoch=True) if self.warmup_epochs else req

    @property
    def warming_up(self) -> bool:
        """Whether the current epoch is in the unimodal warm start."""
        return self.active and self.epoch < self.first_epoch + self.warmup_epochs

    # ------------------------------------------------------------------ hooks
    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The sum of the unimodal CEs during the warm start, the fused CE after it."""
        if not self.warming_up:
            return F.cross_entropy(out.logits, target)
        if self._aux_heads is None:
            logits = out.unimodal_logits
        elif out.features is None:
            raise ValueError(
                "MSLR's warm start with an auxiliary-head fusion needs MultimodalOutput.features; found None."
            )
        else:
            logits = {m: self._aux_heads[m](out.features[m]) for m in self.modalities}
        return torch.stack([F.cross_entropy(logits[m], target) for m in self.modalities]).sum()

    def auxiliary_loss(self, out: MultimodalOutput, target: Tensor) -> Tensor:
        """None during an auxiliary-head warm start (the objective trains those heads), else the base term."""
        if self.warming_up and self._aux_heads is not None:
            return out.logits.new_zeros(())
        return super().auxiliary_loss(out, target)

    def adjust_gradients(self) -> None:
        """Multiply each modality's encoder, head-block and bias-share gradients by its scale."""
        figures = self._device_figures()
        n = len(self.modalities)
        if any(s != 1.0 for s in self.scales.values()):  # a non-finite step: 1, as if skipped
            k = torch.where(self.step_finite, figures[:n], 1.0)
            scale_modality_gradients(self, dict(zip(self.modalities, k.unbind(), strict=True)))
        self.record("scale", figures[:n])
        if self._heldout_acc:
            self.record("heldout_acc", figures[n:-1], keys=list(self._heldout_acc))
        self.record("warmup", figures[-1])

    def _device_figures(self) -> Tensor:
        """``[scales..., held-out accuracies..., warm-up flag]`` in float64 on the device, copied there only
        when they change (at epoch starts)."""
        values = (
            *(self.scales[m] for m in self.modalities),
            *self._heldout_acc.values(),
            float(self.warming_up),
        )
        if self._figures is None or self._figures[0] != values or self._figures[1].device != self.device:
            self._figures = (values, torch.tensor(values, dtype=torch.float64, device=self.device))
        return self._figures[1]

    @torch.no_grad()
    def on_epoch_start(self, data: EpochData) -> None:
        """Dynamic mode: store each modality's held-out unimodal accuracy; after the warm start, rescale."""
        if self.num_steps == 0:
            return
        if data.heldout is None:  # prepare_epoch checks it unless heldout_fraction was set to 0
            raise ValueError("MSLR mode='dynamic' needs EpochData.heldout (a part of train); found None.")
        counts = torch.zeros(len(self.modalities) + 1, dtype=torch.long, device=data.device)
        with eval_mode(self.model):
            for batch, target in data.batches("heldout"):
                out = self.model(batch)
                hits = [(out.unimodal_logits[m].argmax(1) == target).sum() for m in self.modalities]
                counts += torch.stack([*hits, hits[0].new_tensor(target.shape[0])])
        counts = all_reduce_sum(counts).tolist()
        if counts[-1] == 0:
            raise ValueError("MSLR got an empty held-out split: EpochData.heldout yielded no sample.")
        for i, m in enumerate(self.modalities):
            acc = counts[i] / counts[-1]
            if self.memory[m] and not self.warming_up:
                self.scales[m] = self.initial[m] * accuracy_ratio(self.memory[m], acc)
            self.memory[m] = [*self.memory[m], acc][-self.window :]
            self._heldout_acc[m] = acc
