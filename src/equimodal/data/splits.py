"""Seeded, stratified train/val/test splits and train-only standardisation for in-memory arrays.

Every split here is *per class*: each class is shuffled with a seeded numpy generator and cut into
train/val/test, so the three parts are disjoint, together cover every sample, keep the class
proportions, and are reproduced exactly by the same seed. Indices inside each part are returned sorted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .base import TensorSplit

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")

Indices = tuple[np.ndarray, np.ndarray, np.ndarray]


def check_seed(seed: object) -> int:
    """Return ``seed`` as an ``int`` or raise a ``TypeError``/``ValueError`` saying what is expected."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"Expected `seed` to be a non-negative int, found {type(seed).__name__} {seed!r}.")
    if int(seed) < 0:
        raise ValueError(f"Expected `seed` to be a non-negative int, found {seed}. Use 0, 1, 2, ...")
    return int(seed)


def _as_rng(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(check_seed(seed))


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"Expected a 1-D array of labels, found shape {labels.shape}.")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"Expected integer class labels, found dtype {labels.dtype}. Map labels to 0..C-1 first."
        )
    return labels


def stratified_split(
    labels: np.ndarray,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int | np.random.Generator = 0,
) -> Indices:
    """Split sample indices into train/val/test, class by class, with seeded shuffling.

    For each class of ``n`` samples, ``round(n * fractions[0])`` go to train and ``round(n * fractions[1])``
    to val (fewer if the class is too small), and the rest to test. Classes are processed in increasing
    label order, each with one ``permutation`` draw from the generator.

    Args:
        labels: ``(N,)`` integer class labels.
        fractions: train, val and test fractions; non-negative and summing to 1.
        seed: seed of a fresh ``numpy.random.default_rng``, or a generator to draw from.

    Returns:
        Sorted index arrays ``(train, val, test)``.

    Raises:
        ValueError: if the fractions are invalid or the training part would be empty.
    """
    labels = _check_labels(labels)
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(
            f"Expected three non-negative split fractions (train, val, test) summing to 1, found {fractions}. "
            "Use e.g. (0.6, 0.2, 0.2)."
        )
    rng = _as_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = idx.size
        n_train = min(n, int(round(n * fr[0])))
        n_val = min(n - n_train, int(round(n * fr[1])))
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train : n_train + n_val])
        parts[2].append(idx[n_train + n_val :])
    out = tuple(np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts)
    if out[0].size == 0:
        raise ValueError(f"The training split is empty ({labels.size} samples, fractions {fr}); add data.")
    return out  # type: ignore[return-value]


def per_class_count_split(
    labels: np.ndarray,
    train_per_class: int,
    val_per_class: int,
    seed: int | np.random.Generator = 0,
) -> Indices:
    """Split indices with a fixed number of train and val samples per class; the rest is test.

    Classes are processed in increasing label order; each class's indices are shuffled with one
    ``permutation`` draw, the first ``train_per_class`` go to train, the next ``val_per_class`` to val.

    Raises:
        ValueError: if some class has no more than ``train_per_class + val_per_class`` samples.
    """
    labels = _check_labels(labels)
    rng = _as_rng(seed)
    need = train_per_class + val_per_class
    train, val, test = [], [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if idx.size <= need:
            raise ValueError(
                f"Class {c} has {idx.size} samples but the split takes {train_per_class} train + "
                f"{val_per_class} val per class and needs at least one left for test."
            )
        train.append(idx[:train_per_class])
        val.append(idx[train_per_class:need])
        test.append(idx[need:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val)), np.sort(np.concatenate(test))


def split_from_assignment(assignment: np.ndarray) -> Indices:
    """Turn a per-sample split assignment into index arrays.

    Args:
        assignment: ``(N,)`` array of ``"train"``/``"val"``/``"test"`` strings or ``0``/``1``/``2`` ints.

    Raises:
        ValueError: for other values, or if any of the three splits is empty.
    """
    a = np.asarray(assignment)
    if a.ndim != 1:
        raise ValueError(f"Expected a 1-D `split` array (one entry per sample), found shape {a.shape}.")
    if a.dtype.kind in "iu":
        codes = a.astype(np.int64)
        bad = sorted({int(v) for v in np.unique(codes)} - {0, 1, 2})
        if bad:
            raise ValueError(f"Integer `split` values must be 0 (train), 1 (val) or 2 (test); found {bad}.")
    elif a.dtype.kind in "UOS":
        text = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in a.tolist()])
        text = np.char.lower(np.char.strip(text))
        bad = sorted(set(np.unique(text).tolist()) - set(SPLIT_NAMES))
        if bad:
            raise ValueError(
                f"`split` values must be 'train', 'val' or 'test'; found {bad}. Rename them, or drop the "
                "split to get a stratified split by seed."
            )
        codes = np.select([text == s for s in SPLIT_NAMES], [0, 1, 2], default=-1)
    else:
        raise TypeError(f"Expected `split` as strings or ints 0/1/2, found dtype {a.dtype}.")
    out = tuple(np.flatnonzero(codes == k) for k in range(3))
    empty = [SPLIT_NAMES[k] for k in range(3) if out[k].size == 0]
    if empty:
        raise ValueError(
            f"The given `split` leaves {empty} empty ({[int(o.size) for o in out]} train/val/test rows). "
            "Every split needs at least one row: assign some rows to it, or drop the split column/array "
            "to get a stratified split by seed."
        )
    return out  # type: ignore[return-value]


def feature_stats(x: np.ndarray, *, scalar: bool = False, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of ``x`` over samples (axis 0), per feature or as one scalar.

    Features with (near-)zero std get std 1, so they are centred but not blown up.
    """
    x = np.asarray(x, dtype=np.float64)
    if scalar:
        mean = np.asarray(x.mean())
        std = np.asarray(x.std())
    else:
        mean = x.mean(axis=0)
        std = x.std(axis=0)
    std = np.where(std < eps, 1.0, std)
    return mean, std


def standardize_array(x: np.ndarray, train_index: np.ndarray, *, scalar: bool = False) -> np.ndarray:
    """Standardise ``x`` with mean/std fitted on the rows ``train_index`` only; returns float32."""
    mean, std = feature_stats(x[train_index], scalar=scalar)
    return ((np.asarray(x, dtype=np.float64) - mean) / std).astype(np.float32)


def make_splits(
    arrays: Mapping[str, np.ndarray], labels: np.ndarray, index: Indices
) -> tuple[TensorSplit, TensorSplit, TensorSplit]:
    """Build the three ``TensorSplit`` objects from per-modality arrays and split indices."""
    y = np.asarray(labels, dtype=np.int64)

    def one(idx: np.ndarray) -> TensorSplit:
        inputs = {
            m: torch.from_numpy(np.ascontiguousarray(a[idx], dtype=np.float32)) for m, a in arrays.items()
        }
        return TensorSplit(inputs, torch.from_numpy(np.ascontiguousarray(y[idx])))

    return one(index[0]), one(index[1]), one(index[2])
