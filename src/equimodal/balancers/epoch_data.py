"""``EpochData``: the training and held-out data a driver hands to :meth:`Balancer.prepare_epoch`.

Balancers that work per epoch (``pmr``, ``gblending``, ``mslr`` in its dynamic mode) pass over the
training split or a held-out part of it at each epoch start. A driver may hand each split over in the
form it already has: a ``DataLoader``, any re-iterable of batches (a list), or a callable that returns a
fresh iterable. Each batch may be an ``(inputs, labels)`` pair or one mapping that holds the labels
beside the modality tensors (``batch["label"]``, as equimodal's datasets and the README's loop use). A
balancer reads every form the same way, through :meth:`EpochData.batches`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..types import LABEL_KEY

# A DataLoader, a re-iterable of batches, or a callable returning a fresh iterable of batches.
EpochSource = Iterable[Any] | Callable[[], Iterable[Any]]
Split = Literal["train", "heldout", "indexed"]


def check_source(source: object, split: str) -> None:
    """Raise ``TypeError`` unless ``source`` can be passed over once per epoch, every epoch.

    Accepted: a callable (called once per pass), or a re-iterable such as a ``DataLoader`` or a list.
    Refused: a one-shot iterator or generator (empty from its second pass on), a single batch (a mapping
    or a tensor) and anything that is not iterable.
    """
    hint = (
        "Pass a DataLoader, a list of batches, or a callable that returns a fresh iterable "
        "(e.g. `lambda: iter(loader)`)."
    )
    if callable(source) and not isinstance(source, (Tensor, Mapping)):
        return
    if isinstance(source, Iterator):
        raise TypeError(
            f"EpochData.{split} is a one-shot iterator ({type(source).__name__}): it would be empty from "
            f"the second pass on. {hint}"
        )
    if isinstance(source, (Mapping, Tensor, str, bytes)):
        raise TypeError(
            f"EpochData.{split} must hold the split's batches, found one {type(source).__name__} "
            f"(a single batch?). {hint}"
        )
    if not isinstance(source, Iterable):
        raise TypeError(
            f"EpochData.{split} must be iterable or callable, found {type(source).__name__}. {hint}"
        )


def _describe(item: object) -> str:
    """A short description of a batch of the wrong form, for error messages."""
    if isinstance(item, (tuple, list)):
        kinds = ", ".join(type(x).__name__ for x in item[:4]) + (", ..." if len(item) > 4 else "")
        return f"a {type(item).__name__} of {len(item)} ({kinds})"
    return f"a {type(item).__name__}"


@dataclass(frozen=True)
class EpochData:
    """What a driver hands to :meth:`Balancer.prepare_epoch`.

    Attributes:
        train: the training split: a ``DataLoader``, any re-iterable of batches (a list), or a callable
            returning a fresh iterable of them. A batch is an ``(inputs, labels)`` pair (``inputs`` a
            mapping of modality name to tensor) or one mapping holding the labels under ``label_key``
            beside the modality tensors.
        heldout: the same over a held-out split carved from train (never the test set), or ``None``.
        device: the device the model lives on (a ``torch.device`` or its name); batches are moved there.
        indexed: the training split again, in a fixed order (no shuffling), each batch carrying its
            samples' indices in the training split under ``"index"``
            (:class:`~equimodal.balancers.plan.PlannedDataset` adds them): what per-sample methods (data
            plans) read; ``None`` when no balancer needs it.
        size: the number of samples in the training split (what a data plan indexes), or ``None``.
        label_key: the key of the labels in mapping batches (``"label"``, equimodal's datasets' key);
            e.g. ``label_key="target"`` for batches ``{"audio": a, "video": v, "target": y}``.

    Raises:
        TypeError: a split is a one-shot iterator (it would be empty after the first epoch), a single
            batch, or neither iterable nor callable.
    """

    train: EpochSource
    heldout: EpochSource | None
    device: torch.device
    label_key: str = LABEL_KEY
    indexed: EpochSource | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        check_source(self.train, "train")
        if self.heldout is not None:
            check_source(self.heldout, "heldout")
        if self.indexed is not None:
            check_source(self.indexed, "indexed")
        if self.size is not None and (
            isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1
        ):
            raise TypeError(
                f"EpochData.size must be a positive int (the training split's size), found {self.size!r}."
            )
        if not isinstance(self.label_key, str):
            raise TypeError(f"EpochData.label_key must be a str, found {type(self.label_key).__name__}.")
        object.__setattr__(self, "device", torch.device(self.device))

    def batches(self, split: Split = "train") -> Iterator[tuple[dict[str, Any], Tensor]]:
        """One pass over ``split`` as ``(inputs, labels)`` pairs, every tensor moved to :attr:`device`.

        Raises:
            ValueError: ``split`` is ``"heldout"`` and there is none, or a mapping batch lacks ``label_key``.
            TypeError: a batch is neither a pair nor a mapping, or its labels are not a tensor.
        """
        source = {"train": self.train, "heldout": self.heldout, "indexed": self.indexed}[split]
        if source is None:
            raise ValueError(f"EpochData has no {split!r} split (found None); pass EpochData({split}=...).")
        items = source() if callable(source) and not isinstance(source, Iterable) else source
        for i, item in enumerate(items):
            inputs, labels = self._pair(item, split, i)
            moved = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
            yield moved, labels.to(self.device)

    def _pair(self, item: object, split: str, index: int) -> tuple[Mapping[str, Any], Tensor]:
        """Split one batch into its inputs and labels (see :meth:`batches`)."""
        key = self.label_key
        if isinstance(item, Mapping) and key in item:
            inputs, labels = {k: v for k, v in item.items() if k != key}, item[key]
        elif isinstance(item, Mapping):
            raise ValueError(
                f"EpochData.{split} batch {index} is a mapping without the labels under {key!r} (its keys: "
                f"{sorted(map(str, item))}). Put the labels under {key!r}, or name their key: "
                "EpochData(..., label_key='<key>')."
            )
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Mapping):
            inputs, labels = item
        else:
            raise TypeError(
                f"EpochData.{split} batch {index} is {_describe(item)}; expected an (inputs, labels) pair with "
                f"inputs a mapping of modality name to tensor, or one mapping holding the labels under "
                f"{key!r} beside the modality tensors."
            )
        if not isinstance(labels, Tensor):
            raise TypeError(
                f"EpochData.{split} batch {index} has labels of type {type(labels).__name__}; expected a tensor "
                "of class indices."
            )
        return inputs, labels
