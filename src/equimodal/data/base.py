"""In-memory multimodal datasets with fixed train/val/test splits, and a fast batch iterator.

Every built-in dataset is small enough to live in memory as one tensor per modality, so batches are
formed by indexing those tensors (no per-sample Python work). Under DDP each rank iterates over its
own shard of one permutation drawn from a generator seeded identically on all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..types import LABEL_KEY

Batch = dict[str, Tensor]


@dataclass
class TensorSplit:
    """One split: ``inputs[m]`` is ``(N, ...)`` for each modality, ``labels`` is ``(N,)`` long."""

    inputs: dict[str, Tensor]
    labels: Tensor

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        for m, x in self.inputs.items():
            if x.shape[0] != n:
                raise ValueError(
                    f"Modality {m!r} has {x.shape[0]} samples but there are {n} labels; "
                    "every modality must have one row per label."
                )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> TensorSplit:
        """The rows ``index`` of this split."""
        return TensorSplit({m: x[index] for m, x in self.inputs.items()}, self.labels[index])

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[Batch, Tensor]]:
        """Yield ``(batch, labels)`` pairs; ``batch`` maps modality name to a tensor (plus ``"label"``).

        Under DDP (``world_size > 1``) each rank takes every ``world_size``-th index of the same
        permutation (the permutation is padded by wrapping so all ranks see equally many batches).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, found {batch_size}.")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if world_size > 1:
            total = -(-n // world_size) * world_size
            order = torch.cat([order, order[: total - n]])[rank::world_size]
        m = order.shape[0]
        stop = m - m % batch_size if drop_last and m >= batch_size else m
        for i in range(0, stop, batch_size):
            idx = order[i : i + batch_size]
            batch = {k: x[idx] for k, x in self.inputs.items()}
            y = self.labels[idx]
            if device is not None:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                y = y.to(device, non_blocking=True)
            batch[LABEL_KEY] = y
            yield batch, y


@dataclass
class MultimodalDataset:
    """A dataset with fixed splits and a default model.

    Attributes:
        name: registry name.
        train, val, test: the three splits (val is carved from the training data, never from test).
        num_classes: number of classes.
        modalities: modality names in order.
        default_encoders: builds fresh default encoders (``modality -> nn.Module`` with ``out_dim``).
        class_names: optional class names.
        info: free-form provenance (source, licence, options used).
    """

    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    modalities: list[str]
    default_encoders: Callable[[], dict[str, nn.Module]]
    class_names: list[str] | None = None
    info: dict[str, object] = field(default_factory=dict)

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample input shape of every modality."""
        return {m: tuple(self.train.inputs[m].shape[1:]) for m in self.modalities}
