"""Datasets as map-style ``torch.utils.data.Dataset`` splits, batched by a ``DataLoader``.

A :class:`Split` is one split of a dataset (train, val or test): ``split[key]`` is ``(inputs, label)``
with ``inputs`` a mapping of modality name to tensor; ``split.labels`` holds every label (for stratified
hold-outs, class counts and probes). Two implementations:

- :class:`TensorSplit`: every modality held in memory as one tensor. Its ``__getitems__`` forms a whole
  batch by indexing those tensors, which the ``DataLoader`` uses instead of per-sample calls and
  :func:`collate`, so in-memory data costs no per-sample Python work.
- :class:`FileSplit`: samples read from files on disk by a reader function, one sample at a time (in
  ``DataLoader`` workers), with a per-split transform: random augmentation while training, deterministic
  otherwise.

Keys and randomness: evaluation samplers yield plain indices; the training sampler yields
:class:`SampleKey` ``(index, epoch)`` pairs, so a random transform draws from a generator seeded by
``(seed, epoch, index)`` (:func:`sample_generator`). A run is therefore reproducible whatever the number
of workers, with or without persistent workers.

Distribution: :func:`make_loader` shards with :class:`TrainSampler` (as ``DistributedSampler``: one
permutation drawn from ``seed + epoch``, padded by wrapping so every rank sees equally many samples)
and :class:`EvalSampler` (indices ``rank::world``, no padding, so every sample is evaluated exactly once
across ranks).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..types import LABEL_KEY

Batch = dict[str, Tensor]
Sample = tuple[dict[str, Tensor], int]


class SampleKey(NamedTuple):
    """A training sample's key: its index and the epoch it is drawn in (seeds random transforms)."""

    index: int
    epoch: int


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one sample's random transform, seeded by ``(seed, epoch, index)``."""
    mixed = ((int(seed) * 1_000_003 + int(epoch)) * 10_000_019 + int(index)) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def _index(key: int | SampleKey) -> int:
    return key.index if isinstance(key, SampleKey) else int(key)


class Split(Dataset):
    """One split of a multimodal dataset: ``split[key] -> (inputs, label)``; ``labels`` holds all labels."""

    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, key: int | SampleKey) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def subset(self, index: Tensor) -> Split:  # pragma: no cover - abstract
        """The samples ``index`` of this split, as a split of the same kind."""
        raise NotImplementedError

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample input shape of every modality (of the first sample)."""
        inputs, _ = self[0]
        return {m: tuple(x.shape) for m, x in inputs.items()}


@dataclass
class TensorSplit(Split):
    """An in-memory split: ``inputs[m]`` is ``(N, ...)`` for each modality, ``labels`` is ``(N,)`` long."""

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

    def __getitem__(self, key: int | SampleKey) -> Sample:
        i = _index(key)
        return {m: x[i] for m, x in self.inputs.items()}, int(self.labels[i])

    def __getitems__(self, keys: Sequence[int | SampleKey]) -> Batched:
        """A whole batch by tensor indexing (the ``DataLoader`` calls this instead of ``__getitem__``)."""
        idx = torch.tensor([_index(k) for k in keys], dtype=torch.long)
        return Batched({m: x[idx] for m, x in self.inputs.items()}, self.labels[idx])

    def subset(self, index: Tensor) -> TensorSplit:
        """The rows ``index`` of this split."""
        return TensorSplit({m: x[index] for m, x in self.inputs.items()}, self.labels[index])

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: tuple(x.shape[1:]) for m, x in self.inputs.items()}


Reader = Callable[[int, "torch.Generator | None"], dict[str, Tensor]]
"""``reader(index, generator)`` returns one sample's inputs; ``generator`` is ``None`` in evaluation
(deterministic transforms) and a per-sample seeded generator in training (random augmentation)."""


@dataclass
class FileSplit(Split):
    """A split read from disk one sample at a time.

    Attributes:
        reader: ``reader(record_index, generator)`` -> the sample's inputs (see :data:`Reader`).
        records: indices into the reader's records that belong to this split, in order.
        labels: the label of each of ``records``.
        train: whether this is a training split (random transforms, seeded per sample).
        seed: seed of the random transforms.
    """

    reader: Reader
    records: Tensor
    labels: Tensor
    train: bool = False
    seed: int = 0

    def __getitem__(self, key: int | SampleKey) -> Sample:
        i = _index(key)
        gen = None
        if self.train:
            epoch = key.epoch if isinstance(key, SampleKey) else 0
            gen = sample_generator(self.seed, epoch, int(self.records[i]))
        return self.reader(int(self.records[i]), gen), int(self.labels[i])

    def subset(self, index: Tensor) -> FileSplit:
        return FileSplit(self.reader, self.records[index], self.labels[index], self.train, self.seed)

    def evaluation_view(self) -> FileSplit:
        """The same samples read as evaluation reads them (deterministic transforms, no augmentation)."""
        return FileSplit(self.reader, self.records, self.labels, False, self.seed)


class Batched(NamedTuple):
    """A batch already formed by a split's ``__getitems__`` (passed through :func:`collate`)."""

    inputs: dict[str, Tensor]
    labels: Tensor


def collate(samples: Batched | list[Sample]) -> tuple[Batch, Tensor]:
    """``(batch, labels)``: stacks per-sample inputs (or passes a :class:`Batched` through).

    ``batch`` maps each modality to a ``(B, ...)`` tensor and also holds the labels under ``"label"``.
    """
    if isinstance(samples, Batched):
        batch, labels = dict(samples.inputs), samples.labels
    else:
        if not samples:
            raise ValueError("collate got an empty list of samples.")
        names = list(samples[0][0])
        batch = {m: torch.stack([s[0][m] for s in samples]) for m in names}
        labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
    batch[LABEL_KEY] = labels
    return batch, labels


def shard_for_rank(order: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s share (positions ``rank, rank + world, ...``) of ``order`` padded to a multiple of
    ``world`` by repeating it from the start, as ``DistributedSampler`` pads (every rank gets as many
    entries, even when ``order`` is shorter than half the ranks)."""
    total = -(-len(order) // world) * world
    return order.repeat(-(-total // len(order)))[:total][rank::world]


class TrainSampler(Sampler[SampleKey]):
    """A per-epoch shuffle sharded over ranks, yielding :class:`SampleKey` ``(index, epoch)``.

    It shards as ``torch.utils.data.DistributedSampler`` does: the first pass of an epoch is
    ``randperm(n)`` from a generator seeded ``seed + epoch``, padded by wrapping to a multiple of
    ``world_size``, and rank r takes positions ``r, r + world_size, ...``. Unlike it, every further pass
    in the same epoch draws a new order from the same generator (G-Blending trains model copies for
    several passes over the epoch data). Call :meth:`set_epoch` before each epoch; ``start`` resumes an
    epoch after that many of this rank's samples (the first pass only).
    """

    def __init__(
        self, n: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        self.n, self.seed, self.rank, self.num_replicas = n, int(seed), rank, world_size
        self.shuffle = bool(shuffle)
        self.num_samples = -(-n // world_size)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Start ``epoch``: reseed the order's generator with ``seed + epoch``; skip ``start`` samples once."""
        self.epoch = int(epoch)
        self._gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self._start = int(start)

    def __iter__(self) -> Iterator[SampleKey]:
        order = torch.randperm(self.n, generator=self._gen) if self.shuffle else torch.arange(self.n)
        order = shard_for_rank(order, self.rank, self.num_replicas)
        start, self._start = self._start, 0
        return (SampleKey(int(i), self.epoch) for i in order[start:].tolist())

    def __len__(self) -> int:
        return self.num_samples - self._start


class EvalSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample exactly once across ranks, in a fixed order."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and numpy's RNGs in a ``DataLoader`` worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


@dataclass(frozen=True)
class LoaderOptions:
    """How batches are loaded: workers, pinned memory, persistent workers, prefetching."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    prefetch_factor: int | None = None


def make_loader(
    split: Split | Dataset,
    batch_size: int,
    *,
    train: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    options: LoaderOptions = LoaderOptions(),  # noqa: B008 - frozen, immutable default
    drop_last: bool = False,
    shuffle: bool = True,
) -> DataLoader:
    """A ``DataLoader`` over ``split`` yielding ``(batch, labels)`` (see :func:`collate`).

    ``train=True`` shuffles per epoch with :class:`TrainSampler` (call ``loader.sampler.set_epoch(e)``)
    and passes :class:`SampleKey` keys; otherwise the order is fixed and sharded by :class:`EvalSampler`
    (never dropping the last batch). ``batch_size`` is per process. ``shuffle=False`` keeps the training
    sampler's order fixed (an epoch data plan's order), still sharded and keyed.
    """
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer, found {batch_size!r}.")
    n = len(split)
    sampler: Sampler = (
        TrainSampler(n, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle)
        if train
        else EvalSampler(n, rank=rank, world_size=world_size)
    )
    workers = options.num_workers
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": options.persistent_workers, "worker_init_fn": _seed_worker}
        if options.prefetch_factor is not None:
            extra["prefetch_factor"] = options.prefetch_factor
    return DataLoader(
        split,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=options.pin_memory,
        drop_last=drop_last and train,
        generator=torch.Generator().manual_seed(int(seed)),
        **extra,
    )


def default_workers() -> int:
    """A sensible worker count for on-disk data: the CPUs this process may use, minus one, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


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
        info: free-form provenance (source, licence, options used, rows skipped).
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    modalities: list[str]
    default_encoders: Callable[[], dict[str, nn.Module]]
    class_names: list[str] | None = None
    info: dict[str, object] = field(default_factory=dict)

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample input shape of every modality."""
        return self.train.input_shapes()

    @property
    def in_memory(self) -> bool:
        """Whether every split is a :class:`TensorSplit` (then workers bring nothing)."""
        return all(isinstance(s, TensorSplit) for s in (self.train, self.val, self.test))


def batch_to(batch: Mapping[str, Tensor], device: torch.device, non_blocking: bool = True) -> Batch:
    """Move every tensor of a batch to ``device``."""
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
