"""The files of comparison, study and diagnosis folders: their names, readers and writers, in one place.

A comparison folder (``equimodal compare --out``) holds :class:`ComparisonFiles`, a study folder
(``equimodal study``) :class:`StudyFiles` and a diagnosis folder (``equimodal diagnose``)
:class:`DiagnosisFiles`, besides their run folders (:class:`~equimodal.engine.run_folder.RunFolder`).
The commands write these files and ``equimodal report`` reads them back; a damaged one is an error
naming it and :data:`TABLES_FIX`. :func:`folder_kind` tells the four kinds of folders apart.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engine.run_folder import METRICS, RunFolder
from ..utils.io import atomic_write_csv, atomic_write_text, read_csv_text, read_json, read_text

TABLES_FIX = (
    "Rerun the command that wrote the folder (`equimodal compare`, `study` or `diagnose` with the same "
    "options and --out): finished runs are kept and the file is written again."
)
"""How to get a comparison's, study's or diagnosis's own file back when it is damaged."""

RESULTS = "results"
STUDY_JSON = "study.json"
DIAGNOSIS = "diagnosis"


class ResultFiles:
    """A result's files in one folder: ``STEM.md``, ``STEM.csv``, ``STEM.json`` and ``STEM.png``.

    Attributes:
        folder: the folder. stem: the files' common name.
        markdown, csv, json, figure: the paths of the four files.
    """

    def __init__(self, folder: str | Path, stem: str) -> None:
        self.folder, self.stem = Path(folder), stem
        self.markdown, self.csv, self.json, self.figure = (
            self.folder / f"{stem}{suffix}" for suffix in (".md", ".csv", ".json", ".png")
        )


class ComparisonFiles(ResultFiles):
    """A comparison's own files: ``results.md`` (the full table and its notes), ``results.csv`` (the
    same table), ``results.json`` (the test figures per method and seed) and ``results.png``."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(folder, RESULTS)

    def write(
        self, columns: Sequence[str], rows: Sequence[Mapping[str, Any]], notes: Sequence[str], raw: Any
    ) -> None:
        """Write the table (every row holds every column) with its notes, the CSV and the raw figures."""
        from .tables import markdown_table

        table = markdown_table(columns, [[r[c] for c in columns] for r in rows])
        atomic_write_text(self.markdown, "\n".join([table, "", *notes]) + "\n")
        atomic_write_csv(self.csv, rows, columns)
        atomic_write_text(self.json, json.dumps(raw, indent=2))

    def read_raw(self) -> dict[str, Any]:
        """``{method: {seed: {"test_acc": ..., ...}}}``."""
        return read_json(self.json, TABLES_FIX)

    def read_table(self) -> tuple[list[str], list[list[str]]] | None:
        """The CSV table's header and rows (None when the folder has no CSV)."""
        if not self.csv.is_file():
            return None
        header, rows = read_csv_text(self.csv, TABLES_FIX)
        return header, [cells for _, cells in rows]

    def read_notes(self) -> list[str]:
        """The paragraphs under the Markdown table (none without the file)."""
        if not self.markdown.is_file():
            return []
        return read_text(self.markdown, TABLES_FIX).split("\n\n", 1)[1:]


class StudyFiles:
    """A study's own files: ``study.json`` (the raw figures) and the tables and figure of a setting,
    ``STEM.md``, ``.csv``, ``.png`` (:meth:`tables`; ``STEM`` is the study's name, ``NAME_full`` for the
    full grid)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def stem(name: str, mode: str) -> str:
        """``NAME`` for the quick setting, ``NAME_full`` for the full grid (both can sit in docs/studies)."""
        return name + ("_full" if mode == "full" else "")

    @property
    def json(self) -> Path:
        return self.folder / STUDY_JSON

    def tables(self, stem: str) -> ResultFiles:
        """The Markdown, CSV and figure of the setting ``stem`` (its ``json`` is unused: :attr:`json`)."""
        return ResultFiles(self.folder, stem)

    def read(self) -> dict[str, Any]:
        """The raw figures (they name the study and its mode)."""
        return read_json(self.json, TABLES_FIX, keys=("study",))

    def read_earlier(self) -> dict[str, Any]:
        """The raw figures of an earlier call into this folder, or ``{}``."""
        return read_json(self.json, TABLES_FIX) if self.json.is_file() else {}

    def read_markdown(self, stem: str) -> str:
        """The tables of the setting ``stem`` as Markdown.

        Raises:
            FileNotFoundError: the file is missing (naming the command that writes it).
        """
        path = self.tables(stem).markdown
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} is missing: rerun `equimodal study` to write it.")
        return read_text(path, TABLES_FIX)

    def write(self, stem: str, markdown: str, csv_rows: Sequence[Sequence[str]], raw: Any) -> None:
        """Write the Markdown, the CSV rows (no header) and the raw figures."""
        buf = io.StringIO()
        csv.writer(buf).writerows(csv_rows)
        atomic_write_text(self.tables(stem).markdown, markdown)
        atomic_write_text(self.tables(stem).csv, buf.getvalue())
        atomic_write_text(self.json, json.dumps(raw, indent=2))


class DiagnosisFiles(ResultFiles):
    """A diagnosis's own files: ``diagnosis.md``, ``diagnosis.json`` (every figure, the verdict and the
    curves: what the report draws) and ``diagnosis.png``."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(folder, DIAGNOSIS)

    def write(self, markdown: str, raw: Any) -> None:
        """Write the Markdown and the JSON (non-JSON numbers, e.g. numpy's, as floats)."""
        atomic_write_text(self.markdown, markdown)
        atomic_write_text(self.json, json.dumps(raw, indent=2, default=float))

    def read(self) -> dict[str, Any]:
        """The diagnosis as its JSON holds it (with ``modalities`` and ``headroom``)."""
        return read_json(self.json, TABLES_FIX, keys=("modalities", "headroom"))


def folder_kind(path: Path) -> str:
    """``"diagnosis"``, ``"compare"``, ``"study"`` or ``"run"``, by the files the folder holds (checked
    in that order).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: it holds none of them (the message says what each kind holds).
    """
    if DiagnosisFiles(path).json.is_file():
        return "diagnosis"
    if ComparisonFiles(path).json.is_file():
        return "compare"
    if StudyFiles(path).json.is_file():
        return "study"
    if RunFolder(path).metrics.is_file():
        return "run"
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; pass a run folder or a comparison folder.")
    raise ValueError(
        f"{str(path)!r} holds neither {METRICS} (a run folder, from `equimodal train --out DIR`) nor "
        f"{ComparisonFiles(path).json.name} (a comparison, from `equimodal compare --out DIR`) nor "
        f"{DiagnosisFiles(path).json.name} (from `equimodal diagnose --out DIR`) nor {STUDY_JSON} (from "
        "`equimodal study NAME --out DIR`)."
    )
