"""Tables and cells of comparisons, studies and diagnoses, from plain data: Markdown and the terminal's.

The cells are text (``"84.5 ± 0.7"``, ``"+4.00 [+1.20, +6.10]"``), formatted once here, so the Markdown
file, the terminal table and the HTML page of a result show the same figures. The terminal tables fit
80 columns: a long cell folds onto a second line, none is cut.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from rich import box
from rich.table import Table
from rich.text import Text

ONE_SEED = "n/a (1 seed)"
"""What an interval reads with a single seed."""


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (cells as ``str``), without a trailing newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` in percent of the finite fractions ``values``; one value alone (no spread); ``-``
    without any."""
    a = 100 * np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return "-"
    if a.size == 1:
        return f"{a[0]:.1f}"
    return f"{a.mean():.1f} ± {float(np.std(a, ddof=1)):.1f}"


def interval_text(mean: float, low: float, high: float) -> str:
    """``+m [+lo, +hi]`` with two decimals."""
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def t_interval_text(mean: float, low: float, high: float) -> str:
    """A diagnosis interval: :func:`interval_text`, or ``+m (1 seed: no interval)`` without bounds."""
    if not math.isfinite(low):
        return f"{mean:+.2f} (1 seed: no interval)"
    return interval_text(mean, low, high)


# -------------------------------------------------------------------------------------------- compare
COMPACT_COLUMNS = ("method", "n", "test acc", "Δacc vs none (pp)", "gap closed [95% CI]")
"""The columns of a comparison's terminal table (the files hold every column)."""


def table_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The notes under a comparison's tables (how to read the cells)."""
    notes = [
        "test acc: fused test accuracy (%), mean ± std over seeds. Δacc vs none: paired (same seed) "
        "difference to joint training, with a 95% bootstrap interval over seeds. gap closed: fraction of "
        "the joint-to-ensemble gap closed (n/a when that gap is not significantly above zero).",
    ]
    partial = [str(r["method"]) for r in rows if r.get("train data") not in ("100 %", "?", None, "")]
    if partial:
        notes.append(
            f"train data: the share of the training split a method trains on; {', '.join(partial)} "
            f"{'holds' if len(partial) == 1 else 'hold'} the rest out of training to fit "
            f"{'its' if len(partial) == 1 else 'their'} own weights (never val or test)."
        )
    if any(r.get("n") == 1 for r in rows):
        notes.append(f'With a single seed a value has no ± spread and its interval reads "{ONE_SEED}".')
    return notes


def results_table(rows: Sequence[Mapping[str, Any]], title: str, seeds: int | None = None) -> Table:
    """A comparison's compact terminal table (it fits 80 columns; no cell is cut, a too long word folds).

    Columns: :data:`COMPACT_COLUMNS` less those empty in every row, and less ``n`` when every row has
    ``seeds`` runs (the title says how many).
    """
    columns = [c for c in COMPACT_COLUMNS if any(str(r.get(c, "")) for r in rows)]
    if seeds is not None and all(r.get("n") == seeds for r in rows):
        columns.remove("n")
    table = Table(
        title=Text(title), box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
    for c in columns:
        table.add_column(Text(c), overflow="fold", justify="left" if c == "method" else "right")
    for r in rows:  # Text, not markup: "[n/a (1 seed)]" would read as a style tag
        table.add_row(*[Text(str(r.get(c, ""))) for c in columns])
    return table


# ------------------------------------------------------------------------------------------- diagnose
DIAGNOSIS_HEADER = (
    "modality", "alone", "head in joint", "probe in joint", "probe deficit (pp)", "epochs to 90 % alone",
    "in joint", "grad share, first 5 epochs", "grad share, all",
)  # fmt: skip
"""The columns of a diagnosis's per-modality table (Markdown and HTML)."""
TERMINAL_COLUMNS = (
    "modality", "alone", "head", "probe", "probe deficit\n(pp)", "speed\nalone", "speed\njoint", "grad\nearly",
    "grad\nall",
)  # fmt: skip
"""The same columns, short enough for the terminal."""
TERMINAL_LEGEND = (
    "alone: test accuracy (%) of the branch trained alone; head, probe: the joint model's unimodal head and "
    "a linear probe on its frozen encoder; probe deficit: alone minus probe, paired by seed (95 % "
    "interval); speed: epochs to 90 % of the best validation accuracy; grad: the encoder's share of the "
    "gradient norm in joint training, first 5 epochs and all."
)


def diagnosis_cells(modality: str, figures: Mapping[str, Any]) -> list[str]:
    """One modality's row of a diagnosis table.

    Args:
        modality: its name.
        figures: its figures as a diagnosis's JSON holds them: ``alone``, ``head``, ``probe`` (%),
            ``probe_deficit`` (``{"mean", "low", "high"}``, pp), ``speed_alone``, ``speed_joint``
            (epochs), ``grad_share_early``, ``grad_share`` (fractions).
    """
    f = figures
    return [
        modality, f"{f['alone']:.1f}", f"{f['head']:.1f}", f"{f['probe']:.1f}",
        t_interval_text(**f["probe_deficit"]), f"{f['speed_alone']:.1f}", f"{f['speed_joint']:.1f}",
        f"{f['grad_share_early']:.2f}", f"{f['grad_share']:.2f}",
    ]  # fmt: skip


def diagnosis_table(modalities: Mapping[str, Mapping[str, Any]]) -> Table:
    """The per-modality figures (``{modality: figures}``, see :func:`diagnosis_cells`) as a terminal
    table that fits 80 columns (long cells wrap, none is cut)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for name in TERMINAL_COLUMNS:
        table.add_column(
            Text(name),
            justify="left" if name == "modality" else "right",
            overflow="fold",
            min_width=15 if name.startswith("probe deficit") else None,  # "+11.50 [+9.00," on one line
        )
    for m, figures in modalities.items():
        table.add_row(*[Text(c) for c in diagnosis_cells(m, figures)])  # Text: "[+1.00, +2.00]" is no tag
    return table
