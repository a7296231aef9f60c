"""``equimodal report RUN [RUN ...] [--out FILE]``: plot runs' learning curves from their ``metrics.csv``.

Per run, three panels against the epoch: fused and per-modality (unimodal) validation accuracy (axis
from 0 to 100 %, the same scale for every run), the training loss, and the balancer's logged
per-modality statistics (``bal_k/<m>``, ``bal_kept_grad_norm/<m>``, ... whatever the balancer
reports). The selected epoch (best validation accuracy) is marked.

Where the figure goes (:func:`plot_runs`): without ``out`` every run gets its own ``RUN/curves.png``;
with ``out`` one figure is written there whatever the number of runs, one row of panels per run.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engine.run_folder import METRICS, RunFolder
from ..utils.io import atomic_write_bytes
from .figures import pyplot


def read_metrics(run: Path) -> list[dict[str, float]]:
    """A run's epoch rows as floats (clear errors when the folder is not a run folder or the file is
    truncated, damaged or not all numbers)."""
    folder = RunFolder(run)
    if not folder.metrics.exists():
        raise FileNotFoundError(
            f"No {METRICS} in {run}: expected a run folder written by `equimodal train --out DIR`."
        )
    rows = folder.read_metrics(numbers_only=True)
    if not rows:
        raise ValueError(
            f"{folder.metrics} has no epoch rows yet (it is written after each epoch): let the run finish its "
            "first epoch, then report it."
        )
    return rows


def _balancer_keys(keys: list[str]) -> list[str]:
    bal_keys = [k for k in keys if k.startswith("bal_") and "/" in k]
    main = [k for k in bal_keys if k.startswith(("bal_k/", "bal_kept_grad_norm/"))]
    return main or bal_keys[:8]  # AMSS: ratios and kept gradient norm; others: their first figures


def _draw_run(axes: Sequence[Any], run: Path, rows: list[dict[str, float]], label: str | None) -> None:
    epochs = [r["epoch"] for r in rows]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    folder = RunFolder(run)
    chosen = folder.read_summary(keys=()).get("selected_epoch") if folder.summary.exists() else None
    for k in ["val_acc"] + [k for k in keys if k.startswith("val_acc_")]:
        axes[0].plot(
            epochs,
            [100 * r.get(k, float("nan")) for r in rows],
            label=k.replace("val_acc_", "") if k != "val_acc" else "fused",
        )
    title = "validation accuracy (%)"
    axes[0].set(title=f"{label}\n{title}" if label else title, xlabel="epoch", ylim=(0, 100))
    axes[0].legend(fontsize=8)
    axes[1].plot(epochs, [r.get("train_loss", float("nan")) for r in rows], color="k")
    axes[1].set(title="training loss", xlabel="epoch")
    bal_keys = _balancer_keys(keys)
    if len(axes) > 2:
        if bal_keys:
            for k in bal_keys:
                axes[2].plot(epochs, [r.get(k, float("nan")) for r in rows], label=k[4:])
            axes[2].set(title="balancer statistics (epoch means)", xlabel="epoch")
            axes[2].legend(fontsize=7, loc="best")
        else:
            axes[2].set_axis_off()
    if chosen is not None:
        for ax in axes[:2] if not bal_keys else axes:
            ax.axvline(chosen, color="0.5", ls=":", lw=1)


def curves_figure(runs: Sequence[str | Path]) -> Any:
    """The learning-curve figure of ``runs``: one row of panels per run (the caller saves and closes it).

    Raises:
        ValueError: no run, or a run whose metrics.csv has no rows. FileNotFoundError: a folder that is
            not a run folder. ImportError: matplotlib is missing.
    """
    if not runs:
        raise ValueError("report needs at least one run folder (written by `equimodal train --out DIR`).")
    paths = [Path(r) for r in runs]
    tables = [read_metrics(p) for p in paths]  # every folder is checked before anything is drawn
    plt = pyplot()
    panels = 3 if any(_balancer_keys(list(t[0])) for t in tables) else 2
    fig, grid = plt.subplots(len(paths), panels, figsize=(4.5 * panels, 3.4 * len(paths)), squeeze=False)
    for axes, path, rows in zip(grid, paths, tables, strict=True):
        _draw_run(axes, path, rows, str(path) if len(paths) > 1 else None)
    fig.tight_layout()
    return fig


def _check_target(out: Path, fig: Any) -> str:
    """The image format for ``out`` (from its suffix), or a ValueError saying what to pass."""
    if out.is_dir():
        raise ValueError(
            f"--out {str(out)!r} is a folder; pass an image file path, e.g. {str(RunFolder(out).curves)!r} "
            "(several runs go into one figure there, a row per run)."
        )
    formats = fig.canvas.get_supported_filetypes()
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in formats:
        raise ValueError(
            f"--out {str(out)!r}: expected an image file ending in .png (or .pdf, .svg), found "
            f"{out.suffix or 'no suffix'!r}. Pass e.g. --out {str(out.with_suffix('.png'))!r}."
        )
    return fmt


def _save(fig: Any, target: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    atomic_write_bytes(target, buf.getvalue())  # a full disk names the file
    return target


def plot_runs(runs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write the learning curves of ``runs`` and return the paths written.

    Without ``out`` each run gets its own figure, ``RUN/curves.png``. With ``out`` (an image path:
    ``.png``, or ``.pdf``/``.svg``) exactly one figure is written there, whatever the number of runs:
    one row of panels per run, titled with its folder, accuracy axes all from 0 to 100 % so that the
    rows compare at a glance. Every folder is checked before anything is written.

    Raises:
        ValueError: no run, a run without epoch rows, ``out`` is a folder or not an image path.
        FileNotFoundError: a folder that is not a run folder. ImportError: matplotlib is missing.
    """
    plt = pyplot()
    if out is not None:
        fig = curves_figure(runs)
        try:
            return [_save(fig, Path(out), _check_target(Path(out), fig))]
        finally:
            plt.close(fig)
    for run in runs:  # check every folder first: nothing is written when one of them is not a run
        read_metrics(Path(run))
    written = []
    for run in runs:
        fig = curves_figure([run])
        try:
            written.append(_save(fig, RunFolder(run).curves, "png"))
        finally:
            plt.close(fig)
    if not written:
        raise ValueError("report needs at least one run folder (written by `equimodal train --out DIR`).")
    return written


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Write one run's learning-curve figure (default ``RUN/curves.png``) and return its path."""
    return plot_runs([run], out)[0]
