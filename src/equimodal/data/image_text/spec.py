"""What differs between the image-text datasets, as data: one :class:`ImageTextSpec` per dataset."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class ImageTextSpec:
    """One image-text dataset: everything its preparer and its loader do not share with the others.

    Attributes:
        dataset: the dataset name (registered for the loader and the preparer, recorded in ``prepare.json``).
        labels: raw label -> class name; names sort in the order of the raw labels.
        splits: split -> accepted tsv file names, the first one the canonical name.
        official_counts: the official split sizes (a warning when the prepared counts differ).
        target: the tsv has an aspect-target column that replaces ``$T$`` in the text (Twitter-2015).
        source: where the raw release comes from (recorded).
        mean: per-channel mean of the image normalisation (the official code's for this dataset).
        std: per-channel std of the image normalisation.
    """

    dataset: str
    labels: Mapping[str, str]
    splits: Mapping[str, tuple[str, ...]]
    official_counts: Mapping[str, int]
    target: bool
    source: str
    mean: Triple
    std: Triple

    def __post_init__(self) -> None:
        # The loader numbers classes in the sorted order of their names; it must be the raw labels' order.
        by_raw = [self.labels[k] for k in sorted(self.labels)]
        if by_raw != sorted(self.labels.values()):
            raise ValueError(
                f"{self.dataset}: class names {by_raw} must sort in the order of their raw labels "
                f"{sorted(self.labels)}, so that class indices equal the official labels."
            )
