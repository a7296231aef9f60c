"""The machinery every ``equimodal prepare <dataset>`` command shares.

A preparer turns a dataset's raw download into the *prepared layout* that its loader reads:

    OUT/
      manifest.csv     label, split, and one column per modality (paths relative to OUT)
      prepare.json     dataset, layout version, options, counts per split, what was skipped and why
      splits/          train.txt, val.txt, test.txt: the clip ids of each split (saved with the data)
      <files>          one output per clip and modality (npy arrays, jpg frames, txt), written atomically

Work is a list of :class:`Item` (one clip: its inputs and the outputs it writes) run by :func:`run_items`:
in parallel over worker processes, with a progress bar on a terminal (a log line every few percent
otherwise), resumable (an item whose outputs all exist is skipped), atomic (every output goes through a
temporary file and a rename), and fault-tolerant: an input that is missing, unreadable or corrupt makes
its item fail with a :class:`PrepareError` naming the file; the item is skipped and listed in the final
report, never a raw traceback.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.interrupt import Interrupted, stop_signals
from ..utils.io import atomic_write_bytes, atomic_write_text, read_json
from ..utils.workers import Hooks, run_tasks

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
SPLITS = ("train", "val", "test")
"""The splits of a prepared layout; each must hold clips (every loader reads all three)."""


def prepare_logger(dataset: str) -> logging.Logger:
    """The logger of ``dataset``'s preparer, ``equimodal.prepare.<dataset>``: the command line prints the
    INFO lines of ``equimodal.prepare`` (counts, summaries) off a terminal, wherever the preparer lives."""
    return logging.getLogger(f"{__package__}.{dataset}")


class PrepareError(ValueError):
    """A raw input that cannot be used; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class Item:
    """One unit of preparation work (usually a clip).

    Attributes:
        key: the clip id (used in reports and split lists).
        inputs: the raw files it reads (named in reports).
        outputs: the files it writes, relative to the output folder; when all exist it is skipped.
        args: whatever the work function needs besides the item.
    """

    key: str
    inputs: tuple[Path, ...]
    outputs: tuple[str, ...]
    args: tuple[Any, ...] = ()


@dataclass
class Report:
    """What :func:`run_items` did: items done, found finished, and failed (with the reason)."""

    done: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> list[str]:
        """Keys of the items whose outputs exist now (done in this run or before)."""
        return self.existing + self.done

    def summary(self) -> str:
        rate = f", {len(self.done) / self.seconds:.1f} items/s" if self.seconds and self.done else ""
        return (
            f"{len(self.done)} prepared, {len(self.existing)} already there, {len(self.failed)} skipped "
            f"as unusable ({self.seconds:.1f} s{rate})"
        )


def _finished(item: Item, out: Path) -> bool:
    return all((out / o).exists() for o in item.outputs)


def _run_one(work: Callable[[Item, Path], None], item: Item, out: Path) -> tuple[str, str | None]:
    """Run one item; returns ``(key, None)`` or ``(key, reason)``. Every failure is caught here."""
    try:
        work(item, out)
        return item.key, None
    except (PrepareError, OSError, ValueError, EOFError) as err:
        return item.key, str(err) or type(err).__name__
    except Exception as err:  # decoders raise their own types (av.error.*, PIL, soundfile): report them
        last = traceback.extract_tb(err.__traceback__)[-1:]
        where = f" at {last[0].filename}:{last[0].lineno}" if last else ""
        return item.key, f"{type(err).__name__}: {err}{where}"


class _Progress:
    """A rich progress bar on a terminal; otherwise an INFO log line about every 5 % (the CLI prints them
    to stdout off a terminal)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.count = total, desc, 0
        self.every = max(1, total // 20)
        self.bar = None
        if sys.stderr.isatty() and total:
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.task = self.bar.add_task(desc, total=total)
            self.bar.start()

    def advance(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1)
        elif self.count % self.every == 0 or self.count == self.total:
            log.info("%s: %d / %d", self.desc, self.count, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_items(
    items: Sequence[Item], work: Callable[[Item, Path], None], out: Path, *, workers: int = 1, desc: str = ""
) -> Report:
    """Run ``work(item, out)`` for every unfinished item, in ``workers`` processes; never raises for an item.

    ``work`` must be a module-level function (it is sent to worker processes) that writes the item's
    outputs atomically (see :func:`save_npy`, :func:`save_jpeg`, :func:`save_text`).

    Raises:
        Interrupted: SIGINT / SIGTERM stopped the work (:mod:`equimodal.utils.workers`): the items in flight
            were aborted (with ``workers=1`` the one in progress finishes first); finished ones are kept.
    """
    report = Report()
    todo = []
    for item in items:
        if _finished(item, out):
            report.existing.append(item.key)
        else:
            todo.append(item)
    progress = _Progress(len(todo), desc or "prepare")
    tic = time.perf_counter()

    def record(index: int, value: tuple[str, str | None] | None, error: str | None) -> None:
        key, reason = value if value is not None else (todo[index].key, error)
        if reason is None:
            report.done.append(key)
        else:
            files = ", ".join(str(p) for p in todo[index].inputs)
            report.failed.append({"clip": key, "files": files, "reason": reason})
        progress.advance()

    hooks = Hooks(start=lambda i: None, done=record, say=log.warning, name=lambda i: todo[i].key)
    try:
        with stop_signals() as stop:
            n = workers if len(todo) > 1 else 1
            outcome = run_tasks(partial(_run_one, work, out=out), todo, n, hooks, stop)
    finally:
        progress.close()
    report.seconds = time.perf_counter() - tic
    if outcome.signum is not None:
        left = len(todo) - len(report.done) - len(report.failed)
        raise Interrupted(
            outcome.signum,
            f"{signal.Signals(outcome.signum).name} stopped the preparation: {len(report.done)} of "
            f"{len(todo)} {desc or 'items'} prepared now and kept (with {len(report.existing)} from before), "
            f"{left} not done; no manifest was written. Rerun the same command to go on: finished ones are "
            "skipped.",
        )
    report.done.sort()
    report.failed.sort(key=lambda f: f["clip"])
    return report


def carve_val(keys_and_labels: Iterable[tuple[str, str | int]], fraction: float, seed: int) -> set[str]:
    """Keys of a stratified, seeded validation part of the training clips.

    Per class (labels in sorted order), ``round(n * fraction)`` of its ``n`` clips; for a class of two
    or more and ``fraction > 0`` that is clamped to ``1 .. n - 1`` (never the whole class), while a
    class of one clip goes to val only when ``round(fraction)`` is 1 (``fraction > 0.5``). Drawn by one
    ``permutation`` per class from ``numpy.random.default_rng(seed)`` over the class's sorted keys.
    """
    by_label: dict[str, list[str]] = {}
    for key, label in keys_and_labels:
        by_label.setdefault(label, []).append(key)
    rng = np.random.default_rng(seed)
    val: set[str] = set()
    for label in sorted(by_label):
        keys = sorted(by_label[label])
        n_val = int(round(len(keys) * fraction))
        if fraction > 0 and len(keys) >= 2:
            n_val = min(max(n_val, 1), len(keys) - 1)
        val.update(keys[i] for i in rng.permutation(len(keys))[:n_val])
    return val


SETTINGS_FILE = ".prepare-settings.json"


def check_resume_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix files made with other settings into ``out``; record the settings otherwise.

    ``settings`` are the options that change what a clip's files hold. They are written to
    ``OUT/.prepare-settings.json`` when a run starts (so an interrupted first run is covered too); a later
    run into the same folder must pass the same values, or it stops naming each changed value and the fix.
    """
    path = out / SETTINGS_FILE
    if path.is_file():
        before = read_json(path, "Delete it and rerun the same command: the settings are recorded again.")
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            shown = ", ".join(f"{k}={old!r} before, {new!r} now" for k, (old, new) in changed.items())
            raise ValueError(
                f"{str(out)!r} holds clips prepared with other settings ({shown}). Prepare into a new --out "
                "folder, or pass the same options to resume."
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, sort_keys=True))


# --------------------------------------------------------------------------------- atomic outputs
def _atomic_bytes(path: Path, data: bytes) -> None:
    """A private temporary file, then a rename; no ``fsync`` (a rerun redoes a clip); a full disk or a
    file size limit is an ``OSError`` naming the file and the fix."""
    atomic_write_bytes(path, data, sync=False)


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and an atomic rename."""
    buf = io.BytesIO()
    np.save(buf, array)
    _atomic_bytes(path, buf.getvalue())


def save_jpeg(path: Path, image: np.ndarray, quality: int = 90) -> None:
    """Save an ``(H, W, 3)`` or ``(H, W)`` uint8 array as JPEG, atomically (needs Pillow)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    _atomic_bytes(path, buf.getvalue())


def save_frame_folder(folder: Path, frames: Sequence[np.ndarray], digits: int = 5) -> None:
    """Write ``frames`` as ``00001.jpg, 00002.jpg, ...`` (``digits`` wide) into ``folder``, atomically.

    The folder is built under a hidden temporary name next to it, private to this writer (its pid and a
    random token: ``.<name>.<pid>.<token>.tmp``), and renamed at the end, so a reader never sees half a
    clip. Temporary folders of ``folder`` left by a writer that is gone (its pid no longer runs on this
    host) are removed first; a live writer's are never touched.
    """
    import secrets
    import shutil

    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in _abandoned_temporaries(folder):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.mkdir()
        for i, image in enumerate(frames, 1):
            save_jpeg(tmp / f"{i:0{digits}d}.jpg", image)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _abandoned_temporaries(folder: Path) -> list[Path]:
    """The temporary folders of ``folder`` (``.<name>.<pid>[.<token>].tmp``) whose writer's pid is gone."""
    import glob
    import re

    from ..utils.claim import pid_alive

    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(\d+)(\.[0-9a-f]+)?\.tmp")
    found = []
    for path in folder.parent.glob(f".{glob.escape(folder.name)}.*.tmp"):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not pid_alive(int(match.group(1))):
            found.append(path)
    return found


def save_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    _atomic_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------- the layout
def write_split_lists(out: Path, splits: dict[str, Sequence[str]]) -> None:
    """``OUT/splits/{train,val,test}.txt``: one clip id per line."""
    for name, keys in splits.items():
        atomic_write_text(out / "splits" / f"{name}.txt", "".join(f"{k}\n" for k in keys))


def empty_after_skipping(out: Path, report: Report, err: ValueError) -> ValueError:
    """An error for a split left empty by skipped inputs: they are written to ``OUT/skipped.json`` and named.

    Returned (the caller raises it), so that the report of what was skipped is never lost with the run.
    """
    atomic_write_text(out / "skipped.json", json.dumps(report.failed, indent=2))
    if not report.failed:
        return ValueError(
            f"{err} No input was skipped: the raw download lists no clip for it. Check --raw and the split "
            "options."
        )
    shown = "; ".join(f"{f['clip']}: {f['reason']}" for f in report.failed[:5])
    more = f" (and {len(report.failed) - 5} more)" if len(report.failed) > 5 else ""
    return ValueError(
        f"{err} {len(report.failed)} input(s) were skipped, all listed in {str(out / 'skipped.json')!r}: "
        f"{shown}{more}. Replace or repair them (or list more clips of that split), then rerun the same "
        "command: finished clips are kept."
    )


def check_splits(
    out: Path, dataset: str, counts: dict[str, int], report: Report, options: dict[str, Any]
) -> None:
    """Refuse a prepared layout with an empty split: every loader needs clips in train, val and test.

    Raises:
        ValueError: naming the empty split(s), the counts found and every skipped input (also written to
            ``OUT/skipped.json``, see :func:`empty_after_skipping`).
    """
    empty = [s for s in SPLITS if not counts.get(s)]
    if not empty:
        return
    found = ", ".join(f"{counts.get(s, 0)} {s}" for s in SPLITS)
    hint = ""
    if "val" in empty and "val_fraction" in options:
        hint = f" val is carved from train by val_fraction={options['val_fraction']}: pass e.g. --set val_fraction=0.1."
    err = ValueError(
        f"{dataset}: the {' and '.join(empty)} split(s) would be empty after skipping unusable inputs "
        f"(prepared: {found}); its loader needs clips in train, val and test, so no manifest was written.{hint}"
    )
    raise empty_after_skipping(out, report, err)


def write_layout(
    out: Path,
    dataset: str,
    rows: Iterable[dict[str, Any]],
    columns: Sequence[str],
    *,
    options: dict[str, Any],
    report: Report,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``splits/``, ``manifest.csv`` (``label``, ``split`` and ``columns``) and ``prepare.json``;
    returns the info. Nothing is written when a split is empty (see :func:`check_splits`).

    Args:
        rows: one mapping per prepared clip with ``key``, ``label``, ``split`` and every column.
        columns: the modality columns, in order.
        options: the preparer's resolved options (recorded).
        report: what :func:`run_items` did (its failures are recorded as skipped inputs).
        extra: further facts (source version, split protocol, ...).
    """
    rows = list(rows)
    counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    check_splits(out, dataset, counts, report, options)
    write_split_lists(out, {s: [r["key"] for r in rows if r["split"] == s] for s in SPLITS})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["key", "label", "split", *columns], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "manifest.csv", buf.getvalue())
    info = {
        "dataset": dataset,
        "layout_version": LAYOUT_VERSION,
        "counts": counts,
        "classes": sorted({str(r["label"]) for r in rows}),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "skipped": report.failed,
        **(extra or {}),
    }
    atomic_write_text(out / "prepare.json", json.dumps(info, indent=2))
    return info


def read_layout(root: Path, dataset: str) -> tuple[Path, dict[str, Any]]:
    """The manifest and ``prepare.json`` info of a prepared folder, checked against ``dataset``.

    Raises:
        FileNotFoundError: ``root`` is not a prepared folder (names the prepare command).
        ValueError: it holds another dataset or another layout version.
    """
    root = Path(root).expanduser()
    manifest, info_path = root / "manifest.csv", root / "prepare.json"
    if not manifest.is_file() or not info_path.is_file():
        raise FileNotFoundError(
            f"{str(root)!r} is not a prepared {dataset} folder (no manifest.csv / prepare.json). Run "
            f"`equimodal prepare {dataset} --raw <download folder> --out {root}` first, then pass "
            f"--set data.options.root={root}."
        )
    info = read_json(
        info_path,
        f"Rerun `equimodal prepare {dataset} --raw <download folder> --out {root}`: finished clips are kept "
        "and prepare.json is written again.",
    )
    if info.get("dataset") != dataset:
        raise ValueError(
            f"{str(root)!r} holds a prepared {info.get('dataset')!r} dataset, not {dataset!r}; point "
            f"data.options.root at the output of `equimodal prepare {dataset}`."
        )
    if info.get("layout_version") != LAYOUT_VERSION:
        raise ValueError(
            f"{str(root)!r} was prepared with layout version {info.get('layout_version')}, this equimodal reads "
            f"version {LAYOUT_VERSION}: rerun `equimodal prepare {dataset}` into a new folder."
        )
    return manifest, info


def default_workers() -> int:
    """Worker processes for preparation: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)
