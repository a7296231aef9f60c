"""The figures of comparisons, studies and diagnoses, drawn from plain data, and how figures are saved.

Every function here takes numbers and labels (as the results files hold them), never an experiment's
objects, so that ``equimodal report`` draws the same figure from the files as the command that wrote
them. :func:`pyplot` is the one way to matplotlib (the ``Agg`` backend; an ImportError naming the extra
without it); :func:`save_figure` writes a PNG atomically, or removes an earlier one when matplotlib is
missing (a figure that no longer matches its tables is worse than none).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.preflight import PLOTS_INSTALL
from ..utils.io import atomic_write_bytes

Accuracies = Mapping[str, Mapping[int, float]]
"""Test accuracy (a fraction) per cell label and seed: ``{label: {seed: accuracy}}``."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive ``Agg`` backend.

    Raises:
        ImportError: matplotlib is not installed (the message names the extra to install).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(f"equimodal report needs matplotlib: {PLOTS_INSTALL}") from exc
    return plt


def save_figure(path: Path, draw: Callable[[], Any], dpi: int) -> bool:
    """Draw a figure with ``draw()`` and write it to ``path`` as a PNG (atomically); returns whether it did.

    Without matplotlib nothing is drawn and an earlier ``path`` is removed (it would not match the
    tables written beside it). The figure is closed.
    """
    try:
        plt = pyplot()
    except ImportError:
        Path(path).unlink(missing_ok=True)
        return False
    fig = draw()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return True


def results_figure(raw: Mapping[str, Mapping[str, Mapping[str, float]]]) -> Any:
    """The bar chart of test accuracy per method (mean ± std over seeds), accuracy axis 0 to 100.

    Args:
        raw: ``{method: {seed: {"test_acc": fraction, ...}}}``, as a comparison's results JSON holds it.

    Returns the matplotlib figure (the caller saves and closes it).

    Raises:
        ImportError: matplotlib is missing.
    """
    plt = pyplot()
    labels = list(raw)
    values = [[100 * v["test_acc"] for v in raw[k].values()] for k in labels]
    means = [float(np.mean(v)) for v in values]
    stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
    single = all(len(v) == 1 for v in values)
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels)), 3.5))
    ax.bar(range(len(labels)), means, yerr=None if single else stds, capsize=3, color="#4477aa")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    title = "1 seed (no error bars)" if single else "mean ± std over seeds"
    if "none" in labels:
        ax.axhline(means[labels.index("none")], color="0.4", ls="--", lw=1)
        title += "; dashed: joint training (none)"
    ax.set_title(title, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class GridPanel:
    """One panel of a study's figure: a grid's cells are ``NAME/<column>/<row>``, its baselines
    ``NAME/baseline/<baseline>`` (the labels of :data:`Accuracies`)."""

    name: str
    columns: Sequence[str]
    rows: Sequence[str]
    baselines: Sequence[str] = ()


def _numeric(labels: Sequence[str]) -> list[float] | None:
    """Column labels as numbers (``k=3`` -> 3.0, ``M4`` -> 4.0) when every one is, else None."""
    try:
        return [float(label.lstrip("kMm=")) for label in labels]
    except ValueError:
        return None


def _grid_panel(ax: Any, panel: GridPanel, acc: Accuracies) -> None:
    """Draw one panel: a line per row over numeric columns, else grouped bars; baselines as lines."""
    columns = list(panel.columns)
    xs = _numeric(columns)
    pos = np.arange(len(columns), dtype=float) if xs is None else np.asarray(xs)
    width = 0.8 / max(len(panel.rows), 1)
    for i, r in enumerate(panel.rows):
        vals = [list(acc.get(f"{panel.name}/{c}/{r}", {}).values()) for c in columns]
        mean = [100 * np.mean(v) if v else np.nan for v in vals]
        err = [100 * np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
        if xs is None:
            ax.bar(pos + (i - (len(panel.rows) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=r)
        else:
            ax.errorbar(pos, mean, yerr=err, marker="o", capsize=2, label=r)
    styles = [("0.25", "--"), ("0.55", ":"), ("0.4", "-.")]  # baselines told apart in grey print too
    for j, b in enumerate(panel.baselines):
        vals = list(acc.get(f"{panel.name}/baseline/{b}", {}).values())
        if vals:
            color, ls = styles[j % len(styles)]
            ax.axhline(100 * np.mean(vals), color=color, ls=ls, lw=1.2, label=f"{b} (baseline)")
    if xs is None:
        ax.set_xticks(pos, columns, rotation=30, ha="right", fontsize=8)
    ax.set(title=panel.name, ylabel="test accuracy (%)")
    ax.legend(fontsize=7)


def study_figure(panels: Sequence[GridPanel], acc: Accuracies) -> Any:
    """One panel per grid: test accuracy per column, a line (numeric columns) or bars per row, with the
    grid's baselines as horizontal lines. Returns the figure (the caller saves and closes it)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _grid_panel(ax, panel, acc)
    fig.tight_layout()
    return fig


def diagnosis_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], modalities: Sequence[str]) -> Any:
    """Per modality, and last the fused model: validation accuracy curves (fractions, one per epoch from 0).

    Args:
        curves: ``{modality or "fused": {curve label: values}}``, as a diagnosis's JSON holds them.
        modalities: the panels before the fused one, in order.
    """
    plt = pyplot()
    names = list(modalities)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.4 * (len(names) + 1), 2.8), squeeze=False)
    for ax, name in zip(axes[0], [*names, "fused"], strict=True):
        for label, curve in curves.get(name, {}).items():
            ax.plot(range(len(curve)), [100 * v for v in curve], label=label)  # epochs from 0, as the metrics
        ax.set(title=name, xlabel="epoch", ylim=(0, 100))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation accuracy (%)")
    fig.tight_layout()
    return fig
