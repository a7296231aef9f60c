"""Registry of datasets: ``register_dataset``, ``list_datasets``, ``load_dataset`` (the create function)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..registry import Registry
from .base import MultimodalDataset

DatasetLoader = Callable[..., MultimodalDataset]

DATASETS: Registry[DatasetLoader] = Registry(
    "dataset", example="load_dataset({name!r}, {key}=...) or --set data.options.{key}=..."
)


def register_dataset(name: str, *, overwrite: bool = False) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator registering a dataset loader under ``name``.

    A loader is a function taking keyword-only options (including ``seed: int``) that returns a
    :class:`MultimodalDataset`; its keyword parameters are the options :func:`load_dataset` accepts.
    """
    return DATASETS.decorator(name, overwrite=overwrite)


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return DATASETS.names()


def dataset_options(name: str) -> dict[str, Any]:
    """The options of dataset ``name`` and their defaults (``inspect.Parameter.empty`` when required)."""
    return DATASETS.options(name)


def load_dataset(name: str, **options: Any) -> MultimodalDataset:
    """Load the dataset registered as ``name`` with loader ``options`` (e.g. ``seed``, ``views``).

    String values for numeric or boolean options are converted (``"0.9"`` -> ``0.9``), so options can
    come straight from a command line. Unknown names and options fail with the valid list.

    Raises:
        ValueError: unknown dataset name, or a value outside an option's choices.
        TypeError: unknown or missing options, or an option of the wrong type.
    """
    return DATASETS.create(name, **options)
