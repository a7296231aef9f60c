"""MSLR: modality-specific learning rates (Yao & Mihalcea, "Modality-specific Learning Rates for
Effective Multimodal Additive Late-fusion", Findings of ACL 2022)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..distributed import all_reduce_sum
from .agm import eval_mode
from .base import Balancer, EpochData
from .registry import register_balancer


def accuracy_ratio(memory: Sequence[float], current: float) -> float:
    """``current / mean(memory)``: above 1 while a modality's held-out accuracy is still rising.

    Returns 1 for an empty memory or a zero mean.
    """
    mean = sum(memory) / len(memory) if memory else 0.0
    return current / mean if mean > 0 else 1.0


@register_balancer("mslr")
class MSLR(Balancer):
    """MSLR (Yao & Mihalcea, Findings-ACL'22): per-modality learning rates as per-modality gradient scales.

    ``before_step`` multiplies the gradients of modality m's encoder and of its block of the fusion
    head (``fusion.modality_blocks()``; shared biases are left alone) by ``scale_m``. For plain SGD
    that is exactly a learning rate ``lr * scale_m`` for that modality; with momentum or weight
    decay it is close but not identical (decay is not scaled, and a changed scale does not rescale
    the momentum buffer). It is *not* a learning rate for Adam-type optimizers, which divide the
    scale out again; for those, build per-modality parameter groups instead.

    ``mode="keep"`` keeps the initial ``scales`` (the paper's "keep": each modality at its best
    unimodal learning rate, expressed relative to the optimizer's). ``mode="dynamic"``: at the start
    of each epoch, :meth:`prepare_epoch` measures each modality's unimodal accuracy on
    ``EpochData.heldout`` (carved from train, ``heldout_fraction`` = 0.1); once ``window`` past
    accuracies are stored, ``scale_m = initial_m * acc_m / mean(last window accs_m)``.

    Args:
        model: a model following the contract.
        scales: initial per-modality multipliers of the optimizer's learning rate (default 1.0
            each; the reference reimplementation uses e.g. audio 1.3, visual 0.7 on AV-MNIST).
        mode: ``"dynamic"`` (default) or ``"keep"``.
        window: number of past held-out accuracies averaged (default 5, as in the reimplementation).
        start_epoch, end_epoch: window in which scales are applied (default: always).
        seed: unused.

    Deviations from the reference: scales act on gradients, not on optimizer groups (see above);
    accuracies come from a held-out part of train, never the test set (the reimplementation used
    test accuracy); the untrained model (before the first optimizer step) is not measured; the
    "smooth" variant of the paper is not implemented.
    """

    heldout_fraction = 0.1

    def __init__(
        self,
        model: nn.Module,
        *,
        scales: Mapping[str, float] | None = None,
        mode: Literal["keep", "dynamic"] = "dynamic",
        window: int = 5,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, start_epoch=start_epoch, end_epoch=end_epoch, seed=seed)
        if mode not in ("keep", "dynamic"):
            raise ValueError(f"mode must be 'keep' or 'dynamic', found {mode!r}.")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"window must be a positive integer, found {window!r}.")
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
        self.mode = mode  # "keep" needs no epoch data, so no held-out part (see `uses_epoch_data`)
        self.window = window
        self.initial = {m: float(scales.get(m, 1.0)) for m in self.modalities}
        self.scales = dict(self.initial)
        self.memory: dict[str, list[float]] = {m: [] for m in self.modalities}
        self._heldout_acc: dict[str, float] = {}
        fusion = getattr(model, "fusion", None)
        blocks = fusion.modality_blocks() if hasattr(fusion, "modality_blocks") else {}
        self.head_blocks: dict[str, tuple[nn.Parameter, slice]] = {
            m: blocks[m] for m in self.modalities if m in blocks
        }

    @property
    def uses_epoch_data(self) -> bool:
        """Only the dynamic mode measures held-out accuracy at epoch starts."""
        return self.mode == "dynamic"

    def adjust_gradients(self) -> None:
        """Multiply each modality's encoder and head-block gradients by its scale."""
        params = [p for m in self.modalities for p in self.encoder_params(m)]
        if not self.grads_finite(params + [p for p, _ in self.head_blocks.values()]):
            return  # AMP overflow step
        for m in self.modalities:
            k = self.scales[m]
            if k == 1.0:
                continue
            for p in self.encoder_params(m):
                if p.grad is not None:
                    p.grad.mul_(k)
            if m in self.head_blocks:
                w, cols = self.head_blocks[m]
                if w.grad is not None:
                    w.grad[:, cols].mul_(k)
        self._stats = {f"scale/{m}": self.scales[m] for m in self.modalities}
        self._stats.update({f"heldout_acc/{m}": a for m, a in self._heldout_acc.items()})

    @torch.no_grad()
    def on_epoch_start(self, data: EpochData) -> None:
        """Dynamic mode: update the scales from each modality's held-out unimodal accuracy."""
        if self.num_steps == 0:
            return
        if data.heldout is None:  # prepare_epoch checks it unless heldout_fraction was set to 0
            raise ValueError("MSLR mode='dynamic' needs EpochData.heldout (a part of train); found None.")
        counts = torch.zeros(len(self.modalities) + 1, dtype=torch.long, device=data.device)
        with eval_mode(self.model):
            for batch, target in data.heldout():
                out = self.model({k: v.to(data.device) for k, v in batch.items()})
                target = target.to(data.device)
                hits = [(out.unimodal_logits[m].argmax(1) == target).sum() for m in self.modalities]
                counts += torch.stack([*hits, hits[0].new_tensor(target.shape[0])])
        counts = all_reduce_sum(counts).tolist()
        if counts[-1] == 0:
            raise ValueError("MSLR got an empty held-out split; EpochData.heldout() yielded no sample.")
        for i, m in enumerate(self.modalities):
            acc = counts[i] / counts[-1]
            if len(self.memory[m]) >= self.window:
                self.scales[m] = self.initial[m] * accuracy_ratio(self.memory[m], acc)
                self.memory[m] = self.memory[m][1:]
            self.memory[m].append(acc)
            self._heldout_acc[m] = acc

    def state_dict(self) -> dict[str, Any]:
        """Epoch, step count, current scales and the accuracy memory."""
        return {
            **super().state_dict(),
            "scales": dict(self.scales),
            "memory": {m: list(v) for m, v in self.memory.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.scales = {m: float(state["scales"][m]) for m in self.modalities}
        self.memory = {m: [float(a) for a in state["memory"][m]] for m in self.modalities}
