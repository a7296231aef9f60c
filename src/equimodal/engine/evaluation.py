"""Evaluation of a model and its balancer over a split: fused and per-modality figures, probes, removals.

Under DDP every rank evaluates its shard of the split (:class:`~equimodal.data.base.EvalSampler`: every
sample exactly once) and the logits are gathered back into the split's order on every rank, so every
figure equals that of a single process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..balancers import Balancer
from ..data.base import Batch, batch_to
from ..distributed import all_reduce_sum, is_distributed
from ..metrics import accuracy, fit_linear_probe, imbalance, macro_f1, probe_accuracy
from ..types import MultimodalOutput

Loader = Iterable[tuple[Batch, Tensor]]


@dataclass
class EvalResult:
    """Evaluation of one split (``logits`` are the evaluated logits, kept for ensembles)."""

    loss: float
    accuracy: float
    macro_f1: float
    unimodal: dict[str, float]
    logits: Tensor | None = None
    labels: Tensor | None = None

    def as_dict(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_loss": self.loss, f"{prefix}_acc": self.accuracy, f"{prefix}_f1": self.macro_f1}
        out.update({f"{prefix}_acc_{m}": a for m, a in self.unimodal.items()})
        out[f"{prefix}_imbalance"] = imbalance(self.unimodal)
        return out


def gather_rows(t: Tensor, n: int) -> Tensor:
    """Reassemble a split's rows sharded ``rank::world`` over DDP ranks (identity on one process).

    Every rank holds the rows ``rank, rank + world, ...`` of ``n``; the result, on every rank, holds all
    ``n`` rows in order.
    """
    if not is_distributed():
        return t
    world = dist.get_world_size()
    per_rank = -(-n // world)
    padded = torch.zeros((per_rank, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).reshape(per_rank * world, *t.shape[1:])[:n]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    balancer: Balancer,
    loader: Loader,
    n: int,
    device: torch.device,
    num_classes: int,
    transform: Callable[[Batch], MultimodalOutput] | None = None,
) -> EvalResult:
    """Fused accuracy (through ``balancer.predict``), macro-F1, loss and each modality's unimodal accuracy.

    Args:
        loader: this rank's shard of the split (an evaluation loader).
        n: the number of samples in the whole split.
        transform: replaces ``model(batch)`` (e.g. to zero a modality's features).
    """
    was_training = model.training
    model.eval()
    logits_parts, label_parts, losses = [], [], []
    uni: dict[str, list[Tensor]] = {m: [] for m in balancer.modalities}
    for batch, y in loader:
        batch, y = batch_to(batch, device), y.to(device, non_blocking=True)
        out = transform(batch) if transform is not None else model(batch)
        logits = balancer.predict(out)
        losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        logits_parts.append(logits.float())
        label_parts.append(y)
        uni_logits = balancer.predict_unimodal(out)
        for m in balancer.modalities:
            uni[m].append(uni_logits[m].argmax(1))
    model.train(was_training)
    logits = gather_rows(torch.cat(logits_parts), n).cpu()
    target = gather_rows(torch.cat(label_parts), n).cpu()
    pred = logits.argmax(1)
    loss = all_reduce_sum(torch.stack(losses).sum())
    return EvalResult(
        loss=float(loss) / max(n, 1),
        accuracy=accuracy(pred, target),
        macro_f1=macro_f1(pred, target, num_classes),
        unimodal={m: accuracy(gather_rows(torch.cat(v), n).cpu(), target) for m, v in uni.items()},
        logits=logits,
        labels=target,
    )


@torch.no_grad()
def encoder_features(model: nn.Module, loader: Loader, n: int, device: torch.device) -> dict[str, Tensor]:
    """Frozen pooled features of every modality over a split (eval mode), gathered over ranks."""
    was_training = model.training
    model.eval()
    feats: dict[str, list[Tensor]] = {}
    for batch, _ in loader:
        out = model(batch_to(batch, device))
        if out.features is None:
            raise ValueError(
                "Linear probes need `features` in the model output; return them or set train.probe=false."
            )
        for m, f in out.features.items():
            feats.setdefault(m, []).append(f.flatten(1).float())
    model.train(was_training)
    return {m: gather_rows(torch.cat(v), n).cpu() for m, v in feats.items()}


def linear_probes(
    model: nn.Module,
    loaders: dict[str, tuple[Loader, int, Tensor]],
    modalities: list[str],
    num_classes: int,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Per modality, a linear probe fitted on the frozen train features, scored on the other splits.

    Args:
        loaders: ``{"train": (loader, n, labels), "val": ..., "test": ...}``.

    Returns:
        ``{"val": {"val_probe_<m>": acc}, "test": {"test_probe_<m>": acc}}``.
    """
    feats = {k: encoder_features(model, loader, n, device) for k, (loader, n, _) in loaders.items()}
    result: dict[str, dict[str, float]] = {k: {} for k in loaders if k != "train"}
    for m in modalities:
        probe = fit_linear_probe(feats["train"][m], loaders["train"][2], num_classes)
        for k in result:
            result[k][f"{k}_probe_{m}"] = probe_accuracy(probe, feats[k][m], loaders[k][2])
    return result


def removal_accuracy(
    model: nn.Module,
    balancer: Balancer,
    loader: Loader,
    n: int,
    device: torch.device,
    num_classes: int,
) -> dict[str, float]:
    """Fused accuracy with each modality's features zeroed at test time (how much the model leans on it).

    Needs a model with ``encode(batch)`` and ``fusion(features)`` (as :class:`MultimodalClassifier`).
    """
    result = {}
    for m in balancer.modalities:

        def drop(batch: Batch, m: str = m) -> MultimodalOutput:
            feats = model.encode(batch)
            feats[m] = torch.zeros_like(feats[m])
            fused, uni = model.fusion(feats)
            return MultimodalOutput(fused, uni, feats)

        result[m] = evaluate(model, balancer, loader, n, device, num_classes, transform=drop).accuracy
    return result
