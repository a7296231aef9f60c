"""Epoch-level passes over training data with the current model, leaving BatchNorm statistics alone.

Epoch- and data-level methods look at the whole training split (or a held-out part of it) once per epoch:
per-sample correctness (valuation), features for clustering (re-learning), unimodal confidences (Data
Remixing). Such a pass must not change the model it measures. :func:`inference` runs the model in eval
mode under ``torch.no_grad`` (BatchNorm uses, and does not update, its running statistics; dropout is
off) and restores each module's training flag afterwards. :func:`keep_batchnorm_stats` is for the rarer
pass that must run in training mode (a method whose authors measure with train-mode BatchNorm): it puts
every BatchNorm's running statistics and batch counter back as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..types import MultimodalOutput
from .epoch_data import EpochData, Split
from .plan import INDEX_KEY

_NORMS = (nn.modules.batchnorm._NormBase,)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; every submodule's own training flag is restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def keep_batchnorm_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block (in any mode); afterwards every BatchNorm's running statistics are as before."""
    saved = [
        (m, {k: v.detach().clone() for k, v in m.named_buffers(recurse=False) if v is not None})
        for m in model.modules()
        if isinstance(m, _NORMS)
    ]
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


def inference(
    model: nn.Module, data: EpochData, split: Split = "train", *, max_batches: int | None = None
) -> Iterator[tuple[MultimodalOutput, Tensor, dict[str, Any]]]:
    """One eval-mode, no-grad pass over ``split``: yields ``(output, labels, inputs)`` per batch.

    ``split="indexed"`` passes over :attr:`EpochData.indexed` (the training split in a fixed order, each
    batch carrying its samples' indices under :data:`~equimodal.balancers.plan.INDEX_KEY`). BatchNorm
    statistics and the model's training flags are unchanged afterwards.
    """
    with eval_mode(model), torch.no_grad():
        for i, (inputs, labels) in enumerate(data.batches(split)):
            if max_batches is not None and i >= max_batches:
                return
            yield model(inputs), labels, inputs


def sample_indices(inputs: dict[str, Any]) -> Tensor:
    """The training-sample indices of an indexed batch (raises naming the key when they are missing)."""
    index = inputs.get(INDEX_KEY)
    if not isinstance(index, Tensor):
        raise ValueError(
            f"An indexed batch must carry each sample's index in the training split under {INDEX_KEY!r}; "
            f"found keys {sorted(map(str, inputs))}. Pass EpochData(indexed=equimodal.indexed_loader("
            "train_dataset, batch_size=...), size=len(train_dataset))."
        )
    return index.long()
