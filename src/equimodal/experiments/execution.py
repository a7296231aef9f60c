"""Training an experiment's runs: checked first, resumable, in parallel, stopped by one signal.

:func:`execute_runs` is what ``compare``, ``study`` and ``diagnose`` share. Before any training every
run folder is checked against the config its run asks for: one holding a run of *another* config (an
older experiment into the same ``--out``) stops everything, naming the folders and the differing keys
(:func:`other_config_error`), unless ``overwrite`` asks to retrain those runs from scratch. Finished
runs are skipped, every distinct run is built once (:func:`~equimodal.engine.preflight.check_runs`),
the time is estimated (:mod:`equimodal.experiments.estimate`), then each missing run is handed to the
executor (:mod:`equimodal.experiments.executors`: worker processes on this machine, a SLURM job array or
Ray tasks), which trains it with :func:`~equimodal.experiments.executors.run_task`. A run that fails is
named and the others go on; SIGINT / SIGTERM stops them all, each resumable.

Several drivers may share one output folder (two ``compare`` commands, or a rerun while a scheduler's
jobs still train): each run folder is claimed by the process that trains it, a driver leaves a claimed
run to its owner and waits for it, and the tables are built from the finished runs of the asked config
only, written atomically, so every driver writes the same tables.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from rich.console import Console
from rich.markup import escape

from ..engine.preflight import check_runs, figures_missing
from ..engine.run_folder import RunFolderError, check_writable_folder, config_differences
from ..utils.claim import claim_holder
from ..utils.interrupt import Interrupted, StopRequest, stop_signals
from ..utils.workers import Hooks, Outcome
from .estimate import duration, time_estimate
from .executors import CLAIMED, FAILED, FINISHED, Execution, Executor, RunTask, get_executor
from .executors.base import queued_marker
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


@dataclass
class RunPlan:
    """Where an experiment's runs stand: what a dry run would train, or what a call that did not wait left
    in flight (what :func:`~equimodal.experiments.compare` and the others return then, instead of tables).

    Attributes:
        out: the experiment's folder.
        executor: the executor's name.
        finished: the runs finished with the config the experiment asks for.
        to_train: the runs this call trains (a dry run: would train).
        elsewhere: the runs another live process trains now, each with that process.
        queued: the runs submitted to a scheduler that has not started them, each with its job.
        estimate: the time estimate line (empty when nothing is to train).
        dry_run: whether nothing was trained.
    """

    out: Path
    executor: str
    finished: list[str] = field(default_factory=list)
    to_train: list[str] = field(default_factory=list)
    elsewhere: dict[str, str] = field(default_factory=dict)
    queued: dict[str, str] = field(default_factory=dict)
    estimate: str = ""
    dry_run: bool = False

    def describe(self) -> str:
        """The plan in a few lines (each list shortened to its first runs)."""
        verb = "would train" if self.dry_run else "submitted, not finished"
        lines = [
            f"{self.out}: {len(self.finished)} run(s) finished, {len(self.to_train)} {verb}, "
            f"{len(self.elsewhere)} trained by other processes, {len(self.queued)} queued by a scheduler."
        ]
        if self.to_train:
            lines.append(f"  {'To train' if self.dry_run else 'Submitted'}: {_listed(self.to_train)}")
        lines += [f"  Trained elsewhere: {name}, by {who}" for name, who in list(self.elsewhere.items())[:8]]
        lines += [f"  Queued: {name} ({job})" for name, job in list(self.queued.items())[:8]]
        if self.estimate:
            lines.append(f"  {self.estimate}")
        if self.dry_run:
            lines.append("Dry run: nothing was trained or written. Drop --dry-run to train.")
        else:
            lines.append("No tables yet: rerun the same command to follow the runs and collect the tables.")
        return "\n".join(lines)


class RunsPending(Exception):  # noqa: N818 - an outcome of the call, not an error
    """The call ends without tables: a dry run, or runs left in flight (``wait=False``); ``.plan`` says
    where the runs stand. The experiment functions catch it and return the plan."""

    def __init__(self, plan: RunPlan) -> None:
        super().__init__(plan.describe())
        self.plan = plan


WAIT_SECONDS = 5.0
"""How often a driver looks whether the runs that other processes train have been released."""


def execute_runs(
    out: Path,
    specs: Sequence[RunSpec],
    config: str | None,
    *,
    execution: Execution,
    overwrite: bool,
    console: Console,
) -> tuple[dict[RunSpec, dict[str, Any]], list[RunFailure]]:
    """Train every run of ``specs`` that has not finished, on ``execution``'s executor, resumably.

    See the module docstring. Before the first run it prints how many runs are to train and an estimate
    of the time, then names each run when it starts and when it ends, with the counts of the runs done,
    running, failed and queued. A run that another live process trains (two drivers on one folder, or
    a rerun while a scheduler's job trains it) is left to that process and waited for; when its claim
    is released it is finished, or this call trains it (resuming from its ``last.pt``).

    Returns:
        Each spec's resolved config, and the runs that failed (the others went on).

    Raises:
        RunsPending: a dry run, or ``wait=False`` with runs in flight (``.plan``; nothing else is done).
        RunFolderError: a run folder holds a run of another config (without ``overwrite``), or a path is
            a file. PreflightError: a run cannot start (nothing was trained).
        ModuleNotFoundError: the executor's engine is not installed.
        Interrupted: SIGINT / SIGTERM stopped the runs (see :mod:`equimodal.utils.workers`): the runs in
            flight stopped with a checkpoint at their next optimizer step, the rest did not start.
    """
    execution = execution.checked()
    executor = get_executor(execution)  # a placement or a scheduler option refused before any write
    expected = {s: run_config(config, s) for s in specs}
    check_writable_folder(out, create=not execution.dry_run)
    other = other_config_runs(out, specs, expected)
    if other and not overwrite:
        raise other_config_error(out, other)
    todo = [s for s in specs if s in other or finished_summary(out, s, expected[s]) is None]
    check_runs({s.name: expected[s] for s in todo})
    plan = _plan(out, specs, todo, executor, execution)
    todo = [s for s in todo if s.name not in plan.queued]
    here = [s for s in todo if s.name not in plan.elsewhere]  # what this call trains, as far as known now
    plan.estimate = _estimate(out, (specs, here), expected, executor, execution) if here else ""
    if execution.dry_run:
        raise RunsPending(plan)
    missing = figures_missing()
    if missing:
        console.print(missing, highlight=False, markup=False)
    again = f" ({len(other)} of another config, retrained from scratch: --overwrite)" if other else ""
    held = f", {len(plan.elsewhere)} trained by other processes" if plan.elsewhere else ""
    console.print(
        f"{len(specs)} runs, {len(specs) - len(todo) - len(plan.queued)} already finished, {len(here)} to run"
        f"{again}{held}{f', {len(plan.queued)} queued' if plan.queued else ''} in {out}",
        highlight=False,
        markup=False,
    )
    with stop_signals() as stop:
        if plan.estimate:
            console.print(plan.estimate, highlight=False, markup=False)
        waiting = [
            s for s in specs if s.name in plan.queued
        ]  # submitted by an earlier call that did not wait
        failures = _Drive(out, config, execution, executor, expected, overwrite, console, stop).run(
            todo, waiting, plan
        )
    return expected, failures


class _Drive:
    """The rounds of one :func:`execute_runs` call: train what nobody else trains, wait for the rest,
    and train what they leave unfinished, until every run has been tried."""

    def __init__(
        self, out: Path, config: str | None, execution: Execution, executor: Executor,
        expected: dict[RunSpec, dict[str, Any]], overwrite: bool, console: Console, stop: StopRequest,
    ) -> None:  # fmt: skip
        self.out, self.config, self.execution, self.executor = out, config, execution, executor
        self.expected, self.overwrite, self.console, self.stop = expected, overwrite, console, stop
        self.failures: list[RunFailure] = []

    def _say(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def run(self, todo: list[RunSpec], waiting: list[RunSpec], plan: RunPlan) -> list[RunFailure]:
        """Every round: set aside the runs finished or held elsewhere, train the others, then wait.

        Raises:
            RunsPending: runs left in flight (``wait=False``). Interrupted: SIGINT / SIGTERM.
        """
        while todo or waiting:
            todo, held = self._sort(todo, plan)
            waiting += held
            if todo:
                waiting += self._train(todo, plan)
            if waiting and not self.execution.wait:
                plan.to_train = []
                raise RunsPending(plan)
            todo = (
                _wait_for_release(self.out, waiting, self.executor, self.console, self.stop)
                if waiting
                else []
            )
            waiting = [s for s in waiting if s not in todo]
        return self.failures

    def _sort(self, todo: list[RunSpec], plan: RunPlan) -> tuple[list[RunSpec], list[RunSpec]]:
        """``todo`` without the runs finished meanwhile, and the runs another process holds now."""
        done = [s.name for s in todo if finished_summary(self.out, s, self.expected[s]) is not None]
        if done:
            self._say(f"Finished by other processes: {_listed(done)}")
        held = []
        for s in todo:
            holder = claim_holder(run_dir(self.out, s)) if s.name not in done else None
            if holder is not None:
                plan.elsewhere[s.name] = holder.who()
                self._say(f"{s.name} is trained by another process ({holder.who()}): waiting for it")
                held.append(s)
        return [s for s in todo if s.name not in done and s not in held], held

    def _train(self, todo: list[RunSpec], plan: RunPlan) -> list[RunSpec]:
        """Hand ``todo`` to the executor; returns the runs it found held by other processes.

        Raises:
            RunsPending: the executor left the runs queued. Interrupted: a stop.
        """
        # a run of another config is retrained from scratch only under overwrite, and only while it is one
        # (another driver may have trained it with this config while this one waited)
        other = other_config_runs(self.out, todo, self.expected) if self.overwrite else {}
        tasks = [_task(self.out, s, self.config, self.execution, s in other) for s in todo]
        progress = _Progress(
            self.console, [s.name for s in todo], self.failures, [Path(t.folder) for t in tasks]
        )
        outcome = self.executor.run(tasks, progress.hooks(), self.stop)
        if outcome.signum is not None:
            raise stopped_error(outcome, progress.names, self.failures)
        if outcome.queued:
            plan.to_train = [todo[i].name for i in outcome.queued]
            raise RunsPending(plan)
        plan.elsewhere.update({todo[i].name: who for i, who in progress.elsewhere.items()})
        return [todo[i] for i in progress.elsewhere]


def _task(out: Path, spec: RunSpec, config: str | None, execution: Execution, fresh: bool) -> RunTask:
    return RunTask(
        name=spec.name, config=spec.config or config, overrides=tuple(spec.overrides),
        folder=str(run_dir(out, spec).absolute()), threads=execution.run_threads(), fresh=fresh,
        processes=execution.gpus_per_run, out=str(Path(out).absolute()),
    )  # fmt: skip


def _plan(
    out: Path, specs: Sequence[RunSpec], todo: Sequence[RunSpec], executor: Executor, execution: Execution
) -> RunPlan:
    """Where the runs stand before this call trains: finished, held by other processes, queued."""
    plan = RunPlan(out, executor.name, dry_run=execution.dry_run)
    pending = set(todo)
    plan.finished = [s.name for s in specs if s not in pending]
    for s in todo:
        folder = run_dir(out, s)
        holder = claim_holder(folder)
        if holder is not None:
            plan.elsewhere[s.name] = holder.who()
        elif (marker := queued_job(folder, executor)) is not None:
            plan.queued[s.name] = f"job {marker.get('job', '?')}, submitted {marker.get('submitted', '?')}"
        else:
            plan.to_train.append(s.name)
    return plan


def queued_job(folder: Path, executor: Executor) -> dict[str, Any] | None:
    """The queued marker of the run in ``folder`` while its job is still pending or running, as the
    executor tells (``still_queued``; an executor without it queues nothing past its call)."""
    still_queued = getattr(executor, "still_queued", None)
    marker = read_marker(queued_marker(folder)) if still_queued is not None else None
    return marker if marker is not None and still_queued(marker) else None


def read_marker(path: Path) -> dict[str, Any] | None:
    """A queued marker's content (None when there is none or it cannot be read)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _estimate(
    out: Path,
    runs: tuple[Sequence[RunSpec], Sequence[RunSpec]],
    expected: dict[RunSpec, dict[str, Any]],
    executor: Executor,
    execution: Execution,
) -> str:
    specs, todo = runs
    parallel = executor.parallelism(len(todo))
    if execution.executor == "local":
        how = (
            f"--devices {','.join(execution.devices)} x {execution.per_device}" if execution.devices else None
        )
    else:
        how = f"--executor {execution.executor} (up to {parallel} at once)"
    return time_estimate(out, specs, todo, expected, (parallel, execution.run_threads()), how)


def _wait_for_release(
    out: Path, held: Sequence[RunSpec], executor: Executor, console: Console, stop: StopRequest
) -> list[RunSpec]:
    """Wait until a run of ``held`` is neither trained by another process (its claim) nor queued by a
    scheduler (its marker, while the executor says its job is pending); returns those runs: finished by
    their owner, or left unfinished, which this call then trains (resuming from ``last.pt``).

    Raises:
        Interrupted: SIGINT / SIGTERM while waiting (nothing of this call is in flight).
    """
    console.print(
        f"Waiting for {len(held)} run(s) that other processes or queued jobs train "
        f"({_listed([s.name for s in held])}); their results are used when they finish.",
        highlight=False,
        markup=False,
    )

    def pending(spec: RunSpec) -> bool:
        folder = run_dir(out, spec)
        return claim_holder(folder) is not None or queued_job(folder, executor) is not None

    while True:
        released = [s for s in held if not pending(s)]
        if released:
            return released
        deadline = time.monotonic() + WAIT_SECONDS
        while stop.signum is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if stop.signum is not None:
            name = signal.Signals(int(stop.signum)).name
            raise Interrupted(
                int(stop.signum),
                f"{name} stopped the wait for the runs that other processes or queued jobs train (they go "
                "on there); no results table was written. Rerun the same command to collect them.",
            )


class _Progress:
    """The driver's view of the runs of one executor call: each run's start and end, and the counts."""

    def __init__(
        self, console: Console, names: Sequence[str], failures: list[RunFailure], folders: Sequence[Path]
    ) -> None:
        self.console, self.names, self.failures, self.folders = console, list(names), failures, folders
        self.started: dict[int, tuple[int, float]] = {}
        self.ended: dict[int, str] = {}
        self.elsewhere: dict[int, str] = {}

    def _say(self, text: str, markup: bool = False) -> None:
        self.console.print(text, highlight=False, markup=markup)

    def counts(self) -> str:
        ended = list(self.ended.values())
        running = len(self.started) - len(self.ended)
        queued = len(self.names) - len(self.started)
        parts = [f"{ended.count('done')} done", f"{running} running"]
        parts += [f"{ended.count('failed')} failed"] if "failed" in ended else []
        parts += [f"{len(self.elsewhere)} elsewhere"] if self.elsewhere else []
        parts += [f"{queued} queued"] if queued else []
        return ", ".join(parts)

    def start(self, i: int) -> None:
        self.started[i] = (len(self.started) + 1, time.perf_counter())
        self._say(f"[{self.started[i][0]}/{len(self.names)}] start {self.names[i]}")

    def done(self, i: int, value: Any, error: str | None) -> None:
        if i not in self.started:  # a scheduler that reports a task it never said had started
            self.started[i] = (len(self.started) + 1, time.perf_counter())
        k, tic = self.started[i]
        status, message = (value[1], value[2]) if value else (FAILED, error)
        head = f"[{k}/{len(self.names)}]"
        if status == CLAIMED:
            self.elsewhere[i] = str(message)
            self.ended[i] = "elsewhere"
            self._say(f"{head} {self.names[i]} is trained by another process ({message}): waiting for it")
        elif status == FAILED or error:
            self.ended[i] = "failed"
            self.failures.append(RunFailure(self.folders[i], str(error or message)))
            self._say(
                f"{head} {escape(self.names[i])} [red]FAILED[/]: {escape(str(error or message))} "
                f"[{escape(self.counts())}]",
                markup=True,
            )
        else:
            self.ended[i] = "done"
            took = "finished elsewhere" if status == FINISHED else duration(time.perf_counter() - tic)
            self._say(f"{head} done {self.names[i]} ({took}) [{self.counts()}]")

    def hooks(self) -> Hooks:
        return Hooks(self.start, self.done, self._say, self.names.__getitem__)


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
