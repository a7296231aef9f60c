"""One run's folder: the name of every file a run writes, their readers and writers, and its checks.

:class:`RunFolder` is the only place that knows the file names of a run (the constants below): the
trainer writes through it, the checkpointer and the run log take their paths from it, and
``compare``, ``study``, ``diagnose`` and ``report`` read runs back through it. Its readers name a
truncated or damaged file with the way to write it again (:data:`RESUME_FIX`, :data:`RETRAIN_FIX`).

A run folder is never silently overwritten: ``equimodal train --out DIR`` calls :meth:`RunFolder.check`
before any work. It reads the folder's config (written when a run starts); when that config differs
from the one asked for, it raises :class:`RunFolderError` naming every differing key (old and new value)
and the two ways out: another ``--out``, or ``--overwrite``. The same config resumes (the last
checkpoint) or, for a finished run, is reported as is. A folder whose run wrote nothing but its config
(it failed before its first output, e.g. on a bad balancer option) takes the new config: there is
nothing to lose. ``train`` runs these checks under the folder's claim (:mod:`equimodal.utils.claim`),
so a run still starting in the folder (it has written only its config so far) is refused by its claim,
not mistaken for a failed one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..utils.io import (
    RunFolderError,
    atomic_savez,
    atomic_write_csv,
    atomic_write_text,
    check_writable_folder,
    read_csv_numbers,
    read_json,
    read_npz,
    read_text,
)
from ..utils.run_files import (
    BEST,
    CONFIG,
    CURVES,
    LAST,
    METRICS,
    PREDICTIONS,
    REPORT,
    RUN_OUTPUTS,
    SKIPPED,
    STEPS,
    SUMMARY,
    TENSORBOARD,
)
from .config import Config, save_config

RESUME_FIX = (
    f"Rerun `equimodal train` with the run's {CONFIG} and --out set to its folder: it resumes from "
    f"{LAST} and writes {SUMMARY} and {PREDICTIONS} again."
)
RETRAIN_FIX = (
    f"Restore it from a copy, or train the run again (`equimodal train` with its {CONFIG} and --no-resume)."
)


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


class RunFolder:
    """The folder of one run: the paths of its files, their readers and writers (see the module docstring).

    Args:
        path: the folder (it need not exist yet).

    Example:
        >>> folder = RunFolder("runs/x")
        >>> folder.summary.name, folder.metrics.name
        ('summary.json', 'metrics.csv')
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------ paths
    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def steps(self) -> Path:
        return self.path / STEPS

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def skipped(self) -> Path:
        return self.path / SKIPPED

    @property
    def curves(self) -> Path:
        return self.path / CURVES

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def finished(self) -> bool:
        """Whether the run finished (its summary is written last)."""
        return self.summary.is_file()

    def has_outputs(self) -> bool:
        """Whether a run here wrote anything besides its config (one that failed before its first output,
        e.g. on a bad option, did not: a new config may take its folder, there is nothing to lose).

        The folder's claim file is no output: a run still writing is told apart by its claim instead.
        """
        return any((self.path / name).exists() for name in RUN_OUTPUTS)

    # ---------------------------------------------------------------------------------------- reading
    def read_summary(self, keys: Sequence[str] = ("test.test_acc",)) -> dict[str, Any]:
        """The run's summary, which must hold ``keys`` (default: a finished run's test accuracy).

        Raises:
            ValueError: the file is truncated or damaged (naming it and :data:`RESUME_FIX`).
        """
        return read_json(self.summary, RESUME_FIX, keys=keys)

    def read_metrics(self, *, numbers_only: bool = False) -> list[dict[str, Any]]:
        """The epoch rows (numbers as floats, empty cells left out); none when the file is missing.

        Args:
            numbers_only: a cell that is not a number is an error instead of kept as text.

        Raises:
            ValueError: the file is truncated or damaged (naming it, its line and :data:`RETRAIN_FIX`).
        """
        return (
            read_csv_numbers(self.metrics, RETRAIN_FIX, numbers_only=numbers_only)
            if self.metrics.is_file()
            else []
        )

    def read_steps(self) -> list[dict[str, Any]]:
        """The recorded optimizer steps' statistics (as :meth:`read_metrics`); none when not recorded."""
        return read_csv_numbers(self.steps, RETRAIN_FIX) if self.steps.is_file() else []

    def read_predictions(self, keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """The arrays of the predictions file, which must hold ``keys`` (no pickle).

        Raises:
            ValueError: the file is not a readable archive or lacks a key (naming it and :data:`RESUME_FIX`).
        """
        return read_npz(self.predictions, RESUME_FIX, keys=keys)

    def read_config(self) -> dict[str, Any] | None:
        """The config the run was started with, or None without one; a config that cannot be read reads
        as a one-key placeholder naming the file and why (a difference to any config)."""
        if not self.config.is_file():
            return None
        try:
            loaded = yaml.safe_load(read_text(self.config, RETRAIN_FIX))
        except (yaml.YAMLError, ValueError) as err:
            problem = getattr(err, "problem", None) or "not UTF-8 text"
            return {f"({CONFIG} is damaged: {problem})": True}
        return loaded if isinstance(loaded, dict) else {f"({CONFIG} holds no mapping)": True}

    def summary_config(self) -> dict[str, Any] | None:
        """The config recorded in the run's summary; None without a summary or a config in it, a
        one-key placeholder when the summary cannot be read."""
        if not self.summary.is_file():
            return None
        try:
            recorded = self.read_summary(keys=()).get("config")
        except ValueError:
            return {f"({SUMMARY} is damaged: truncated or not JSON)": True}
        return recorded if isinstance(recorded, dict) else None

    def recorded_config(self) -> dict[str, Any] | None:
        """The config the run was trained with (its config file, else its summary's), or None if the
        folder holds no run (:meth:`has_outputs`); one that cannot be read reads as a placeholder."""
        if not self.path.is_dir() or not self.has_outputs():
            return None  # a run that failed before writing anything holds nothing to keep
        if self.config.is_file():
            return self.read_config()
        if self.summary.is_file():
            return self.summary_config() or {f"(no config recorded in {SUMMARY})": True}
        return None

    # ---------------------------------------------------------------------------------------- writing
    def write_config(self, cfg: Config) -> None:
        """Write the resolved config (atomically, as every writer here)."""
        save_config(cfg, self.config)

    def write_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write the epoch rows (columns: every row's keys, in order of appearance)."""
        atomic_write_csv(self.metrics, rows)

    def write_steps(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write the recorded optimizer steps' statistics."""
        atomic_write_csv(self.steps, rows)

    def write_predictions(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Write the predictions archive (compressed)."""
        atomic_savez(self.predictions, **arrays)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write the summary (JSON); written last, it marks the run finished."""
        atomic_write_text(self.summary, json.dumps(summary, indent=2))

    def write_skipped(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write the dataset rows that were skipped (columns: the first row's keys)."""
        atomic_write_csv(self.skipped, rows, list(rows[0]))

    def clear(self, *, config: bool = False) -> None:
        """Delete a previous run's outputs (and its config with ``config``); keeps every other file (the
        folder's claim, :mod:`equimodal.utils.claim`, among them)."""
        for name in (*RUN_OUTPUTS, *((CONFIG,) if config else ())):
            (self.path / name).unlink(missing_ok=True)
        if self.tensorboard.is_dir():
            for event in self.tensorboard.glob("events.out.tfevents.*"):
                event.unlink()

    def check(self, config: Mapping[str, Any], *, overwrite: bool = False, flag: str = "--out") -> bool:
        """Check that the folder may hold a run of ``config``; returns whether it already holds one of it.

        Raises:
            RunFolderError: the folder is a file or not writable, or holds a run of another config (unless
                ``overwrite``), naming the differing keys and the fixes.
        """
        check_writable_folder(self.path, flag)
        old = self.read_config()
        if old is None:
            return False
        diffs = config_differences(old, config)
        if not diffs:
            return True
        if overwrite or not self.has_outputs():
            return False
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in list(diffs.items())[:8])
        more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
        raise RunFolderError(
            f"{flag} {str(self.path)!r} holds a run of another config ({shown}{more}). Nothing was changed. "
            f"Pass a new {flag} folder to keep both, or add --overwrite to replace that run."
        )
