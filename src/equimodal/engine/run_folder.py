"""A run folder is never silently overwritten: a folder that holds another config's run is refused.

``equimodal train --out DIR`` and ``equimodal compare --out DIR`` call :func:`check_run_folder` before any
work. It reads the folder's ``config.yaml`` (written when a run starts); when that config differs from
the one asked for, it raises :class:`RunFolderError` naming every differing key (old and new value) and
the two ways out: another ``--out``, or ``--overwrite``. The same config resumes (``last.pt``) or, for a
finished run, is reported as is. A folder whose run wrote nothing but its config (it failed before its
first output, e.g. on a bad balancer option) takes the new config: there is nothing to lose. ``train``
runs these checks under the folder's claim (:mod:`equimodal.utils.claim`), so a run still starting in the
folder (it has written only its config so far) is refused by its claim, not mistaken for a failed one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..utils.io import RunFolderError, check_writable_folder

RUN_OUTPUTS = (
    "last.pt", "best.pt", "metrics.csv", "steps.csv", "summary.json", "predictions.npz", "skipped.csv",
    "curves.png", "report.html",
)  # fmt: skip
"""What a run (and ``equimodal report`` on it) writes into its folder, besides ``config.yaml`` and
``tensorboard/``."""


def clear_run(out: Path, *, config: bool = False) -> None:
    """Delete a previous run's outputs from ``out`` (and its ``config.yaml`` with ``config``); keeps
    every other file (the folder's claim, :mod:`equimodal.utils.claim`, among them)."""
    for name in (*RUN_OUTPUTS, *(("config.yaml",) if config else ())):
        (out / name).unlink(missing_ok=True)
    board = out / "tensorboard"
    if board.is_dir():
        for event in board.glob("events.out.tfevents.*"):
            event.unlink()


def has_outputs(out: Path) -> bool:
    """Whether a run in ``out`` wrote anything besides its config (one that failed before its first
    output, e.g. on a bad option, did not: a new config may take its folder, there is nothing to lose).

    The folder's claim file is no output: a run still writing is told apart by its claim instead.
    """
    return any((out / name).exists() for name in RUN_OUTPUTS)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}`` (lists and empty mappings are leaves)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs: ``{key: (old, new)}`` (a missing key reads as ``None``)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_run_folder(
    out: Path, config: Mapping[str, Any], *, overwrite: bool = False, flag: str = "--out"
) -> bool:
    """Check that ``out`` may hold a run of ``config``; returns whether it already holds one of it.

    Raises:
        RunFolderError: ``out`` is a file or not writable, or holds a run of another config (unless
            ``overwrite``), naming the differing keys and the fixes.
    """
    out = Path(out)
    check_writable_folder(out, flag)
    saved = out / "config.yaml"
    if not saved.is_file():
        return False
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError:
        old = {"(unreadable config.yaml)": True}
    diffs = config_differences(old, config)
    if not diffs:
        return True
    if overwrite or not has_outputs(out):
        return False
    shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in list(diffs.items())[:8])
    more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
    raise RunFolderError(
        f"{flag} {str(out)!r} holds a run of another config ({shown}{more}). Nothing was changed. Pass a new "
        f"{flag} folder to keep both, or add --overwrite to replace that run."
    )
