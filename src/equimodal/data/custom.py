"""Bring-your-own data: a NumPy ``.npz`` file or a CSV file, turned into a :class:`MultimodalDataset`.

**NPZ layout** (``custom_npz``)::

    np.savez("mydata.npz",
             audio=audio,          # (N, ...) numeric, one array per modality (any names)
             video=video,          # (N, ...)
             label=labels,         # (N,) ints 0..C-1, or strings (mapped to 0..C-1, names kept)
             split=split)          # optional (N,): "train"/"val"/"test" or 0/1/2

**CSV layout** (``custom_csv``): a header row; a ``label`` column; an optional ``split`` column; feature
columns grouped into modalities by name prefix, e.g. ``audio_0, ..., audio_12, video_0, ..., video_63``.
By default every other column must look like ``<modality>_<index>``; pass ``modalities`` to choose
the groups (``{"audio": "audio_", "video": "video_"}``, or the string ``"audio=audio_,video=video_"``;
``"audio,video"`` means the prefixes ``audio_`` and ``video_``). Columns are ordered by their index.
Inferred groups guard against typos: a prefix used by a single column whose name is close to another
prefix of several columns (``audoi_0`` beside ``audio_0..audio_12``) is an error, not a 1-feature modality; pass
``modalities`` to keep such a column as a modality of its own. Cells must be finite numbers: an empty,
non-numeric or non-finite (``nan``, ``inf``) cell is reported with its file line and column.

A bad row is always an error naming it, never skipped: a feature cell as above, a missing label (an
empty cell or ``label`` entry, NaN, or a missing-value marker such as ``nan`` or ``<NA>``, which pandas
writes for a missing value: never a class; in both layouts) and, in a CSV, a sample listed twice, i.e.
rows equal in every feature column (the split could put one copy in train and the other in test).
Distinct samples whose features happen to coincide (coarse, discrete features) are kept with
``allow_duplicates=True``.

Without a split, rows are split per class by ``seed`` (60 / 20 / 20 by default); a class too small to
appear in train, val *and* test under those fractions (e.g. a class of a single sample, which would
land in train only) is an error naming the class, its count and the fixes (more samples of it, or a
``split`` of your own). With a ``split`` the rows go where it says; a class that it leaves out of
train, val or test is allowed (the split is your choice) but reported with a ``UserWarning``. With
``standardize=True`` (the default) each modality is standardised with statistics of the training rows:
per feature for vectors ``(N, D)``, per channel (axis 1) for arrays with more dimensions.

Default encoders by per-sample shape: ``(D,)`` -> ``mlp``; ``(C, H, W)`` -> ``cnn``; ``(C, T)`` ->
``conv1d`` (channels-first sequences); anything else -> ``mlp`` over the flattened input. Override them
with the ``model.encoders`` config or pass your own encoders to ``MultimodalClassifier``.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..registry import name_list
from .base import MultimodalDataset
from .registry import register_dataset
from .splits import Indices, check_seed, make_splits, split_from_assignment, stratified_split

LABEL = "label"
SPLIT = "split"
_INDEXED = re.compile(r"^(.+?)_(\d+)$")


def _resolve_path(path: str | os.PathLike[str], kind: str, layout_hint: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Expected `path` to be a file path (str or PathLike), found {type(path).__name__}.")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"No {kind} file at {str(p)!r}. Pass `path` to an existing file; {layout_hint}"
        )
    return p


def encode_labels(raw: np.ndarray) -> tuple[np.ndarray, list[str] | None]:
    """Map labels to int64 class indices ``0..C-1``.

    Strings are mapped in sorted order and their values kept as class names. Integers (or integral
    floats) must already be exactly ``0..C-1`` for ``C`` distinct values.

    Raises:
        ValueError: for non-integral floats, integers that are not ``0..C-1``, or fewer than two classes.
    """
    y = np.asarray(raw)
    if y.ndim != 1:
        raise ValueError(f"Expected labels of shape (N,), found shape {y.shape}. Store one label per row.")
    names: list[str] | None = None
    if y.dtype.kind in "USO":
        text = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in y.tolist()])
        uniq, codes = np.unique(text, return_inverse=True)
        names = [str(u) for u in uniq]
        codes = codes.astype(np.int64)
    elif y.dtype.kind in "biu":
        codes = y.astype(np.int64)
    elif y.dtype.kind == "f":
        if not (np.isfinite(y).all() and np.array_equal(y, np.round(y))):
            raise ValueError(
                "Labels must be integer class indices 0..C-1 or strings, found non-integer or non-finite "
                "float values. Store class indices as ints (or names as strings)."
            )
        codes = y.astype(np.int64)
    else:
        raise TypeError(f"Labels must be integers or strings, found dtype {y.dtype}.")
    uniq_codes = np.unique(codes)
    if names is None and not np.array_equal(uniq_codes, np.arange(uniq_codes.size)):
        shown = uniq_codes[:10].tolist()
        more = " ..." if uniq_codes.size > 10 else ""
        raise ValueError(
            f"Integer labels must be exactly 0..C-1 for C = {uniq_codes.size} classes, found values {shown}{more}. "
            "Remap them (e.g. `np.unique(y, return_inverse=True)[1]`), or store the labels as strings to "
            "have them mapped to 0..C-1 automatically with the names kept."
        )
    if uniq_codes.size < 2:
        raise ValueError(
            f"Expected at least 2 classes, found {uniq_codes.size}; a classifier needs two or more."
        )
    return codes, names


def _listing(numbers: Sequence[int], limit: int = 10) -> str:
    """``"4, 5, 6"``, or the first ``limit`` numbers and how many more."""
    shown = ", ".join(str(n) for n in numbers[:limit])
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


MISSING_LABELS = ("nan", "<na>")
"""Label cells that mean "no value" (lower-cased), as pandas writes a missing value; never a class."""


def _is_missing(value: object) -> bool:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        return value.strip().lower() in ("", *MISSING_LABELS)
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def missing_label_error(
    where: str, labels: Sequence[object], numbers: Sequence[int], unit: str, note: str = ""
) -> ValueError | None:
    """An error naming the rows whose label is missing (empty, NaN, ``nan`` or ``<NA>``), or ``None``.

    Args:
        where: the file or dataset, first in the message.
        labels: one label per row (strings or numbers).
        numbers: how each row is named in the message (file lines, 1-based rows, 0-based indices).
        unit: the word for a row (``"line"``, ``"row"``).
        note: appended, e.g. how rows are counted.
    """
    bad = [k for k, v in enumerate(labels) if _is_missing(v)]
    if not bad:
        return None
    shown = _listing([numbers[k] for k in bad])
    first = labels[bad[0]]
    first = first.strip() if isinstance(first, str) else first
    return ValueError(
        f"{where} {unit}(s) {shown}: the {LABEL!r} cell is empty or a missing value ({first!r} in {unit} "
        f"{numbers[bad[0]]}; {len(bad)} such {unit}(s)); an empty cell, NaN, 'nan' or '<NA>' is never a "
        f"class. Give every {unit} its label, or delete the unlabelled {unit}s.{' ' + note if note else ''}"
    )


def _check_fractions(val_fraction: float, test_fraction: float) -> tuple[float, float, float]:
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)):
            raise TypeError(f"Expected `{name}` to be a number in (0, 1), found {type(v).__name__} {v!r}.")
        if not 0.0 < float(v) < 1.0:
            raise ValueError(f"Expected `{name}` in (0, 1), found {v}.")
    train = 1.0 - float(val_fraction) - float(test_fraction)
    if train <= 0:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1 to leave training data, found "
            f"{val_fraction} + {test_fraction}."
        )
    return train, float(val_fraction), float(test_fraction)


def _standardize_nd(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Standardise with training statistics: per feature for ``(N, D)``, per channel for more dimensions."""
    x = x.astype(np.float64)
    axes = (0,) if x.ndim == 2 else (0, *range(2, x.ndim))
    mean = x[train].mean(axis=axes, keepdims=True)
    std = x[train].std(axis=axes, keepdims=True)
    std = np.where(std < 1e-8, 1.0, std)
    return ((x - mean) / std).astype(np.float32)


def default_encoder_spec(shape: tuple[int, ...]) -> tuple[str, dict[str, object]]:
    """The registered encoder name and options used by default for a per-sample ``shape``."""
    if len(shape) == 3:
        return "cnn", {"in_channels": int(shape[0])}
    if len(shape) == 2:
        return "conv1d", {"in_channels": int(shape[0])}
    return "mlp", {"in_dim": int(np.prod(shape)), "hidden": (64,)}


def _encoders(shapes: dict[str, tuple[int, ...]]) -> Callable[[], dict[str, nn.Module]]:
    specs = {m: default_encoder_spec(s) for m, s in shapes.items()}

    def build() -> dict[str, nn.Module]:
        from ..models.encoders import create_encoder

        return {m: create_encoder(name, **kw) for m, (name, kw) in specs.items()}

    return build


def build_custom_dataset(
    name: str,
    arrays: Mapping[str, np.ndarray],
    labels: np.ndarray,
    split: np.ndarray | None,
    options: dict[str, Any],
) -> MultimodalDataset:
    """Validate per-modality arrays, labels and an optional split, and assemble the dataset.

    ``options`` are the loader's resolved options, recorded in ``info``: they hold at least ``path``,
    ``seed`` (of the stratified split), ``val_fraction``, ``test_fraction`` and ``standardize``.

    Raises:
        ValueError: no modality, row counts that differ, non-numeric or non-finite values, bad labels
            or a bad split.
    """
    seed, standardize = options["seed"], options["standardize"]
    fractions = _check_fractions(options["val_fraction"], options["test_fraction"])
    if not isinstance(standardize, bool):
        raise TypeError(f"Expected `standardize` to be True or False, found {standardize!r}.")
    if not arrays:
        raise ValueError(
            f"{name}: found no modality data besides {LABEL!r}/{SPLIT!r}. Add one array (or column group) "
            "per modality."
        )
    y, class_names = _checked_labels(name, labels)
    _check_row_counts(name, arrays, split, y.shape[0])
    clean = {m: _numeric_rows(name, m, a) for m, a in arrays.items()}
    index = _split_index(name, y, class_names, split, seed, fractions)
    if standardize:
        clean = {m: _standardize_nd(a, index[0]) for m, a in clean.items()}
    train, val, test = make_splits(clean, y, index)
    num_classes = len(class_names) if class_names is not None else int(y.max()) + 1
    by_seed = f"stratified by seed {fractions}"
    return MultimodalDataset(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        modalities=list(clean),
        default_encoders=_encoders({m: tuple(a.shape[1:]) for m, a in clean.items()}),
        class_names=class_names,
        info={
            "source": str(options.get("path", "")),
            "licence": "user data",
            "attribution": "",
            "options": options,
            "split": f"from the file's {SPLIT!r} entry" if split is not None else by_seed,
        },
    )


def _checked_labels(name: str, labels: np.ndarray) -> tuple[np.ndarray, list[str] | None]:
    """The labels as class indices and names (:func:`encode_labels`), after refusing missing ones."""
    _check_not_scalar(name, LABEL, labels, None)
    listed = np.asarray(labels).tolist()
    missing = missing_label_error(name, listed, range(len(listed)), "row", "(Rows are 0-based indices.)")
    if missing is not None:
        raise missing
    return encode_labels(labels)


def _check_row_counts(name: str, arrays: Mapping[str, np.ndarray], split: np.ndarray | None, n: int) -> None:
    """Every modality (and the split) has one row per label."""
    for m, a in arrays.items():
        _check_not_scalar(name, m, a, n)
    if split is not None:
        _check_not_scalar(name, SPLIT, split, n)
    counts = {m: int(np.shape(a)[0]) for m, a in arrays.items()}
    if any(c != n for c in counts.values()) or (split is not None and np.shape(split)[0] != n):
        extra = f", split {np.shape(split)[0]}" if split is not None else ""
        raise ValueError(
            f"{name}: every modality needs one row per label ({n} labels), found rows {counts}{extra}. "
            "Make all arrays share the first dimension (samples in the same order)."
        )


def _numeric_rows(name: str, modality: str, array: np.ndarray) -> np.ndarray:
    """A modality's array as finite float64 rows (a vector per sample becomes ``(N, 1)``)."""
    a = np.asarray(array)
    if a.dtype.kind not in "biuf":
        raise TypeError(
            f"{name}: modality {modality!r} must be numeric, found dtype {a.dtype}. Encode it as numbers."
        )
    a = a.astype(np.float64)
    if a.ndim == 1:
        a = a[:, None]
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ValueError(
            f"{name}: modality {modality!r} holds {bad} non-finite values (NaN or inf). Clean or impute them first."
        )
    return a


def _split_index(
    name: str,
    y: np.ndarray,
    class_names: list[str] | None,
    split: np.ndarray | None,
    seed: int,
    fractions: tuple[float, float, float],
) -> Indices:
    """The train/val/test rows: from the given split, or stratified by ``seed``; every split non-empty."""
    index: Indices = (
        split_from_assignment(split) if split is not None else stratified_split(y, fractions, seed)
    )
    if split is None and (index[1].size == 0 or index[2].size == 0):
        raise ValueError(
            f"{name}: {y.shape[0]} rows are too few for a train/val/test split with fractions "
            f"{tuple(round(f, 6) for f in fractions)} "
            f"(found {[int(i.size) for i in index]} rows). Add data or provide a `split`."
        )
    _check_classes_in_splits(name, y, class_names, index, fractions if split is None else None)
    return index


def _check_not_scalar(name: str, what: str, a: object, n: int | None) -> None:
    """A clear error for a 0-d array (a scalar) where one row per sample is expected."""
    if np.ndim(a) == 0:
        value = np.asarray(a).item() if np.asarray(a).dtype.kind in "biufUS" else "?"
        rows = (
            f"an array of {n} rows (one per label)"
            if n is not None
            else "an array of N rows (one per sample)"
        )
        raise ValueError(
            f"{name}: {what!r} is a scalar (0-d array, value {value!r}) where {rows} was expected. Store one "
            f"row per sample: shape (N,) for {LABEL!r}/{SPLIT!r}, (N, ...) for a modality."
        )


def min_class_size(fractions: tuple[float, float, float]) -> int:
    """The smallest class that :func:`stratified_split` puts in train, val and test alike."""
    for k in range(3, 10_000):
        n_train = min(k, round(k * fractions[0]))
        n_val = min(k - n_train, round(k * fractions[1]))
        if n_train and n_val and k - n_train - n_val:
            return k
    return 10_000


def _check_classes_in_splits(
    name: str,
    y: np.ndarray,
    class_names: list[str] | None,
    index: Indices,
    fractions: tuple[float, float, float] | None,
) -> None:
    """Every class in train, val and test: an error for the seeded split (``fractions``), a warning for
    the file's own split (``fractions=None``)."""
    counts = np.bincount(y, minlength=int(y.max()) + 1)
    present = [set(np.unique(y[i]).tolist()) for i in index]
    missing = {
        c: [s for s, p in zip(("train", "val", "test"), present, strict=True) if c not in p]
        for c in range(counts.size)
    }
    missing = {c: parts for c, parts in missing.items() if parts}
    if not missing:
        return

    def label(c: int) -> str:
        return repr(class_names[c]) if class_names is not None else str(c)

    shown = "; ".join(
        f"class {label(c)} ({counts[c]} sample{'s' if counts[c] != 1 else ''}): none in {' or '.join(parts)}"
        for c, parts in list(missing.items())[:10]
    )
    more = f" (and {len(missing) - 10} more classes)" if len(missing) > 10 else ""
    if fractions is not None:
        raise ValueError(
            f"{name}: some classes are too small for the stratified train/val/test split with fractions "
            f"{tuple(round(f, 6) for f in fractions)}: {shown}{more}. Each class needs at least {min_class_size(fractions)} samples to "
            "be trained on, selected on (val) and measured (test). Add samples of those classes or drop "
            f"them, or give a {SPLIT!r} {'column' if 'csv' in name else 'array'} to choose the split yourself."
        )
    warnings.warn(
        f"{name}: the file's {SPLIT!r} leaves classes out of some splits: {shown}{more}. A class missing "
        "from train is never learnt, one missing from val or test is not measured there. Fine if "
        "intended; otherwise move some of its rows to those splits.",
        UserWarning,
        stacklevel=3,
    )


def _select(names: str | Sequence[str] | None, available: list[str], what: str) -> list[str]:
    if names is None:
        return available
    chosen = name_list(names, Sequence)
    if chosen is None:
        raise TypeError(f"Expected `modalities` as a list of names or 'a,b', found {type(names).__name__}.")
    missing = [m for m in chosen if m not in available]
    if missing or not chosen:
        raise ValueError(f"Modalities {missing or chosen} are not in {what}; available: {available}.")
    return chosen


NPZ_LAYOUT = "expected an .npz with one (N, ...) array per modality, `label` (N,) and optional `split` (N,)."


@register_dataset("custom_npz")
def load_custom_npz(
    *,
    path: str | os.PathLike[str],
    seed: int = 0,
    modalities: str | Sequence[str] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    standardize: bool = True,
) -> MultimodalDataset:
    """Load your own data from an ``.npz`` file (layout in the module docstring).

    Args:
        path: the ``.npz`` file.
        seed: controls the stratified split when the file has no ``split`` array.
        modalities: which arrays to use, in order (default: all arrays except ``label``/``split``, in
            file order).
        val_fraction, test_fraction: split fractions used when there is no ``split`` array.
        standardize: standardise each modality with training-split statistics.

    Raises:
        FileNotFoundError: missing file. ValueError: not an npz, no ``label``, mismatched lengths, labels
            not 0..C-1, a bad split (see :func:`build_custom_dataset`).
    """
    seed = check_seed(seed)
    _check_fractions(val_fraction, test_fraction)  # before reading the file
    p = _resolve_path(path, ".npz", NPZ_LAYOUT)
    try:
        npz = np.load(p, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise ValueError(f"Could not read {str(p)!r} as an .npz archive ({err}); {NPZ_LAYOUT}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{str(p)!r} holds a single array, not an .npz archive; {NPZ_LAYOUT}")
    with npz:
        keys = list(npz.files)
        if LABEL not in keys:
            raise ValueError(f"{str(p)!r} has no {LABEL!r} array (found {keys}); {NPZ_LAYOUT}")
        names = _select(modalities, [k for k in keys if k not in (LABEL, SPLIT)], f"{str(p)!r}")
        try:
            arrays = {k: npz[k] for k in names}
            labels = npz[LABEL]
            split = npz[SPLIT] if SPLIT in keys else None
        except ValueError as err:
            raise ValueError(
                f"Could not read an array of {str(p)!r} ({err}). Object arrays are not loaded (no pickle): "
                "save strings as a fixed-width unicode array, e.g. np.array(labels, dtype=str)."
            ) from err
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{str(p)!r} is a damaged .npz archive ({err}); {NPZ_LAYOUT}") from None
    options = {
        "path": str(p),
        "seed": seed,
        "modalities": names,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "standardize": standardize,
    }
    return build_custom_dataset("custom_npz", arrays, labels, split, options)


def parse_modality_groups(modalities: str | Mapping[str, str | Sequence[str]]) -> dict[str, str | list[str]]:
    """Normalise ``modalities`` to ``{name: prefix or [columns]}``.

    Accepts a mapping, or a string ``"audio=audio_,video=video_"`` / ``"audio,video"`` (prefix = name + "_").
    """
    if isinstance(modalities, str):
        out: dict[str, str | list[str]] = {}
        for item in (s.strip() for s in modalities.split(",")):
            if not item:
                continue
            name, _, prefix = item.partition("=")
            out[name.strip()] = prefix.strip() or f"{name.strip()}_"
        groups: Mapping[str, str | Sequence[str]] = out
    elif isinstance(modalities, Mapping):
        groups = modalities
    else:
        raise TypeError(
            "Expected `modalities` as a mapping {name: prefix or [columns]} or a string like "
            f"'audio=audio_,video=video_', found {type(modalities).__name__}."
        )
    result: dict[str, str | list[str]] = {}
    for name, spec in groups.items():
        if isinstance(spec, str):
            result[str(name)] = spec
        elif isinstance(spec, Sequence) and all(isinstance(c, str) for c in spec):
            result[str(name)] = list(spec)
        else:
            raise TypeError(
                f"Modality {name!r}: expected a column prefix or a list of column names, found {spec!r}."
            )
    if not result:
        raise ValueError("`modalities` names no modality; give e.g. 'audio=audio_,video=video_'.")
    return result


def _order_columns(cols: list[str], prefix: str) -> list[str]:
    suffixes = [c[len(prefix) :].lstrip("_") for c in cols]
    if all(s.isdigit() for s in suffixes):
        return [c for _, c in sorted(zip((int(s) for s in suffixes), cols, strict=True))]
    return cols


def _check_lone_columns(groups: dict[str, list[str]], where: str) -> None:
    """A prefix of a single column close to the prefix of a multi-column group is a likely typo: an error.

    (Several 1-column modalities with alike names, ``sensor1_0`` and ``sensor2_0``, stay accepted.)
    """
    for m, cols in groups.items():
        if len(cols) != 1:
            continue
        others = [o for o in groups if o != m and len(groups[o]) > 1]
        close = difflib.get_close_matches(m, others, n=3, cutoff=0.6)
        if not close:
            continue
        near = close[0]
        span = groups[near]
        listing = f"{span[0]}..{span[-1]}" if len(span) > 1 else span[0]
        indices = [int(i) for c in span if (i := c[len(near) + 1 :]).isdigit()]
        rename = f"{near}_{max(indices) + 1}" if indices else f"{near}_<index>"
        raise ValueError(
            f"{where}: column {cols[0]!r} is the only column with prefix '{m}_', close to "
            f"{', '.join(repr(c + '_') for c in close)} ({len(span)} column(s) {listing}); as it stands it "
            f"would be a 1-feature modality {m!r} of its own, which is most likely a typo. Rename it (e.g. to "
            f"{rename!r}) if it belongs to {near!r}, or pass `modalities` to group the columns explicitly "
            f"(e.g. modalities={{{near!r}: {near + '_'!r}, {m!r}: [{cols[0]!r}], ...}} to keep it as a "
            "modality)."
        )


def _group_columns(
    header: list[str], modalities: str | Mapping[str, str | Sequence[str]] | None, where: str
) -> dict[str, list[str]]:
    features = [c for c in header if c not in (LABEL, SPLIT)]
    if modalities is None:
        groups: dict[str, list[str]] = {}
        stray = []
        for c in features:
            match = _INDEXED.match(c)
            if match:
                groups.setdefault(match.group(1), []).append(c)
            else:
                stray.append(c)
        if stray:
            raise ValueError(
                f"{where}: column(s) {stray[:10]} do not look like <modality>_<index>. Rename them, or pass "
                "`modalities` (e.g. 'audio=audio_,video=video_') to choose the column groups."
            )
        groups = {m: _order_columns(cols, f"{m}_") for m, cols in groups.items()}
        _check_lone_columns(groups, where)
        return groups
    groups = {}
    owner: dict[str, str] = {}
    for name, spec in parse_modality_groups(modalities).items():
        if isinstance(spec, str):
            cols = _order_columns([c for c in features if c.startswith(spec)], spec)
        else:
            missing = [c for c in spec if c not in features]
            if missing:
                raise ValueError(
                    f"{where}: modality {name!r} lists missing column(s) {missing}; columns: {header}."
                )
            cols = list(spec)
        if not cols:
            raise ValueError(
                f"{where}: modality {name!r} matches no column (prefix {spec!r}). Columns found: {header[:20]}"
                f"{' ...' if len(header) > 20 else ''}. Fix the prefix or the header."
            )
        for c in cols:
            if c in owner:
                raise ValueError(
                    f"{where}: column {c!r} is claimed by both {owner[c]!r} and {name!r}; use prefixes that do "
                    "not overlap (e.g. 'a_' and 'ab_') or explicit column lists."
                )
            owner[c] = name
        groups[name] = cols
    return groups


def read_csv_table(path: Path, delimiter: str = ",") -> tuple[list[str], list[list[str]], list[int]]:
    """Read a CSV file into its header, rows of strings and their line numbers (blank lines skipped).

    Raises:
        ValueError: an empty file, duplicate column names, or a row whose width differs from the header's.
    """
    try:
        return _read_csv_rows(path, delimiter)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{str(path)!r} is not a UTF-8 text CSV (byte {err.start}: {err.reason}); expected a text file "
            "with a header row. Save it as UTF-8 CSV."
        ) from None
    except csv.Error as err:
        raise ValueError(f"{str(path)!r} is not a readable CSV ({err}).") from None


def _read_csv_rows(path: Path, delimiter: str) -> tuple[list[str], list[list[str]], list[int]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{str(path)!r} is empty; expected a header row and one row per sample.")
        header = [h.strip() for h in header]
        dup = sorted({h for h in header if header.count(h) > 1})
        if dup:
            raise ValueError(
                f"{str(path)!r}: duplicate column name(s) {dup}; every column needs a unique name."
            )
        rows, lines = [], []
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{str(path)!r} line {line}: {len(row)} fields, expected {len(header)} (the header's width)."
                )
            rows.append(row)
            lines.append(line)
    return header, rows, lines


def _check_finite_cells(
    arrays: dict[str, np.ndarray],
    groups: dict[str, list[str]],
    col: dict[str, int],
    table: np.ndarray,
    lines: list[int],
    where: str,
) -> None:
    """Name the first non-finite cell (file line and column) and how many there are."""
    count, rows, first = 0, set(), None
    for m, cols in groups.items():
        bad = np.argwhere(~np.isfinite(arrays[m]))
        if bad.size == 0:
            continue
        count += len(bad)
        rows.update(bad[:, 0].tolist())
        r, c = (int(v) for v in bad[0])
        cell = (r, col[cols[c]])
        if first is None or cell < first:
            first = cell
    if first is None:
        return
    r, c = first
    raise ValueError(
        f"{where} line {lines[r]}, column {list(col)[c]!r}: found {str(table[r, c]).strip()!r}, a non-finite "
        f"value (NaN or inf); {count} such cell(s) in {len(rows)} row(s) in all (the first is shown). Fill "
        "or impute them (e.g. with the column's mean), or drop those rows."
    )


def _check_duplicate_rows(arrays: dict[str, np.ndarray], lines: list[int], where: str) -> None:
    """Rows equal in every feature column (of every modality) are one sample listed twice: an error."""
    features = np.concatenate([a.reshape(len(a), -1) for a in arrays.values()], axis=1)
    first: dict[tuple[float, ...], int] = {}
    pairs: list[tuple[int, int]] = []
    for r, row in enumerate(features.tolist()):
        j = first.setdefault(tuple(row), r)
        if j != r:
            pairs.append((j, r))
    if not pairs:
        return
    (a, b), rest = pairs[0], [lines[r] for _, r in pairs[1:]]
    more = f" {len(rest)} more repeated line(s): {_listing(rest)}." if rest else ""
    raise ValueError(
        f"{where} lines {lines[a]} and {lines[b]} hold the same value in every feature column: one sample "
        f"listed twice, which the split can put in train and in test (a leak).{more} Delete the repeated "
        "rows, keeping one of each; if they are distinct samples whose features coincide, pass "
        "allow_duplicates=true (--set data.options.allow_duplicates=true)."
    )


CSV_LAYOUT = (
    "expected a CSV with a header, a `label` column, an optional `split` column and feature columns "
    "named <modality>_<index> (e.g. audio_0..audio_12)."
)


def _feature_block(cells: np.ndarray, cols: list[str], lines: list[int], where: str) -> np.ndarray:
    """One modality's cells as float64; the first cell that is not a number is named (line, column)."""
    block = np.char.strip(cells)
    try:
        return block.astype(np.float64)
    except ValueError:
        for r, row in enumerate(block):
            for c, v in zip(cols, row, strict=True):
                try:
                    float(v)
                except ValueError:
                    raise ValueError(
                        f"{where} line {lines[r]}, column {c!r}: expected a number, found {str(v)!r}. "
                        "Fill empty cells and remove non-numeric values."
                    ) from None
        raise


def _csv_labels(cells: np.ndarray, lines: list[int], where: str) -> np.ndarray:
    """The label column: integers when every label is one, else the stripped strings; none missing."""
    label_text = np.char.strip(cells)
    missing = missing_label_error(where, label_text.tolist(), lines, "line")
    if missing is not None:
        raise missing
    if all(re.fullmatch(r"[+-]?\d+", v) for v in label_text.tolist()):
        return label_text.astype(np.int64)
    return label_text


@register_dataset("custom_csv")
def load_custom_csv(
    *,
    path: str | os.PathLike[str],
    seed: int = 0,
    modalities: str | Mapping[str, str | Sequence[str]] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    standardize: bool = True,
    delimiter: str = ",",
    allow_duplicates: bool = False,
) -> MultimodalDataset:
    """Load your own data from a CSV file whose columns are grouped into modalities (see module docstring).

    Args:
        path: the CSV file.
        seed: controls the stratified split when the file has no ``split`` column.
        modalities: column groups: ``{name: prefix or [columns]}``, ``"audio=audio_,video=video_"`` or
            ``"audio,video"``; default: infer from ``<modality>_<index>`` names.
        val_fraction, test_fraction: split fractions used when there is no ``split`` column.
        standardize: standardise each feature with training-split statistics.
        delimiter: the field separator.
        allow_duplicates: keep rows equal in every feature column (distinct samples whose features
            coincide); by default they are an error naming their lines.

    Raises:
        FileNotFoundError: missing file. ValueError: no ``label`` column, a modality with no columns,
            non-numeric or empty cells, missing labels, repeated rows, labels not 0..C-1, a bad split.
    """
    if not isinstance(allow_duplicates, bool):
        raise TypeError(f"Expected `allow_duplicates` to be True or False, found {allow_duplicates!r}.")
    seed = check_seed(seed)
    _check_fractions(val_fraction, test_fraction)  # before reading the file
    p = _resolve_path(path, "CSV", CSV_LAYOUT)
    header, rows, lines = read_csv_table(p, delimiter)
    where = repr(str(p))
    if LABEL not in header:
        raise ValueError(f"{where} has no {LABEL!r} column (columns: {header[:20]}); {CSV_LAYOUT}")
    if not rows:
        raise ValueError(f"{where} has a header but no data rows.")
    groups = _group_columns(header, modalities, where)
    col = {h: i for i, h in enumerate(header)}
    table = np.array(rows, dtype=str)
    arrays = {
        m: _feature_block(table[:, [col[c] for c in cols]], cols, lines, where) for m, cols in groups.items()
    }
    _check_finite_cells(arrays, groups, col, table, lines, where)
    labels = _csv_labels(table[:, col[LABEL]], lines, where)
    if not allow_duplicates:
        _check_duplicate_rows(arrays, lines, where)
    split = np.char.strip(table[:, col[SPLIT]]) if SPLIT in col else None
    if split is not None and all(v.isdigit() for v in split.tolist()):
        split = split.astype(np.int64)
    options = {
        "path": str(p),
        "seed": seed,
        "modalities": {m: list(c) for m, c in groups.items()},
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "standardize": standardize,
        "delimiter": delimiter,
        "allow_duplicates": allow_duplicates,
    }
    return build_custom_dataset("custom_csv", arrays, labels, split, options)
