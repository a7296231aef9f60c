"""The image-text preparer (``sarcasm``, ``twitter15``): tsv splits, texts and images.

Raw layout (the AMSS text-image code's, spec section 10): one tsv per split with a header row naming
the columns ``Label``, ``String`` (the text) and ``ImageID``, plus a folder of images::

    RAW/train.tsv  RAW/<val>.tsv  RAW/test.tsv  RAW/images/<ImageID>[.jpg]

The tsv files are parsed as the official loader parses them (``pandas.read_csv(sep="\\t")``: tabs,
``"``-quoted fields). Column names are matched with aliases after dropping a ``#<n> `` prefix and
case (``Label`` / ``#1 Label``, ``ImageID`` / ``#2 ImageID``, ``String`` / ``#3 String``); extra
columns (``index``) are ignored. Twitter-2015's second
``#3 String`` column is the aspect target, which replaces the ``$T$`` mark in the text.

Prepared layout (:mod:`equimodal.prepare.base`)::

    OUT/manifest.csv        key, label, split, text, image (paths relative to OUT)
    OUT/texts/<key>.txt     the text, UTF-8 (key = <split>-<tsv line number>, e.g. train-000002)
    OUT/images/<name>.jpg   the image as RGB JPEG, shorter side ``image_size`` (one file per image,
                            shared by the rows that name it)
    OUT/splits/{train,val,test}.txt, OUT/prepare.json

A row is skipped, and listed in ``prepare.json`` under ``skipped`` with its tsv file, line and reason,
when its line is malformed, its label is unknown, its text is empty, its ImageID is unsafe, or its
image is missing, empty or cannot be decoded. Images are converted in parallel and resumably; texts
and the manifest are rewritten on every run.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...prepare.base import (
    Item,
    PrepareError,
    Report,
    check_resume_settings,
    prepare_logger,
    run_items,
    save_jpeg,
    save_text,
    write_layout,
)
from ...prepare.media import resize_frame
from .spec import ImageTextSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
COLUMNS = ("text", "image")
ALIASES: dict[str, tuple[str, ...]] = {
    "label": ("label", "sentiment", "polarity"),
    "image": ("imageid", "image_id", "image"),
    "text": ("string", "text", "tweet", "sentence"),
    "target": ("target", "aspect", "entity"),
}
TARGET_MARK = "$T$"


@dataclass(frozen=True)
class TsvRow:
    """One usable-looking tsv data row (its image still to be found and decoded)."""

    split: str
    file: Path
    line: int
    label: str
    text: str
    image_id: str

    @property
    def key(self) -> str:
        """``<split>-<line>``: unique in a prepared folder, and points back at the tsv line."""
        return f"{self.split}-{self.line:06d}"

    def skipped(self, reason: str, files: str = "") -> dict[str, str]:
        """The ``prepare.json`` record of this row being skipped."""
        where = f"{self.file.name} line {self.line}" + (f"; {files}" if files else "")
        return {"clip": self.key, "files": where, "reason": reason}


@dataclass(frozen=True)
class TsvColumns:
    """Column positions of one tsv file, and the header names they were matched to."""

    label: int
    image: int
    text: int
    target: int | None
    names: dict[str, str]

    @property
    def width(self) -> int:
        """The fewest fields a data line needs."""
        used = [self.label, self.image, self.text] + ([self.target] if self.target is not None else [])
        return max(used) + 1


# ------------------------------------------------------------------------------------------- tsv files
def find_split_files(raw: Path, spec: ImageTextSpec) -> dict[str, Path]:
    """The tsv file of every split (first existing accepted name).

    Raises:
        FileNotFoundError: a split's file is missing (names the accepted names and the tsv files found).
    """
    found: dict[str, Path] = {}
    for split, names in spec.splits.items():
        path = next((raw / n for n in names if (raw / n).is_file()), None)
        if path is None:
            present = sorted(p.name for p in raw.glob("*.tsv")) or ["none"]
            raise FileNotFoundError(
                f"{spec.dataset}: no {split} split file in {str(raw)!r}: expected {' or '.join(names)} (the "
                f"official split); tsv files found: {', '.join(present)}. Pass --raw the folder holding "
                f"{', '.join(n[0] for n in spec.splits.values())} and the image folder."
            )
        found[split] = path
    return found


def _normalise(name: str) -> str:
    return re.sub(r"^#\d+\s*", "", name.strip().lstrip("\ufeff")).strip().lower().replace(" ", "_")


def map_columns(header: Sequence[str], file: Path, spec: ImageTextSpec) -> TsvColumns:
    """Match a tsv header to label / image / text (/ target) columns by alias.

    For a dataset with a target, the target is a ``target``-alias column or else the second column
    whose name is the text's (Twitter-2015's header repeats ``#3 String``).

    Raises:
        ValueError: a required column is missing (names the file, the header and the aliases).
    """
    norm = [_normalise(h) for h in header]

    def first(role: str, skip: int | None = None) -> int | None:
        return next((i for i, n in enumerate(norm) if n in ALIASES[role] and i != skip), None)

    where = {role: first(role) for role in ("label", "image", "text")}
    missing = [role for role, i in where.items() if i is None]
    target = None
    if spec.target and not missing:
        target = first("target")
        if target is None:
            text = where["text"]
            target = next((i for i, n in enumerate(norm) if n == norm[text] and i != text), None)  # type: ignore[index]
        if target is None:
            missing.append("target")
    if missing:
        expected = "; ".join(f"{r}: {' / '.join(ALIASES[r])}" for r in missing)
        raise ValueError(
            f"{file}: the header {list(header)} has no column for {missing} (accepted names, case-insensitive, "
            f"an optional '#<n> ' prefix allowed: {expected}). The first line of every split file must name "
            "its columns, as the official release does."
        )
    label, image, text = (int(where[r]) for r in ("label", "image", "text"))  # type: ignore[arg-type]
    names = {r: header[i] for r, i in (("label", label), ("image", image), ("text", text))}
    if target is not None:
        names["target"] = f"{header[target]} (column {target + 1})"
    return TsvColumns(label, image, text, target, names)


def _safe_id(image_id: str) -> bool:
    return bool(image_id) and image_id not in (".", "..") and not any(c in image_id for c in "/\\\0")


def _row(
    fields: list[str], cols: TsvColumns, split: str, file: Path, line: int, spec: ImageTextSpec
) -> TsvRow | dict[str, str]:
    """The row of one data line, or the record of why it is skipped."""
    stub = TsvRow(split, file, line, "", "", "")
    if len(fields) < cols.width:
        return stub.skipped(f"has {len(fields)} tab-separated fields, the header needs at least {cols.width}")
    label, image_id = fields[cols.label].strip(), fields[cols.image].strip()
    text = fields[cols.text]
    if cols.target is not None:
        text = text.replace(TARGET_MARK, fields[cols.target].strip())
    text = text.strip()
    if label not in spec.labels:
        known = ", ".join(repr(k) for k in spec.labels)
        return stub.skipped(f"unknown label {label!r} (expected {known})")
    if not text:
        return stub.skipped("empty text")
    if not _safe_id(image_id):
        return stub.skipped(f"ImageID {image_id!r} is empty or not a plain file name")
    return TsvRow(split, file, line, label, text, image_id)


def read_tsv(
    file: Path, split: str, spec: ImageTextSpec
) -> tuple[list[TsvRow], list[dict[str, str]], TsvColumns]:
    """The rows of one split file, the records of the lines skipped, and the column mapping.

    Parsed as the official loader parses it (``pandas.read_csv(path, sep="\\t")``): tab-separated,
    ``"``-quoted fields unquoted (a quoted field may hold tabs or line breaks), blank lines ignored.
    A row is keyed by the line it starts on.

    Raises:
        ValueError: the file is not UTF-8, is empty, or its header lacks a required column.
    """
    try:
        content = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{file} is not UTF-8 text ({err}); re-save it as UTF-8 (the official files are)."
        ) from err
    reader = csv.reader(io.StringIO(content, newline=""), delimiter="\t")
    header = next((r for r in reader if r), None)
    if header is None:
        raise ValueError(f"{file} is empty; expected a header line and one line per sample.")
    cols = map_columns(header, file, spec)
    rows: list[TsvRow] = []
    skipped: list[dict[str, str]] = []
    start = reader.line_num + 1
    for fields in reader:
        if fields and any(f.strip() for f in fields):
            row = _row(fields, cols, split, file, start, spec)
            (rows if isinstance(row, TsvRow) else skipped).append(row)  # type: ignore[arg-type]
        start = reader.line_num + 1
    return rows, skipped, cols


# ----------------------------------------------------------------------------------------------- images
def index_images(folder: Path) -> dict[str, Path]:
    """File name -> path of every file directly in ``folder``.

    Raises:
        FileNotFoundError: ``folder`` is not a folder (names the ``image_dir`` option).
    """
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No image folder {str(folder)!r}: the images must lie in RAW/<image_dir>/<ImageID>[.jpg]. Move "
            "them there or pass --set image_dir=<folder name> (relative to --raw)."
        )
    return {p.name: p for p in folder.iterdir() if p.is_file()}


def resolve_image(image_id: str, files: Mapping[str, Path]) -> Path | None:
    """The image file of an ImageID: the name itself, or with an image extension appended."""
    for name in (image_id, *(image_id + ext for ext in IMAGE_EXTENSIONS)):
        if name in files:
            return files[name]
    return None


def output_name(source: Path) -> str:
    """``images/<name>.jpg`` for a raw image: ``123.jpg`` stays, ``123.png`` becomes ``123.png.jpg``."""
    name = source.name if source.suffix.lower() == ".jpg" else f"{source.name}.jpg"
    return f"images/{name}"


def convert_image(item: Item, out: Path) -> None:
    """Work function: decode ``item.inputs[0]`` as RGB, resize its shorter side, save it as JPEG.

    ``item.args = (image_size,)``; 0 keeps the original size. EXIF orientation is not applied (the
    official loader, ``PIL.Image.open(...).convert("RGB")``, does not apply it either).
    """
    from PIL import Image

    source, (size,) = item.inputs[0], item.args
    if not source.is_file():
        raise PrepareError(f"image {str(source)!r} is missing")
    if source.stat().st_size == 0:
        raise PrepareError(f"image {str(source)!r} is empty (0 bytes)")
    try:
        with Image.open(source) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise PrepareError(f"image {str(source)!r} cannot be decoded ({type(err).__name__}: {err})") from err
    save_jpeg(out / item.outputs[0], resize_frame(rgb, size or None))


# -------------------------------------------------------------------------------------------- preparer
def _plan(
    rows: list[TsvRow], files: Mapping[str, Path], folder: Path, image_size: int
) -> tuple[list[tuple[TsvRow, str]], dict[str, Item], list[dict[str, str]]]:
    """Each row with its output image, the image items to run, and the rows whose image is missing."""
    planned: list[tuple[TsvRow, str]] = []
    items: dict[str, Item] = {}
    skipped: list[dict[str, str]] = []
    for row in rows:
        source = resolve_image(row.image_id, files)
        if source is None:
            looked = f"{folder / row.image_id} (also with {', '.join(IMAGE_EXTENSIONS[:3])})"
            skipped.append(row.skipped(f"image not found: {looked}", str(folder / row.image_id)))
            continue
        name = output_name(source)
        items.setdefault(name, Item(name, (source,), (name,), (image_size,)))
        planned.append((row, name))
    return planned, items, skipped


def prepare_image_text(
    spec: ImageTextSpec,
    raw: Path,
    out: Path,
    /,
    *,
    workers: int,
    image_size: int = 256,
    image_dir: str = "images",
) -> dict[str, Any]:
    """Prepare the image-text dataset ``spec`` describes: texts as UTF-8 files, images as RGB JPEG.

    Registered for each dataset with ``spec`` bound (``equimodal prepare sarcasm ...``); the layout and
    what is skipped are in the module docstring.

    Args:
        spec: what differs between the datasets (labels, split files, the target column, ...).
        raw: the folder holding the tsv files and the image folder.
        out: the prepared folder (resumable).
        workers: processes converting images.
        image_size: shorter side of the saved images (0: original size); the loader resizes to 224 x 224.
        image_dir: the image folder, relative to ``raw`` (Twitter-2015's release names it
            ``twitter2015_images``).

    Returns:
        What ``prepare.json`` holds.
    """
    if image_size < 0:
        raise ValueError(f"image_size must be >= 0 (0 keeps the original size), found {image_size}.")
    split_files = find_split_files(raw, spec)
    rows: list[TsvRow] = []
    skipped: list[dict[str, str]] = []
    columns: dict[str, dict[str, str]] = {}
    for split, file in split_files.items():
        split_rows, split_skipped, cols = read_tsv(file, split, spec)
        rows += split_rows
        skipped += split_skipped
        columns[file.name] = cols.names
    folder = raw / image_dir
    planned, items, missing = _plan(rows, index_images(folder), folder, image_size)
    skipped += missing
    out.mkdir(parents=True, exist_ok=True)
    check_resume_settings(out, {"image_size": image_size})
    report = run_items(
        list(items.values()), convert_image, out, workers=workers, desc=f"{spec.dataset} images"
    )
    bad = {f["clip"]: f for f in report.failed}
    manifest: list[dict[str, str]] = []
    for row, name in planned:
        if name in bad:
            skipped.append(row.skipped(bad[name]["reason"], bad[name]["files"]))
            continue
        save_text(out / "texts" / f"{row.key}.txt", row.text)
        label = spec.labels[row.label]
        manifest.append(
            {
                "key": row.key,
                "label": label,
                "split": row.split,
                "text": f"texts/{row.key}.txt",
                "image": name,
            }
        )
    return _finish(spec, out, manifest, skipped, report, split_files, columns, image_size, image_dir)


def _finish(
    spec: ImageTextSpec,
    out: Path,
    manifest: list[dict[str, str]],
    skipped: list[dict[str, str]],
    images: Report,
    split_files: Mapping[str, Path],
    columns: dict[str, dict[str, str]],
    image_size: int,
    image_dir: str,
) -> dict[str, Any]:
    """Write the split lists, manifest and ``prepare.json``; warn when the counts are not the official ones."""
    skipped.sort(key=lambda r: r["clip"])
    extra = {
        "classes": sorted(spec.labels.values()),
        "label_map": dict(spec.labels),
        "source": spec.source,
        "split_protocol": "the official split files: "
        + ", ".join(f"{s}={p.name}" for s, p in split_files.items()),
        "columns": columns,
        "official_counts": dict(spec.official_counts),
        "images": {"written": len(images.done), "reused": len(images.existing), "failed": len(images.failed)},
    }
    options = {"image_size": image_size, "image_dir": image_dir}
    info = write_layout(
        out, spec.dataset, manifest, COLUMNS, options=options, report=Report(failed=skipped), extra=extra
    )
    if info["counts"] != dict(spec.official_counts):
        prepare_logger(spec.dataset).warning(
            "%s: prepared %s rows, the official split has %s (%d rows skipped, listed in %s).",
            spec.dataset, info["counts"], dict(spec.official_counts), len(skipped), out / "prepare.json",
        )  # fmt: skip
    return info
