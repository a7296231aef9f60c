"""Evaluation metrics: accuracy, macro-F1, modality imbalance, and linear probes on frozen features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def accuracy(pred: Tensor, target: Tensor) -> float:
    """Fraction of correct predictions (``pred`` are class indices or logits)."""
    if pred.dim() == 2:
        pred = pred.argmax(1)
    return float((pred == target).double().mean()) if target.numel() else float("nan")


def macro_f1(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1 (classes absent from both pred and target count as 0)."""
    if pred.dim() == 2:
        pred = pred.argmax(1)
    idx = target * num_classes + pred
    cm = torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).double()
    tp = cm.diag()
    denom = cm.sum(0) + cm.sum(1)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return float(f1.mean())


def imbalance(unimodal_acc: dict[str, float]) -> float:
    """Spread (max - min) of the unimodal accuracies: 0 when modalities are equally good."""
    values = list(unimodal_acc.values())
    return max(values) - min(values) if values else float("nan")


def fit_linear_probe(
    train_x: Tensor, train_y: Tensor, num_classes: int, *, weight_decay: float = 1e-3, steps: int = 200
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit multinomial logistic regression (L-BFGS, L2 penalty) on standardised frozen features.

    Returns ``(weight, bias, mean, std)`` so that ``((x - mean) / std) @ weight.T + bias`` are logits.
    The probe measures encoder quality independently of how the model's own head is scaled.
    """
    x = train_x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.double, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b, train_y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def probe_accuracy(probe: tuple[Tensor, Tensor, Tensor, Tensor], x: Tensor, y: Tensor) -> float:
    """Accuracy of a probe from :func:`fit_linear_probe` on features ``x``."""
    w, b, mean, std = probe
    return accuracy(((x.double() - mean) / std) @ w.t() + b, y)
