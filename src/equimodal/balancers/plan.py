"""Epoch data plans: what a balancer asks the next epoch's training data to be.

Data-level methods (sample- and modality-level valuation, Data Remixing) do not edit gradients; at an
epoch's start they decide which samples the epoch trains on, how often, with which modalities zeroed and
with what loss weight. :class:`EpochPlan` holds that decision as three aligned tensors over the plan's
*entries*: the training-sample index of each entry (entries may repeat a sample: extra copies), the
modalities zeroed in it, and its loss weight. A balancer makes one in :meth:`~equimodal.Balancer.on_epoch_start`
and hands it over with :meth:`~equimodal.Balancer.set_plan`; it is part of the balancer's state, so a
run resumed mid-epoch trains on the same plan.

How each driver honours it:

- the reference trainer builds the epoch's training loader over :class:`PlannedDataset` (its own
  sampler shards the entries over DDP ranks; every rank holds the same plan, because a balancer makes it
  from statistics reduced over ranks);
- a hand-written loop trains on ``balancer.planned_loader(train_dataset, batch_size=...)``, built once:
  its sampler (:class:`PlanSampler`) follows the balancer's current plan at each pass, shuffles per epoch
  and shards over ranks when ``torch.distributed`` is initialised;
- under Lightning the module's training loader is that same ``planned_loader``;
  :class:`~equimodal.integrations.lightning.BalancerCallback` makes the plan at ``on_train_epoch_start`` and
  marks the loader as having no length for the fit (:attr:`PlanSource.sized`), so Lightning ends each epoch
  when the plan's entries run out instead of at the batch count it read when it loaded the data (before
  the plan was made).

Each planned batch carries the entry's training-sample index under :data:`INDEX_KEY` and its weight under
:data:`PLAN_WEIGHT_KEY`; :meth:`~equimodal.Balancer.loss` refuses a batch without them while a plan is
set, so a loop that trains on the unplanned data raises instead of running another method.

Zeroing, not dropping: a zeroed modality's tensor is replaced by zeros of the same shape (a batch must keep
one shape per modality), as the released code of both methods does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..types import LABEL_KEY

INDEX_KEY = "index"
"""The key of a training sample's index in planned (and indexed) batches."""

PLAN_WEIGHT_KEY = "plan_weight"
"""The key of an entry's loss weight in planned batches."""

PLAN_ZEROED_KEY = "plan_zeroed"
"""The key of an entry's zeroed modalities in planned batches (a bool per modality, in the plan's order;
present while a plan is set). A method reads which entries are copies from it, never from the inputs: a
sample whose modality is all zeros in the data (silence, a blank frame) is not a copy."""


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's training data, as entries over the training split.

    Attributes:
        indices: ``(N',)`` long: the training-sample index of each entry (repeats are extra copies).
        zeroed: ``(N', M)`` bool: the modalities (in ``modalities`` order) zeroed in each entry, or ``None``.
        weights: ``(N',)`` float: each entry's loss weight, or ``None`` (all 1).
        modalities: the modality names, in the columns' order.
        shuffle: shuffle the entries each epoch (``False``: train in the given order).

    Raises:
        ValueError: misaligned or malformed tensors (the message names which and how).
    """

    indices: Tensor
    zeroed: Tensor | None
    weights: Tensor | None
    modalities: tuple[str, ...]
    shuffle: bool = True

    def __post_init__(self) -> None:
        idx = self.indices
        if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"EpochPlan.indices must be a 1-d integer tensor, found {_describe(idx)}.")
        if idx.numel() == 0:
            raise ValueError("EpochPlan.indices is empty: an epoch must train on at least one sample.")
        object.__setattr__(self, "indices", idx.detach().to("cpu", torch.int64))
        object.__setattr__(self, "modalities", tuple(self.modalities))
        n = idx.numel()
        if self.zeroed is not None:
            z = self.zeroed
            if (
                not isinstance(z, Tensor)
                or z.dtype != torch.bool
                or tuple(z.shape) != (n, len(self.modalities))
            ):
                raise ValueError(
                    f"EpochPlan.zeroed must be a bool tensor of shape ({n}, {len(self.modalities)}) (entries x "
                    f"modalities), found {_describe(z)}."
                )
            object.__setattr__(self, "zeroed", z.detach().cpu())
        if self.weights is not None:
            w = self.weights
            if not isinstance(w, Tensor) or not w.is_floating_point() or tuple(w.shape) != (n,):
                raise ValueError(
                    f"EpochPlan.weights must be a float tensor of shape ({n},), found {_describe(w)}."
                )
            w = w.detach().to("cpu", torch.float32)
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError("EpochPlan.weights must be finite and >= 0.")
            object.__setattr__(self, "weights", w)

    def __len__(self) -> int:
        return int(self.indices.numel())

    def zeroed_at(self, entries: Tensor) -> Tensor:
        """``(len(entries), M)`` bool: the modalities zeroed in each of ``entries`` (all false without
        ``zeroed``); what a planned batch carries under :data:`PLAN_ZEROED_KEY`."""
        if self.zeroed is None:
            return torch.zeros(len(entries), len(self.modalities), dtype=torch.bool)
        return self.zeroed[entries]

    @classmethod
    def identity(cls, size: int, modalities: Sequence[str]) -> EpochPlan:
        """Every sample once, nothing zeroed, weight 1 (what training without a plan is)."""
        return cls(torch.arange(int(size)), None, None, tuple(modalities))

    def check_size(self, size: int) -> None:
        """Raise ``ValueError`` when an index is outside a training split of ``size`` samples."""
        low, high = int(self.indices.min()), int(self.indices.max())
        if low < 0 or high >= size:
            raise ValueError(
                f"The epoch plan indexes samples {low}..{high}, but the training split has {size} samples; "
                "a plan's indices are positions in the training split the epoch data was made from."
            )

    def summary(self, size: int | None = None) -> dict[str, float]:
        """Mechanism figures: entries, extra copies (entries beyond one per sample), entries with each
        modality zeroed, the weights' mean, and the samples left out (with ``size``)."""
        out: dict[str, float] = {"entries": float(len(self))}
        unique = int(torch.unique(self.indices).numel())
        out["extra_copies"] = float(len(self) - unique)
        if size is not None:
            out["left_out"] = float(size - unique)
        if self.zeroed is not None:
            for m, count in zip(self.modalities, self.zeroed.sum(0).tolist(), strict=True):
                out[f"zeroed/{m}"] = float(count)
        if self.weights is not None:
            out["weight_mean"] = float(self.weights.mean())
        return out

    def state(self) -> dict[str, Any]:
        """Plain data and CPU tensors, for a balancer's ``state_dict``."""
        return {
            "indices": self.indices.clone(),
            "zeroed": None if self.zeroed is None else self.zeroed.clone(),
            "weights": None if self.weights is None else self.weights.clone(),
            "modalities": list(self.modalities),
            "shuffle": bool(self.shuffle),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> EpochPlan:
        """The plan :meth:`state` saved."""
        return cls(
            state["indices"], state.get("zeroed"), state.get("weights"), tuple(state["modalities"]),
            bool(state.get("shuffle", True)),
        )  # fmt: skip


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


class PlanSource:
    """Where a :class:`PlannedDataset` reads its plan: a balancer's current plan, or a fixed one.

    Picklable and small (DataLoader workers get a copy of the plan, not of the balancer).

    ``sized=False`` makes a :class:`PlanSampler` over it (and so its ``DataLoader``) report no length: a
    driver that reads an epoch's length before the plan is made (Lightning) then runs each epoch until the
    sampler is exhausted. The Lightning callback sets it for a fit and restores it after.
    """

    def __init__(self, plan: EpochPlan | None = None, epoch: int = 0, *, sized: bool = True) -> None:
        self.plan, self.epoch, self.sized = plan, int(epoch), bool(sized)


class PlannedDataset(Dataset):
    """A training dataset seen through an epoch plan: entry ``i`` is sample ``plan.indices[i]`` with the
    plan's modalities zeroed, plus its index (:data:`INDEX_KEY`) and weight (:data:`PLAN_WEIGHT_KEY`).

    Without a plan (``None``: an epoch the balancer leaves as it is) it is the dataset itself, each sample
    once, with its index and weight 1 added.

    The dataset's items may be an ``(inputs, label)`` pair (``inputs`` a mapping of modality name to
    tensor; equimodal's splits) or one mapping holding the modality tensors beside the label under
    ``label_key``; items keep their form. Equimodal's in-memory splits (``TensorSplit``) are read a batch at a
    time, as they are without a plan. The sample key handed to the dataset is whatever the sampler gives
    for the entry, with the entry replaced by its sample index (equimodal's training keys
    carry the epoch, which seeds random transforms).

    Args:
        dataset: a map-style dataset.
        source: the plan, a :class:`PlanSource` (followed at each read), or ``None``.
        label_key: the label's key in mapping items.
    """

    def __init__(
        self, dataset: Any, source: EpochPlan | PlanSource | None = None, *, label_key: str = LABEL_KEY
    ) -> None:
        self.dataset = dataset
        self.source = source if isinstance(source, PlanSource) else PlanSource(source)
        self.label_key = label_key
        from ..data.base import TensorSplit  # data imports nothing of the balancers

        if isinstance(dataset, TensorSplit):
            self.__getitems__ = self._getitems  # a whole batch at a time, as the split itself is read

    @property
    def plan(self) -> EpochPlan | None:
        return self.source.plan

    def __len__(self) -> int:
        plan = self.plan
        return len(self.dataset) if plan is None else len(plan)

    def _entry(self, key: Any) -> tuple[Any, int, int]:
        """The dataset key, the sample index and the entry of one sampler key."""
        entry = int(key[0]) if isinstance(key, tuple) else int(key)
        plan = self.plan
        index = entry if plan is None else int(plan.indices[entry])
        if isinstance(key, tuple):  # a SampleKey (index, epoch): keep the epoch
            return type(key)(index, *key[1:]), index, entry
        return index, index, entry

    def __getitem__(self, key: Any) -> Any:
        base_key, index, entry = self._entry(key)
        item = self.dataset[base_key]
        plan = self.plan
        zeroed = set() if plan is None or plan.zeroed is None else {
            m for m, z in zip(plan.modalities, plan.zeroed[entry].tolist(), strict=True) if z
        }  # fmt: skip
        weight = 1.0 if plan is None or plan.weights is None else float(plan.weights[entry])
        extra = {INDEX_KEY: torch.tensor(index), PLAN_WEIGHT_KEY: torch.tensor(weight)}
        if plan is not None:
            extra[PLAN_ZEROED_KEY] = plan.zeroed_at(torch.tensor([entry]))[0]
        if isinstance(item, Mapping):
            out = {k: torch.zeros_like(v) if k in zeroed else v for k, v in item.items()}
            return {**out, **extra}
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Mapping):
            inputs = {k: torch.zeros_like(v) if k in zeroed else v for k, v in item[0].items()}
            return {**inputs, **extra}, item[1]
        raise TypeError(
            f"PlannedDataset: item {index} is a {type(item).__name__}; expected an (inputs, label) pair with "
            f"inputs a mapping of modality name to tensor, or one mapping holding the modality tensors and "
            f"the label under {self.label_key!r}."
        )

    def _getitems(self, keys: Sequence[Any]) -> Any:
        mapped = [self._entry(k) for k in keys]
        batch = self.dataset.__getitems__([m[0] for m in mapped])  # a Batched (inputs mapping, labels)
        inputs, labels = batch
        plan = self.plan
        entries = torch.tensor([m[2] for m in mapped], dtype=torch.long)
        index = torch.tensor([m[1] for m in mapped], dtype=torch.long)
        inputs = dict(inputs)
        if plan is not None:
            zeroed = inputs[PLAN_ZEROED_KEY] = plan.zeroed_at(entries)
            keep = ~zeroed
            for j, m in enumerate(plan.modalities):
                if m in inputs and not bool(keep[:, j].all()):
                    x = inputs[m]  # where, not a product: a zeroed non-finite input is 0 as in __getitem__
                    inputs[m] = torch.where(
                        keep[:, j].view(-1, *([1] * (x.dim() - 1))), x, torch.zeros_like(x)
                    )
        weights = torch.ones(len(keys)) if plan is None or plan.weights is None else plan.weights[entries]
        inputs[INDEX_KEY], inputs[PLAN_WEIGHT_KEY] = index, weights
        return type(batch)(inputs, labels)


class PlanSampler(Sampler[int]):
    """Entries of the current plan, shuffled per epoch and sharded over ranks (for hand-written loops).

    Each pass reads the plan (``len(dataset)``) anew, so one ``DataLoader`` serves every epoch. The order
    is ``randperm`` from a generator seeded ``seed + epoch`` (the balancer's epoch), padded by wrapping to
    a multiple of the world size, and rank r takes positions ``r, r + world, ...`` (as
    ``DistributedSampler``); the plan's ``shuffle=False`` keeps its order.
    """

    def __init__(self, dataset: PlannedDataset, *, seed: int = 0, shuffle: bool = True) -> None:
        self.dataset, self.seed, self.shuffle = dataset, int(seed), bool(shuffle)

    @staticmethod
    def _world() -> tuple[int, int]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        plan = self.dataset.plan
        rank, world = self._world()
        if self.shuffle and (plan is None or plan.shuffle):
            gen = torch.Generator().manual_seed(self.seed + self.dataset.source.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        from ..data.base import shard_for_rank  # data imports nothing of the balancers

        return iter(shard_for_rank(order, rank, world).tolist())

    def __len__(self) -> int:
        if not self.dataset.source.sized:
            # TypeError is how Python and Lightning read "no length"; the text says what to do when it shows
            raise TypeError(
                "This planned loader has no length while a Lightning fit drives its balancer (its epochs "
                "follow plans made after Lightning reads lengths). Under DDP pass "
                "L.Trainer(use_distributed_sampler=False): the planned loader shards itself over ranks."
            )
        return math.ceil(len(self.dataset) / self._world()[1])


class _Shard(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``n`` in order (every sample once across ranks)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        rank, world = PlanSampler._world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = PlanSampler._world()
        return len(range(rank, self.n, world))


def _loader(view: PlannedDataset, batch_size: int, sampler: Sampler, kwargs: dict[str, Any]) -> DataLoader:
    if hasattr(view, "__getitems__"):  # an equimodal in-memory split: batches come formed
        from ..data.base import collate

        kwargs.setdefault("collate_fn", collate)
    return DataLoader(view, batch_size=batch_size, sampler=sampler, **kwargs)


def loader_plan(loader: Any) -> PlannedDataset | None:
    """The planned dataset a ``planned_loader`` reads (its ``source`` is the plan it follows); ``None`` for
    any other loader."""
    sampler = getattr(loader, "sampler", None)
    return sampler.dataset if isinstance(sampler, PlanSampler) else None


def indexed_loader(dataset: Any, *, batch_size: int, **kwargs: Any) -> DataLoader:
    """What ``EpochData.indexed`` wants: ``dataset`` (the training split) in a fixed order, each batch
    carrying its samples' indices; sharded ``rank::world`` when ``torch.distributed`` is initialised (a
    balancer combines per-sample results over ranks). Other keyword arguments go to the ``DataLoader``."""
    for bad in ("sampler", "batch_sampler", "shuffle"):
        if bad in kwargs:
            raise ValueError(
                f"indexed_loader reads the split in a fixed order, sharded over ranks; drop {bad}=."
            )
    return _loader(PlannedDataset(dataset), batch_size, _Shard(len(dataset)), kwargs)


def planned_loader(
    dataset: Any, source: PlanSource, *, batch_size: int, seed: int = 0, shuffle: bool = True, **kwargs: Any
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` that follows ``source``'s plan at every pass (see
    :meth:`~equimodal.Balancer.planned_loader`)."""
    for bad in ("sampler", "batch_sampler"):
        if bad in kwargs:
            raise ValueError(
                f"planned_loader chooses the sampler itself (the plan's entries, sharded over ranks); drop "
                f"{bad}=."
            )
    if kwargs.get("persistent_workers"):
        raise ValueError(
            "planned_loader cannot use persistent_workers=True: a persistent worker keeps the plan of the "
            "epoch it started in. Leave persistent_workers=False."
        )
    view = PlannedDataset(dataset, source)
    return _loader(view, batch_size, PlanSampler(view, seed=seed, shuffle=shuffle), kwargs)
