"""Bring your own media files: a CSV manifest listing one file per modality for every sample.

**Layout** (``manifest``): a CSV file with a header row, a ``label`` column (ints ``0..C-1`` or strings,
mapped to ``0..C-1`` in sorted order with the names kept), an optional ``split`` column (``train``,
``val`` or ``test``) and one column per modality: every other column is a modality, named by its
header, holding a file path relative to the manifest's folder (absolute paths are allowed)::

    label,split,audio,image,clip,caption,feat
    dog,train,audio/0001.wav,img/0001.png,frames/0001,text/0001.txt,feat/0001.npy
    cat,val,audio/0002.flac,img/0002.jpg,frames/0002,text/0002.txt,feat/0002.npy
    dog,test,audio/0003.wav,img/0003.png,frames/0003,text/0003.txt,feat/0003.npy

Each column holds one type of file, decided by the extension (see :mod:`equimodal.data.media`):
``.npy`` arrays (one shape per column), ``.wav``/``.flac`` audio, ``.png``/``.jpg``/``.jpeg`` images,
folders of frame images, or ``.txt`` text (which needs the ``tokenizer`` option). Without a ``split``
column, rows are split per class by ``seed``, 60 / 20 / 20.

The files are read one sample at a time while training (in ``DataLoader`` workers): random crops of
audio, random frame positions and (option ``image_augment``) random image crops and flips in the
training split (seeded per sample and epoch), deterministic centre crops and evenly spaced frames,
unaugmented, otherwise. Before that, the loader checks every file (option
``check``); rows with bad files are an error naming the file, row and column, or, with
``skip_bad=True``, dropped and listed in ``info["skipped"]`` (the trainer writes ``skipped.csv``).

Rows that are wrong in themselves, not in their files, are always an error naming them (``skip_bad``
does not drop them): a label that is missing (an empty cell, or a missing-value marker such as ``nan``
or ``<NA>``, which pandas writes for a missing value: never a class), an unknown split, and a sample
listed twice, i.e. two rows naming the same file in *every* modality column (the split could put one
copy in train and the other in test). The same file in *some* columns only is fine: one audio track
shared by two videos, one image captioned twice.

Default encoders by per-sample shape, as ``custom_npz``: vectors -> ``mlp``, ``(C, T)`` (waveforms) ->
``conv1d``, ``(C, H, W)`` (images, spectrograms) -> ``cnn``, frames ``(T, C, H, W)`` -> ``resnet18``
(``base_channels=16``), token ids -> ``text_embedding`` (the tokenizer's vocabulary size). Override them
with the ``model.encoders`` config.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from .base import FileSplit, MultimodalDataset
from .custom import (
    LABEL,
    SPLIT,
    _resolve_path,
    default_encoder_spec,
    encode_labels,
    missing_label_error,
    read_csv_table,
)
from .media import (
    KIND_BY_SUFFIX,
    LocalTokenizer,
    MediaError,
    MediaKind,
    MediaSettings,
    audio_length,
    check_exists,
    check_header,
    media_kind,
    npy_shape,
    read_media,
)
from .registry import register_dataset
from .splits import SPLIT_NAMES, Indices, check_seed, split_from_assignment, stratified_split

log = logging.getLogger(__name__)

FRACTIONS = (0.6, 0.2, 0.2)
CheckLevel = Literal["header", "full", "exists"]
LAYOUT = (
    "expected a CSV with a header, a `label` column, an optional `split` column (train/val/test) and one "
    "column per modality holding file paths relative to the manifest's folder."
)
ROWS = "(Rows are data rows counted from 1; the header and blank lines are not counted.)"
FIX = (
    "Fix or replace the file (or correct its path in the manifest), or pass skip_bad=true "
    "(--set data.options.skip_bad=true) to drop such rows; they are then listed in skipped.csv."
)


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: its modality columns' cells, labels and split, one entry per data row (and the
    file line of each row, for messages)."""

    path: Path
    cells: dict[str, list[str]]
    labels: list[str]
    split: list[str] | None
    lines: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The manifest's file name, for messages."""
        return self.path.name

    @property
    def rows(self) -> int:
        """Number of data rows."""
        return len(self.labels)

    def resolve(self, cell: str) -> Path:
        """The file a cell names: relative to the manifest's folder, or absolute."""
        p = Path(cell).expanduser()
        return p if p.is_absolute() else self.path.parent / p


@dataclass(frozen=True)
class Column:
    """One modality column: its file kind, the file of every row and (for ``.npy``) the array shape."""

    name: str
    kind: MediaKind
    cells: tuple[str, ...]
    paths: tuple[Path, ...]
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BadFile:
    """A row whose file (in ``column``) failed the checks; ``row`` is 0-based."""

    row: int
    column: str
    cell: str
    reason: str

    def message(self, manifest: str) -> str:
        """``"m.csv row 7, column 'audio': file 'x.wav' is empty (0 bytes)"``."""
        what = f"file {self.cell!r} {self.reason}" if self.cell else "the cell is empty (no file path given)"
        return f"{manifest} row {self.row + 1}, column {self.column!r}: {what}"

    def record(self) -> dict[str, object]:
        """The row as listed in ``info["skipped"]`` / ``skipped.csv`` (1-based ``row``)."""
        reason = self.reason if self.cell else "empty cell (no file path given)"
        return {"row": self.row + 1, "column": self.column, "path": self.cell, "reason": reason}


@dataclass(frozen=True)
class ManifestReader:
    """Reads one manifest row's files: ``reader(row_index, generator) -> {modality: tensor}``.

    It holds paths and settings only (the tokenizer is reloaded lazily), so it pickles into workers.
    """

    manifest: str
    columns: tuple[Column, ...]
    settings: MediaSettings

    def __call__(self, index: int, generator: torch.Generator | None) -> dict[str, Tensor]:
        return {c.name: self.read(c, index, generator) for c in self.columns}

    def read(self, column: Column, index: int, generator: torch.Generator | None) -> Tensor:
        """Row ``index`` of ``column``; a bad file raises a ``ValueError`` naming row, column and file."""
        try:
            x = read_media(column.kind, column.paths[index], self.settings, generator)
        except MediaError as err:
            bad = BadFile(index, column.name, column.cells[index], str(err))
            raise ValueError(
                f"{bad.message(self.manifest)}. Fix or replace the file; check='full' finds such files "
                f"before training. {ROWS}"
            ) from err
        if column.shape is not None and tuple(x.shape) != column.shape:
            bad = BadFile(index, column.name, column.cells[index], f"holds shape {tuple(x.shape)}")
            raise ValueError(
                f"{bad.message(self.manifest)}, but the column's arrays have shape {column.shape}. Every "
                f"file of a column needs the same shape; check='header' finds such files before training. {ROWS}"
            )
        return x


# ------------------------------------------------------------------------------------ the manifest
def read_manifest(path: Path) -> Manifest:
    """Parse the manifest CSV: label, optional split and the modality columns.

    Raises:
        ValueError: not UTF-8, no ``label`` column, no modality column, no data rows, missing labels,
            unknown split values or a sample listed twice (each naming the rows).
    """
    try:
        header, rows, lines = read_csv_table(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({err}); {LAYOUT}") from err
    name = path.name
    if LABEL not in header:
        raise ValueError(f"{name} has no {LABEL!r} column (columns: {header[:20]}); {LAYOUT}")
    modalities = [h for h in header if h not in (LABEL, SPLIT)]
    if not modalities:
        raise ValueError(
            f"{name} has no modality column besides {LABEL!r}/{SPLIT!r} (columns: {header}); add one column "
            "of file paths per modality."
        )
    if len(modalities) < 2:
        raise ValueError(
            f"{name} has one modality column ({modalities[0]!r}); balancing needs at least two. Add a column of "
            "file paths per further modality (columns other than 'label' and 'split' are modalities)."
        )
    if "" in modalities:
        raise ValueError(f"{name}: column {header.index('') + 1} has no name; give every column a header.")
    if not rows:
        raise ValueError(f"{name} has a header but no data rows; add one row per sample. {LAYOUT}")
    col = {h: i for i, h in enumerate(header)}

    def cells(h: str) -> list[str]:
        return [r[col[h]].strip() for r in rows]

    labels = cells(LABEL)
    missing = missing_label_error(name, labels, range(1, len(labels) + 1), "row", ROWS)
    if missing is not None:
        raise missing
    split = cells(SPLIT) if SPLIT in col else None
    if split is not None:
        split = _check_split(name, split)
    manifest = Manifest(path, {m: cells(m) for m in modalities}, labels, split, lines)
    _check_duplicates(manifest)
    return manifest


def _check_duplicates(manifest: Manifest) -> None:
    """Two rows naming the same file in every modality column are one sample listed twice: an error.

    Paths are compared as the manifest resolves them (``a/../x.wav`` is ``x.wav``); a row with an empty
    cell is left to the file checks.
    """
    first: dict[tuple[str, ...], int] = {}
    pairs: list[tuple[int, int]] = []
    columns = list(manifest.cells.values())
    for i in range(manifest.rows):
        cells = [c[i] for c in columns]
        if not all(cells):
            continue
        key = tuple(os.path.normpath(manifest.resolve(c)) for c in cells)
        j = first.setdefault(key, i)
        if j != i:
            pairs.append((j, i))
    if not pairs:
        return
    (a, b), lines = pairs[0], manifest.lines
    where = f" (file lines {lines[a]} and {lines[b]})" if lines else ""
    more = (
        f" {len(pairs) - 1} more repeated row(s): rows {_rows([r + 1 for _, r in pairs[1:]])}."
        if len(pairs) > 1
        else ""
    )
    files = ", ".join(f"{m}={manifest.cells[m][a]!r}" for m in manifest.cells)
    raise ValueError(
        f"{manifest.name}: rows {a + 1} and {b + 1}{where} list the same file in every modality column "
        f"({files}): one sample listed twice, which the split can put in train and in test (a leak).{more} "
        "Delete the repeated rows, keeping one of each. (The same file in some columns only, one audio "
        f"track shared by two videos, is fine.) {ROWS}"
    )


def _check_split(name: str, split: list[str]) -> list[str]:
    low = [v.lower() for v in split]
    bad = [i for i, v in enumerate(low) if v not in SPLIT_NAMES]
    if bad:
        i = bad[0]
        more = f" ({len(bad)} rows in all: {_rows([b + 1 for b in bad])})" if len(bad) > 1 else ""
        raise ValueError(
            f"{name} row {i + 1}, column {SPLIT!r}: unknown split {split[i]!r}{more}; expected 'train', 'val' "
            f"or 'test'. Fix the value, or drop the {SPLIT!r} column to get a stratified split by seed. {ROWS}"
        )
    return low


def _rows(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (", ..." if len(rows) > limit else "")


def _parse_labels(labels: list[str]) -> np.ndarray:
    """Ints when every label is an integer, else strings (as ``custom_csv``)."""
    if all(re.fullmatch(r"[+-]?\d+", v) for v in labels):
        return np.array(labels).astype(np.int64)
    return np.array(labels, dtype=str)


# --------------------------------------------------------------------------------------- columns
def column_kind(manifest: Manifest, column: str) -> MediaKind:
    """The one file kind of a column (by extension; a folder is frames).

    Raises:
        ValueError: an unsupported extension, a column mixing kinds, or a column without any path.
    """
    seen: dict[MediaKind, int] = {}
    cells = manifest.cells[column]
    for i, cell in enumerate(cells):
        if not cell:
            continue
        kind = media_kind(manifest.resolve(cell))
        if kind is None:
            supported = ", ".join(KIND_BY_SUFFIX)
            raise ValueError(
                f"{manifest.name} row {i + 1}, column {column!r}: unsupported file type "
                f"{Path(cell).suffix!r} ({cell!r}); supported: {supported}, or a folder of frame images. "
                f"Convert the file or drop the column. {ROWS}"
            )
        seen.setdefault(kind, i)
        if len(seen) > 1:
            (k1, r1), (k2, r2) = seen.items()
            raise ValueError(
                f"{manifest.name}: column {column!r} mixes file types {k1!r} (row {r1 + 1}, {cells[r1]!r}) "
                f"and {k2!r} (row {r2 + 1}, {cells[r2]!r}). Every column must hold one type of file; put "
                f"each type in a column of its own. {ROWS}"
            )
    if not seen:
        raise ValueError(f"{manifest.name}: column {column!r} has no file path in any row; fill or drop it.")
    return next(iter(seen))


def manifest_columns(manifest: Manifest, settings: MediaSettings) -> tuple[Column, ...]:
    """Every modality column with its kind and resolved paths (text columns need a tokenizer)."""
    out = []
    for name, cells in manifest.cells.items():
        kind = column_kind(manifest, name)
        if kind == "text" and settings.tokenizer is None:
            raise ValueError(
                f"{manifest.name}: column {name!r} holds .txt files, which need a tokenizer: pass the option "
                "`tokenizer` with a local tokenizer.json file or tokenizer folder, e.g. "
                "--set data.options.tokenizer=path/to/tokenizer.json."
            )
        paths = tuple(manifest.resolve(c) for c in cells)
        out.append(Column(name, kind, tuple(cells), paths))
    return tuple(out)


# ---------------------------------------------------------------------------------------- checks
def check_file(
    path: Path, kind: MediaKind, level: CheckLevel, settings: MediaSettings
) -> tuple[int, ...] | None:
    """Check one file at ``level``; returns the ``.npy`` shape when its header was read.

    Raises:
        MediaError: the file is missing, empty or cannot be decoded.
    """
    if level == "exists":
        check_exists(path, kind)
        return None
    shape = check_header(path, kind)
    if level == "full":
        read_media(kind, path, settings)
    return shape


def find_bad_files(
    columns: tuple[Column, ...], rows: int, level: CheckLevel, settings: MediaSettings
) -> tuple[list[BadFile], dict[str, dict[int, tuple[int, ...]]]]:
    """Check every row's files; returns the bad rows (the first bad file of each) and the ``.npy`` shapes."""
    bad: list[BadFile] = []
    shapes: dict[str, dict[int, tuple[int, ...]]] = {c.name: {} for c in columns if c.kind == "npy"}
    for i in range(rows):
        for c in columns:
            try:
                if not c.cells[i]:
                    raise MediaError("is empty")
                shape = check_file(c.paths[i], c.kind, level, settings)
            except MediaError as err:
                bad.append(BadFile(i, c.name, c.cells[i], str(err)))
                break
            if shape is not None:
                shapes[c.name][i] = shape
    return bad, shapes


def drop_bad_rows(name: str, bad: list[BadFile], rows: int, skip_bad: bool) -> np.ndarray:
    """The rows to keep (bool mask); without ``skip_bad`` any bad row is an error naming it."""
    if bad and not skip_bad:
        more = ""
        if len(bad) > 1:
            more = f" {len(bad) - 1} more row(s) have bad files: rows {_rows([b.row + 1 for b in bad[1:]])}."
        raise ValueError(f"{bad[0].message(name)}.{more} {FIX} {ROWS}")
    keep = np.ones(rows, dtype=bool)
    keep[[b.row for b in bad]] = False
    if bad:
        log.warning(
            "%s: skipped %d of %d rows with bad files (skip_bad=true), e.g. %s. They are listed in the "
            "dataset's info['skipped'] and in skipped.csv in the run folder.",
            name, len(bad), rows, bad[0].message(name),
        )  # fmt: skip
    if not keep.any():
        raise ValueError(f"{name}: every one of the {rows} rows has a bad file, so none is left. {FIX}")
    return keep


def with_shapes(
    manifest: str,
    columns: tuple[Column, ...],
    shapes: dict[str, dict[int, tuple[int, ...]]],
    keep: np.ndarray,
) -> tuple[Column, ...]:
    """Set each ``.npy`` column's shape; the kept rows must agree (headers read where not done yet)."""
    out = []
    first = int(np.flatnonzero(keep)[0])
    for c in columns:
        if c.kind == "npy":
            found = {i: s for i, s in shapes.get(c.name, {}).items() if keep[i]}
            if not found:
                found = {first: _first_shape(manifest, c, first)}
            c = replace(c, shape=_one_shape(manifest, c, found))
        out.append(c)
    return tuple(out)


def _first_shape(manifest: str, column: Column, row: int) -> tuple[int, ...]:
    try:
        return npy_shape(column.paths[row])
    except MediaError as err:
        bad = BadFile(row, column.name, column.cells[row], str(err))
        raise ValueError(f"{bad.message(manifest)}. {FIX} {ROWS}") from err


def _one_shape(manifest: str, column: Column, found: dict[int, tuple[int, ...]]) -> tuple[int, ...]:
    by_shape: dict[tuple[int, ...], int] = {}
    for i, s in found.items():
        by_shape.setdefault(s, i)
    if len(by_shape) > 1:
        (s1, r1), (s2, r2) = list(by_shape.items())[:2]
        raise ValueError(
            f"{manifest}: column {column.name!r} holds .npy arrays of different shapes: {s1} (row {r1 + 1}, "
            f"{column.cells[r1]!r}) and {s2} (row {r2 + 1}, {column.cells[r2]!r}). Every file of a column "
            f"needs the same shape; pad, crop or resample the arrays to one shape. {ROWS}"
        )
    return next(iter(by_shape))


# ---------------------------------------------------------------------------------------- splits
def split_rows(
    manifest: Manifest, y: np.ndarray, names: list[str] | None, keep: np.ndarray, seed: int
) -> Indices:
    """Row indices of train, val and test among the kept rows (the manifest's split, or stratified)."""
    kept = np.flatnonzero(keep)
    skipped = int((~keep).sum())
    after = f" after skipping {skipped} row(s) with bad files" if skipped else ""
    num_classes = int(y.max()) + 1
    counts = np.bincount(y[kept], minlength=num_classes)
    gone = [_class_name(c, names) for c in np.flatnonzero(counts == 0)]
    if gone:
        raise ValueError(
            f"{manifest.name}: class(es) {gone} have no rows left{after}. Fix their files (see the skipped "
            "rows) or add rows of those classes."
        )
    if manifest.split is not None:
        try:
            parts = split_from_assignment(np.array(manifest.split)[kept])
        except ValueError as err:
            raise ValueError(f"{manifest.name}{after}: {err}") from err
    else:
        parts = stratified_split(y[kept], FRACTIONS, seed)
        _check_stratified(manifest.name, y[kept], parts, names, after)
    return kept[parts[0]], kept[parts[1]], kept[parts[2]]


def _class_name(c: int, names: list[str] | None) -> str | int:
    return names[c] if names is not None else int(c)


def _check_stratified(name: str, y: np.ndarray, parts: Indices, names: list[str] | None, after: str) -> None:
    per_part = np.stack([np.bincount(y[p], minlength=int(y.max()) + 1) for p in parts])
    short = np.flatnonzero((per_part == 0).any(axis=0))
    if short.size:
        c = int(short[0])
        got = "/".join(str(int(n)) for n in per_part[:, c])
        raise ValueError(
            f"{name}: class {_class_name(c, names)!r} has {int(per_part[:, c].sum())} rows{after}, too few for "
            f"the stratified 60/20/20 split by seed (it gets {got} train/val/test rows); every class needs at "
            f"least one row in each split (4 rows do). Add rows of that class, or give a {SPLIT!r} column."
        )


# ------------------------------------------------------------------------------------- settings
def _positive(name: str, value: object, kind: type = int) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (kind is int and not isinstance(value, int)):
        word = "a positive integer" if kind is int else "a positive number"
        raise ValueError(f"Expected option `{name}` to be {word}, found {value!r}.")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"Expected option `{name}` to be one of {', '.join(map(repr, choices))}, found {value!r}."
        )


def media_settings(
    *, sample_rate: int, audio_seconds: float, audio: str, n_fft: int, hop_length: int, image_size: int,
    image_mode: str, frames: int, tokenizer: str | os.PathLike[str] | None, max_tokens: int,
    image_augment: str = "none",
) -> MediaSettings:  # fmt: skip
    """Validate the reading options and bundle them (the tokenizer is not loaded here)."""
    for key, v in (("sample_rate", sample_rate), ("n_fft", n_fft), ("hop_length", hop_length),
                   ("image_size", image_size), ("frames", frames), ("max_tokens", max_tokens)):  # fmt: skip
        _positive(key, v)
    _positive("audio_seconds", audio_seconds, float)
    _choice("audio", audio, ("waveform", "spectrogram"))
    _choice("image_mode", image_mode, ("RGB", "L"))
    _choice("image_augment", image_augment, ("none", "flip", "crop_flip"))
    length = audio_length(audio_seconds, sample_rate)
    if audio == "spectrogram" and n_fft > length:
        raise ValueError(
            f"Option n_fft={n_fft} is longer than a clip (audio_seconds * sample_rate = {length} samples); "
            "lower n_fft or raise audio_seconds."
        )
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"Expected option `tokenizer` to be a path, found {type(tokenizer).__name__}.")
    return MediaSettings(
        sample_rate, float(audio_seconds), audio, n_fft, hop_length, image_size, image_mode, frames,  # type: ignore[arg-type]
        max_tokens, LocalTokenizer(tokenizer) if tokenizer is not None else None, image_augment,  # type: ignore[arg-type]
    )  # fmt: skip


def tokenizer_vocab(tokenizer: LocalTokenizer) -> int:
    """Load the tokenizer (checking the ``tokenizer`` option) and return its vocabulary size."""
    if not tokenizer.path.exists():
        raise ValueError(
            f"Option `tokenizer`: no file or folder at {str(tokenizer.path)!r}. Pass a local tokenizer.json "
            "file (saved by the tokenizers library) or a tokenizer folder (saved by transformers)."
        )
    try:
        return tokenizer.vocab_size
    except ImportError:
        raise
    except Exception as err:  # the tokenizer libraries raise their own exception types
        raise ValueError(
            f"Option `tokenizer`: could not load {str(tokenizer.path)!r} ({type(err).__name__}: {err}). Pass "
            "a tokenizer.json file saved by the tokenizers library, or a folder saved by transformers."
        ) from err


# -------------------------------------------------------------------------------------- encoders
def encoder_spec(column: Column, shape: tuple[int, ...], vocab: int | None) -> tuple[str, dict[str, object]]:
    """The default encoder (registered name, options) of a column whose samples have ``shape``."""
    if column.kind == "frames":
        return "resnet18", {"in_channels": int(shape[1]), "base_channels": 16}
    if column.kind == "text":
        return "text_embedding", {"vocab_size": int(vocab or 0)}
    return default_encoder_spec(shape)


def _encoders(specs: dict[str, tuple[str, dict[str, object]]]) -> Callable[[], dict[str, nn.Module]]:
    def build() -> dict[str, nn.Module]:
        from ..models.encoders import create_encoder

        return {m: create_encoder(name, **kw) for m, (name, kw) in specs.items()}

    return build


def _file_split(reader: ManifestReader, rows: np.ndarray, y: np.ndarray, train: bool, seed: int) -> FileSplit:
    records = torch.from_numpy(rows.astype(np.int64))
    return FileSplit(reader, records, torch.from_numpy(y[rows].astype(np.int64)), train=train, seed=seed)


# ---------------------------------------------------------------------------------------- loader
@register_dataset("manifest")
def load_manifest(
    *,
    path: str | os.PathLike[str],
    seed: int = 0,
    check: CheckLevel = "header",
    skip_bad: bool = False,
    sample_rate: int = 16000,
    audio_seconds: float = 3.0,
    audio: Literal["waveform", "spectrogram"] = "spectrogram",
    n_fft: int = 512,
    hop_length: int = 160,
    image_size: int = 64,
    image_mode: Literal["RGB", "L"] = "RGB",
    image_augment: Literal["none", "flip", "crop_flip"] = "none",
    frames: int = 4,
    tokenizer: str | os.PathLike[str] | None = None,
    max_tokens: int = 64,
) -> MultimodalDataset:
    """Load your own media files listed in a CSV manifest (layout in the module docstring).

    Args:
        path: the manifest CSV; file paths in it are relative to its folder (or absolute).
        seed: controls the stratified 60/20/20 split when there is no ``split`` column, and the random
            training transforms.
        check: how far every file is checked before training: ``"exists"`` (exists and is non-empty),
            ``"header"`` (also parses headers cheaply: audio info, image verify, ``.npy`` shape, first
            image of a frame folder, text decodes as UTF-8) or ``"full"`` (reads every sample).
        skip_bad: drop rows whose files fail the check (listed in ``info["skipped"]``, a warning gives the
            count) instead of raising an error naming the first of them.
        sample_rate: audio is resampled (soxr) to this rate in Hz.
        audio_seconds: audio clip length: longer files are cropped (random offset in training, centred
            otherwise), shorter ones zero-padded at the end.
        audio: ``"spectrogram"`` (``log(1 + |STFT|)``, ``(1, n_fft // 2 + 1, frames)``) or ``"waveform"``
            (``(1, samples)``).
        n_fft: STFT size of the spectrogram (Hann window).
        hop_length: STFT hop of the spectrogram.
        image_size: images and frames are resized (bilinear) to ``image_size x image_size``.
        image_mode: ``"RGB"`` (3 channels) or ``"L"`` (grayscale, 1 channel).
        image_augment: random training transform of images and frame folders (one draw per sample and
            epoch, the same for every frame of a folder): ``"none"``, ``"flip"`` (left-right, p = 1/2) or
            ``"crop_flip"`` (``RandomResizedCrop`` then the flip, as the official CREMA-D code).
            Evaluation splits are never augmented.
        frames: frames taken from each frame folder (random sorted positions in training, evenly spaced
            otherwise; a folder with fewer images repeats its last one).
        tokenizer: a local ``tokenizer.json`` file or tokenizer folder (transformers), needed for ``.txt``
            columns; nothing is downloaded. Token id 0 is the padding id.
        max_tokens: text is truncated or padded (id 0) to this many tokens.

    Raises:
        FileNotFoundError: no manifest at ``path``. ValueError: a manifest without ``label`` or modality
            columns or rows, an unknown split value, a column mixing file types, ``.npy`` shapes that
            differ, a class too small for the split, or a missing/empty/corrupt file (naming its row,
            column and path) without ``skip_bad``. ImportError: a media library is not installed.
    """
    seed = check_seed(seed)
    _choice("check", check, ("header", "full", "exists"))
    if not isinstance(skip_bad, bool):
        raise TypeError(f"Expected option `skip_bad` to be True or False, found {skip_bad!r}.")
    settings = media_settings(
        sample_rate=sample_rate, audio_seconds=audio_seconds, audio=audio, n_fft=n_fft, hop_length=hop_length,
        image_size=image_size, image_mode=image_mode, frames=frames, tokenizer=tokenizer, max_tokens=max_tokens,
        image_augment=image_augment,
    )  # fmt: skip
    manifest = read_manifest(_resolve_path(path, "manifest CSV", LAYOUT).absolute())
    options = {
        "path": str(manifest.path), "seed": seed, "check": check, "skip_bad": skip_bad,
        "sample_rate": sample_rate, "audio_seconds": audio_seconds, "audio": audio, "n_fft": n_fft,
        "hop_length": hop_length, "image_size": image_size, "image_mode": image_mode,
        "image_augment": image_augment, "frames": frames,
        "tokenizer": None if tokenizer is None else str(tokenizer), "max_tokens": max_tokens,
    }  # fmt: skip
    return build_manifest_dataset(
        manifest, settings, check=check, skip_bad=skip_bad, seed=seed, options=options
    )


def build_manifest_dataset(
    manifest: Manifest, settings: MediaSettings, *, check: CheckLevel, skip_bad: bool, seed: int,
    options: dict[str, object],
) -> MultimodalDataset:  # fmt: skip
    """Check the manifest's files, drop or refuse bad rows, split the rows and assemble the dataset.

    ``options`` (the loader's resolved options) are recorded in ``info``.
    """
    columns = manifest_columns(manifest, settings)
    vocab = None
    if settings.tokenizer is not None and any(c.kind == "text" for c in columns):
        vocab = tokenizer_vocab(settings.tokenizer)
    bad, shapes = find_bad_files(columns, manifest.rows, check, settings)
    keep = drop_bad_rows(manifest.name, bad, manifest.rows, skip_bad)
    columns = with_shapes(manifest.name, columns, shapes, keep)
    try:
        y, class_names = encode_labels(_parse_labels(manifest.labels))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{manifest.name}, column {LABEL!r}: {err}") from err
    train, val, test = split_rows(manifest, y, class_names, keep, seed)
    reader = ManifestReader(manifest.name, columns, settings)
    first = reader(int(train[0]), None)
    specs = {c.name: encoder_spec(c, tuple(first[c.name].shape), vocab) for c in columns}
    split = (
        f"from the manifest's {SPLIT!r} column"
        if manifest.split is not None
        else f"stratified by seed {FRACTIONS}"
    )
    return MultimodalDataset(
        name="manifest",
        train=_file_split(reader, train, y, True, seed),
        val=_file_split(reader, val, y, False, seed),
        test=_file_split(reader, test, y, False, seed),
        num_classes=int(y.max()) + 1,
        modalities=[c.name for c in columns],
        default_encoders=_encoders(specs),
        class_names=class_names,
        info={
            "source": str(manifest.path),
            "licence": "user data",
            "attribution": "",
            "options": options,
            "split": split,
            "columns": {c.name: c.kind for c in columns},
            "skipped": [b.record() for b in bad],
        },  # fmt: skip
    )
