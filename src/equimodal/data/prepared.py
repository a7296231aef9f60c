"""Loading a folder written by ``equimodal prepare <dataset>`` (layout: :mod:`equimodal.prepare.base`).

A dataset's loader (``cremad``, ``kinetics_sounds``, ...) calls :func:`load_prepared` with a *reader
factory*: given the manifest rows and the folder, it returns the ``reader(row_index, generator)`` of
:class:`~equimodal.data.base.FileSplit` that reads one clip with the dataset's own transforms (random in
training, deterministic otherwise). Splits come from the manifest's ``split`` column (saved by the
preparer); class indices follow the sorted class names recorded in ``prepare.json``, so they are the same
for every split choice.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..prepare.base import read_layout
from .base import FileSplit, MultimodalDataset, Reader
from .splits import check_seed

Rows = list[dict[str, str]]
ReaderFactory = Callable[[Rows, Path], Reader]


def read_rows(manifest: Path) -> Rows:
    """The manifest's rows as dicts (``key``, ``label``, ``split`` and one entry per modality)."""
    with manifest.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_prepared(
    dataset: str,
    root: str | Path,
    *,
    modalities: Sequence[str],
    reader: ReaderFactory,
    encoders: Callable[[], dict[str, nn.Module]],
    seed: int = 0,
    info: dict[str, Any] | None = None,
) -> MultimodalDataset:
    """A :class:`MultimodalDataset` of :class:`FileSplit` over a prepared folder.

    Args:
        dataset: the dataset's name (checked against ``prepare.json``).
        root: the prepared folder.
        modalities: the manifest columns to read, in order.
        reader: builds the per-clip reader from the rows and the folder.
        encoders: builds the default encoders.
        seed: seeds the random training transforms.
        info: extra provenance to record.

    Raises:
        FileNotFoundError / ValueError: not a prepared folder of ``dataset`` (naming the prepare command),
            a modality column missing from its manifest, or an empty split.
    """
    seed = check_seed(seed)
    manifest, prepared = read_layout(Path(root), dataset)
    rows = read_rows(manifest)
    missing = [m for m in modalities if rows and m not in rows[0]]
    if missing:
        raise ValueError(
            f"{manifest}: no column for modality {missing} (columns: {list(rows[0]) if rows else []}); "
            f"rerun `equimodal prepare {dataset}` with the options that write it."
        )
    classes = list(prepared["classes"])
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[r["label"]] for r in rows], dtype=np.int64)
    read = reader(rows, manifest.parent)
    splits = {}
    for name in ("train", "val", "test"):
        rows_of = np.array([i for i, r in enumerate(rows) if r["split"] == name], dtype=np.int64)
        if rows_of.size == 0:
            raise ValueError(
                f"{manifest}: the {name} split is empty. Rerun `equimodal prepare {dataset}` (it saves train, "
                "val and test), or check the split options it was given."
            )
        splits[name] = FileSplit(
            read,
            torch.from_numpy(rows_of),
            torch.from_numpy(labels[rows_of]),
            train=name == "train",
            seed=seed,
        )
    return MultimodalDataset(
        name=dataset,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=len(classes),
        modalities=list(modalities),
        default_encoders=encoders,
        class_names=classes,
        info={"root": str(Path(root)), "prepared": prepared, **(info or {})},
    )
