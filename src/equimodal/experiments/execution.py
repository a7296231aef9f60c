"""Training an experiment's runs: checked first, resumable, in parallel, stopped by one signal.

:func:`execute_runs` is what ``compare``, ``study`` and ``diagnose`` share. Before any training every
run folder is checked against the config its run asks for: one holding a run of *another* config (an
older experiment into the same ``--out``) stops everything, naming the folders and the differing keys
(:func:`other_config_error`), unless ``overwrite`` asks to retrain those runs from scratch. Finished
runs are skipped, every distinct run is built once (:func:`~equimodal.engine.preflight.check_runs`),
the time is estimated (:mod:`equimodal.experiments.estimate`), then each missing run is trained by
:func:`run_one` (in worker processes with ``jobs > 1``, :mod:`equimodal.utils.workers`). A run that
fails is named and the others go on; SIGINT / SIGTERM stops them all, each resumable.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.markup import escape

from ..engine.preflight import check_runs, figures_missing
from ..engine.run_folder import RunFolderError, check_writable_folder, config_differences
from ..utils.interrupt import Interrupted, stop_signals
from ..utils.workers import Hooks, Outcome, run_tasks
from .estimate import duration, time_estimate
from .specs import RunSpec, finished_summary, run_config, run_dir, run_folder

log = logging.getLogger(__name__)


class RunFailure(NamedTuple):
    """A run that failed: its folder and the error (``Type: message``; the traceback is logged at
    DEBUG, shown by the CLI's ``-v``)."""

    folder: Path
    error: str


class RunsFailed(RuntimeError):
    """Runs of a command did not finish and its result needs them (the CLI exits 1).

    Attributes:
        failures: the runs that failed in this call (the others did not finish before it).
    """

    def __init__(self, message: str, failures: Sequence[RunFailure] = ()) -> None:
        super().__init__(message)
        self.failures = list(failures)


def run_one(args: tuple[Any, ...]) -> tuple[str, str | None]:
    """Train one run; returns ``(run folder, error message or None)`` so one failure stops nothing.

    ``args`` is ``(config, overrides, out, threads)`` or ``(config, overrides, out, threads, fresh)``;
    with ``fresh`` (a run of another config, retrained under ``overwrite``) ``train`` replaces the old
    run's files once it holds the folder's claim, so the run starts from scratch; other files there are
    kept. A module-level function: it is sent to the worker processes.

    Raises:
        Interrupted: SIGINT / SIGTERM stopped the run (after its checkpoint).
    """
    config, overrides, out, threads = args[:4]
    fresh = bool(args[4]) if len(args) > 4 else False
    import torch

    from ..engine.config import load_config
    from ..engine.trainer import train

    torch.set_num_threads(threads)
    try:
        cfg = load_config(config, list(overrides) + ["train.progress=false"])
        train(cfg, out, overwrite=fresh)  # train claims the folder before it clears the old run
    except Interrupted:
        raise  # a signal stops every run, it is no failure of this one
    except Exception as exc:  # noqa: BLE001 - reported per run, the experiment goes on
        log.debug("run %s failed", out, exc_info=True)  # the traceback with -v; the driver prints the error
        return out, f"{type(exc).__name__}: {exc}"
    return out, None


def other_config_runs(
    out: Path, specs: Sequence[RunSpec], expected: Mapping[RunSpec, dict[str, Any]]
) -> dict[RunSpec, dict[str, tuple[Any, Any]]]:
    """The runs whose folder holds a run of another config: ``{spec: {key: (there, now)}}``.

    A folder whose config matches but whose summary records another config is another run too.

    Raises:
        RunFolderError: a run's folder path is an existing file.
    """
    found: dict[RunSpec, dict[str, tuple[Any, Any]]] = {}
    for s in specs:
        folder = run_folder(out, s)
        if folder.path.exists() and not folder.path.is_dir():
            raise RunFolderError(
                f"{str(folder.path)!r} is a file, but compare keeps the run {s.label} seed {s.seed} there. "
                "Move the file away, or pass another --out."
            )
        recorded = folder.recorded_config()
        if recorded is None:
            continue
        diffs = config_differences(recorded, expected[s])
        if not diffs:  # the config matches: the summary (if any) must too, or it is another run's
            in_summary = folder.summary_config()
            if in_summary is not None:
                diffs = config_differences(in_summary, expected[s])
        if diffs:
            found[s] = diffs
    return found


def other_config_error(out: Path, found: Mapping[RunSpec, dict[str, tuple[Any, Any]]]) -> RunFolderError:
    """One error naming every run folder of another config, its differing keys, and the two ways out."""
    lines = []
    for s, diffs in list(found.items())[:10]:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in list(diffs.items())[:4])
        more = f" (and {len(diffs) - 4} more keys)" if len(diffs) > 4 else ""
        lines.append(f"  {s.name}: {shown}{more}")
    if len(found) > 10:
        lines.append(f"  ... and {len(found) - 10} more run folders")
    listing = "\n".join(lines)
    return RunFolderError(
        f"--out {str(out)!r} holds {len(found)} run folder(s) trained with another config than this "
        f"comparison asks for:\n{listing}\nNothing was trained or changed. Pass another --out to keep "
        "those runs and start a new comparison, or add --overwrite to retrain them from scratch (their "
        "old run files are deleted)."
    )


def execute_runs(
    out: Path,
    specs: Sequence[RunSpec],
    config: str | None,
    *,
    jobs: int,
    threads: int,
    overwrite: bool,
    console: Console,
) -> tuple[dict[RunSpec, dict[str, Any]], list[RunFailure]]:
    """Train every run of ``specs`` that has not finished (in parallel with ``jobs``), resumably.

    See the module docstring. Before the first run it prints how many runs are to train and an estimate
    of the time, then names each run when it starts and when it ends.

    Returns:
        Each spec's resolved config, and the runs that failed (the others went on).

    Raises:
        RunFolderError: a run folder holds a run of another config (without ``overwrite``), or a path is
            a file. PreflightError: a run cannot start (nothing was trained).
        Interrupted: SIGINT / SIGTERM stopped the runs (see :mod:`equimodal.utils.workers`): the runs in
            flight stopped with a checkpoint at their next optimizer step, the rest did not start.
    """
    expected = {s: run_config(config, s) for s in specs}
    check_writable_folder(out)
    other = other_config_runs(out, specs, expected)
    if other and not overwrite:
        raise other_config_error(out, other)
    todo = [s for s in specs if s in other or finished_summary(out, s, expected[s]) is None]
    check_runs({s.name: expected[s] for s in todo})
    missing = figures_missing()
    if missing:
        console.print(missing, highlight=False, markup=False)
    again = f" ({len(other)} of another config, retrained from scratch: --overwrite)" if other else ""
    console.print(
        f"{len(specs)} runs, {len(specs) - len(todo)} already finished, {len(todo)} to run{again} in {out}",
        highlight=False,
        markup=False,
    )
    work = [(s.config or config, s.overrides, str(run_dir(out, s)), threads, s in other) for s in todo]
    names = [s.name for s in todo]
    failures: list[RunFailure] = []
    with stop_signals() as stop:
        if todo:
            console.print(
                time_estimate(out, specs, todo, expected, (jobs, threads)), highlight=False, markup=False
            )
        outcome = run_tasks(run_one, work, jobs, _run_hooks(console, names, work, failures), stop)
    if outcome.signum is not None:
        raise stopped_error(outcome, names, failures)
    return expected, failures


def _run_hooks(
    console: Console, names: Sequence[str], work: Sequence[tuple[Any, ...]], failures: list[RunFailure]
) -> Hooks:
    """Print ``[k/N] start NAME`` when a run starts and ``[k/N] done NAME (time)`` or FAILED when it ends."""
    started: dict[int, tuple[int, float]] = {}

    def start(i: int) -> None:
        started[i] = (len(started) + 1, time.perf_counter())
        console.print(f"[{started[i][0]}/{len(names)}] start {names[i]}", highlight=False, markup=False)

    def done(i: int, value: Any, error: str | None) -> None:
        k, tic = started[i]
        error = error or (value[1] if value else None)
        if error:
            console.print(
                f"[{k}/{len(names)}] {escape(names[i])} [red]FAILED[/]: {escape(error)}", highlight=False
            )
            failures.append(RunFailure(Path(work[i][2]), error))
        else:
            took = duration(time.perf_counter() - tic)
            console.print(f"[{k}/{len(names)}] done {names[i]} ({took})", highlight=False, markup=False)

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False)

    return Hooks(start, done, say, names.__getitem__)


def _listed(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def stopped_error(outcome: Outcome, names: Sequence[str], failures: Sequence[RunFailure]) -> Interrupted:
    """The :class:`Interrupted` of stopped runs: what stopped, what was killed, what did not start."""
    signum = int(outcome.signum or signal.SIGTERM)
    parts = [
        f"{signal.Signals(signum).name} stopped the runs; no results table was written (it needs every run)."
    ]
    if outcome.stopped:
        stopped = _listed([names[i] for i in outcome.stopped])
        parts.append(
            f"Stopped (a run in training wrote its checkpoint at its next optimizer step): {stopped}."
        )
    if outcome.killed:
        killed = _listed([names[i] for i in outcome.killed])
        parts.append(f"Killed before they stopped (they resume from their last checkpoint): {killed}.")
    if outcome.not_started:
        parts.append(f"{len(outcome.not_started)} run(s) not started.")
    if failures:
        parts.append(f"{len(failures)} run(s) failed (named above).")
    parts.append("Rerun the same command to resume: finished runs are kept, stopped ones go on.")
    return Interrupted(signum, " ".join(parts))
