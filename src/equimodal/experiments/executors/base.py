"""What every executor shares: the options of a call (:class:`Execution`), one run as a task
(:class:`RunTask`), the function that trains it anywhere (:func:`run_task`) and the executor contract.

A task is self-contained and picklable: the config source, its overrides, the run folder (an absolute
path) and the threads. :func:`run_task` is the same on every engine: it leaves a run that another
process holds (its folder's claim, :mod:`equimodal.utils.claim`) to that process and says so, skips a
run that finished with this config, and otherwise trains it with ``train`` (which claims the folder for
the whole run and resumes from ``last.pt``), in this process or, with ``processes > 1``, through
``torchrun`` on the task's allocation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ...utils.interrupt import Interrupted, StopRequest
from ...utils.workers import Hooks, Outcome

EXECUTORS = ("local", "slurm", "ray")
"""The engines an experiment's runs can be trained on (``--executor``)."""

DONE, FINISHED, CLAIMED, FAILED = "done", "finished", "claimed", "failed"
"""A task's report: trained now; found finished (by another process); held by another live process;
failed (with its error)."""


@dataclass(frozen=True)
class RunTask:
    """One run to train, as every executor sends it.

    Attributes:
        name: ``<label>/seed<k>``, for progress lines.
        config: the preset or YAML file (None: the default config).
        overrides: ``section.key=value`` overrides (the seed's among them).
        folder: the run folder, absolute (a worker on another node or in another working directory
            finds it on the shared filesystem).
        threads: torch threads of the run (per process).
        fresh: retrain from scratch (a run of another config there, under ``overwrite``).
        processes: processes of the run; above 1 it is launched through ``torchrun`` (``--gpus-per-run``).
        out: the experiment's folder, absolute (None: not known). The run folder is below it, at a depth
            that depends on the run's label (a study's labels hold slashes); an executor that keeps files
            of its own there (the SLURM executor's job files) uses it.
    """

    name: str
    config: str | None
    overrides: tuple[str, ...]
    folder: str
    threads: int = 1
    fresh: bool = False
    processes: int = 1
    out: str | None = None


def queued_marker(folder: Path) -> Path:
    """The file that says a run was submitted to a scheduler: ``OUT/<label>/seed<k>.queued.json``, next
    to the run folder; :func:`run_task` removes it when the run starts."""
    return folder.with_name(f"{folder.name}.queued.json")


@dataclass(frozen=True)
class Execution:
    """Where and how an experiment's runs are trained (the ``--executor`` family of options).

    Attributes:
        executor: ``local`` (processes on this machine), ``slurm`` (submitit) or ``ray``.
        jobs: runs at once on the local executor (without ``devices``).
        threads: torch threads per run, or ``"auto"``: this machine's cores divided among the runs at once.
        devices: local placement: one slot per device (``cuda:0``; ``all``: every visible GPU), each run
            alone on its device through ``CUDA_VISIBLE_DEVICES``.
        per_device: runs at once on each device (small models).
        gpus_per_run: processes (GPUs) per run; above 1 each run is launched through torchrun.
        wait: follow the runs until every one has finished (False: submit and return; rerun to collect;
            slurm only: local and Ray runs end with the command).
        dry_run: only say what would be trained, what is finished or held elsewhere, and the cost.
        slurm: submitit's SLURM parameters (``partition``, ``time`` in minutes, ``mem_gb``, ``account``,
            ``array_parallelism``, ``cpus_per_task``, ...); ``cluster: local`` runs the jobs on this
            machine through submitit's local executor.
        ray_address: the Ray cluster to join (None: a local one started for the call; ``auto``: the
            cluster this machine is part of; ``HOST:PORT``: the cluster whose head listens there).
    """

    executor: str = "local"
    jobs: int = 1
    threads: int | str = 1
    devices: tuple[str, ...] = ()
    per_device: int = 1
    gpus_per_run: int = 1
    wait: bool = True
    dry_run: bool = False
    slurm: Mapping[str, Any] = field(default_factory=dict)
    ray_address: str | None = None

    def checked(self) -> Execution:
        """This execution, each value checked (a ValueError names the option, what it must be and how)."""
        from ..specs import check_count

        if self.executor not in EXECUTORS:
            from ...registry import unknown_name_error

            raise unknown_name_error("executor", str(self.executor), list(EXECUTORS))
        check_count(self.jobs, "jobs", "runs in parallel", "2")
        check_count(self.per_device, "per-device", "runs at once on each device", "2")
        check_count(self.gpus_per_run, "gpus-per-run", "GPUs (processes) of each run", "2")
        if self.threads != "auto":
            check_count(self.threads, "threads", "torch threads per run, or auto", "2")
        if self.devices and self.executor != "local":
            raise ValueError(
                f"--devices places runs on this machine's GPUs (--executor local); with --executor "
                f"{self.executor} each run gets its GPUs from the scheduler: drop --devices and pass "
                "--gpus-per-run."
            )
        if not self.wait and self.executor == "local":
            raise ValueError(
                "--no-wait leaves submitted runs to a scheduler, but --executor local trains them in this "
                "command's own processes: drop --no-wait, or pass --executor slurm."
            )
        if not self.wait and self.executor == "ray":
            raise ValueError(
                "--no-wait leaves submitted runs to a scheduler, but Ray ends a driver's tasks when the "
                "driver exits, so --executor ray must follow its runs to the end: drop --no-wait, or pass "
                "--executor slurm to submit the runs and return."
            )
        return self

    def parallel(self) -> int:
        """Runs at once on the local executor: one per device slot (a slot holds ``gpus_per_run``
        devices), else ``jobs``."""
        if not self.devices:
            return self.jobs
        count = len(visible_gpus()) if self.devices == ("all",) else len(self.devices)
        return max(1, count // self.gpus_per_run) * self.per_device

    def run_threads(self) -> int:
        """Torch threads of each run: ``threads``, or the available cores divided among the runs at once."""
        if self.threads != "auto":
            return int(self.threads)
        return max(1, available_cores() // (self.parallel() * self.gpus_per_run))


def visible_gpus() -> list[str]:
    """This machine's GPUs as ``cuda:<k>`` (none without CUDA)."""
    import torch

    return [f"cuda:{k}" for k in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def available_cores() -> int:
    """The cores this process may run on (its affinity where the platform says, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Executor(Protocol):
    """Runs tasks somewhere and reports them through the driver's hooks.

    ``run`` calls ``hooks.start(i)`` when task ``i`` starts (or is submitted) and ``hooks.done(i, report,
    error)`` when it ends, with :func:`run_task`'s report ``(folder, status, message)``; it honours the
    stop request (SIGINT / SIGTERM) by stopping the tasks in flight and returns how it ended. With
    ``wait=False`` it may return once every task is submitted, naming them in ``Outcome.queued``.
    """

    name: str

    def parallelism(self, tasks: int) -> int:
        """About how many tasks run at once (for the time estimate)."""
        ...

    def run(self, tasks: Sequence[RunTask], hooks: Hooks, stop: StopRequest) -> Outcome:
        """Run every task (see the class docstring)."""
        ...


# ------------------------------------------------------------------------------------------ one task
def run_task(task: RunTask) -> tuple[str, str, str | None]:
    """Train one run anywhere; returns ``(folder, status, message)`` so that one failure stops nothing.

    ``status`` is :data:`DONE` (trained now), :data:`FINISHED` (it had finished: nothing done),
    :data:`CLAIMED` (another live process holds it; ``message`` names that process: pid and host) or :data:`FAILED`
    (``message`` is the error, ``Type: message``). A module-level function: it is sent to worker
    processes, SLURM jobs and Ray tasks.

    Raises:
        Interrupted: SIGINT / SIGTERM stopped the run (after its checkpoint).
    """
    import logging

    from ...utils.claim import ClaimHeld, claim_holder

    folder = Path(task.folder)
    with contextlib.suppress(OSError):  # the run has left the scheduler's queue
        queued_marker(folder).unlink(missing_ok=True)
    holder = claim_holder(folder)
    if holder is not None:
        return task.folder, CLAIMED, holder.who()
    try:
        import torch

        from ...engine.config import load_config
        from ...engine.trainer import finished_run, train

        cfg = load_config(task.config, [*task.overrides, "train.progress=false"])
        if not task.fresh and finished_run(folder, cfg) is not None:
            return task.folder, FINISHED, None
        if task.processes > 1:
            return _torchrun(task)
        torch.set_num_threads(task.threads)
        # train claims the folder before it clears an old run (fresh) or resumes from last.pt; a run that
        # finished between the check above and the claim is returned as it is (skip_finished)
        train(cfg, folder, overwrite=task.fresh, skip_finished=not task.fresh)
    except ClaimHeld as held:
        return task.folder, CLAIMED, held.owner.who()
    except Interrupted:
        raise  # a signal stops every run, it is no failure of this one
    except Exception as exc:  # noqa: BLE001 - reported per run, the experiment goes on
        logging.getLogger(__name__).debug("run %s failed", folder, exc_info=True)
        return task.folder, FAILED, f"{type(exc).__name__}: {exc}"
    return task.folder, DONE, None


def torchrun_command(task: RunTask) -> list[str]:
    """The command that trains ``task`` in ``task.processes`` processes on this node (torchrun)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={task.processes}",
    ]
    command += ["-m", "equimodal", "train"] + ([task.config] if task.config else [])
    for override in (*task.overrides, "train.progress=false"):
        command += ["--set", override]
    command += ["--out", task.folder, "--overwrite" if task.fresh else "--skip-finished"]
    return command


def log_path(task: RunTask, suffix: str) -> Path:
    """A log next to the run folder: ``OUT/<label>/seed<k>.<suffix>.log``."""
    folder = Path(task.folder)
    return folder.with_name(f"{folder.name}.{suffix}.log")


def _torchrun(task: RunTask) -> tuple[str, str, str | None]:
    """Train ``task`` through torchrun; its output goes to ``seed<k>.torchrun.log`` next to the run folder.

    A stop (SIGINT / SIGTERM to this process: a worker's or the driver's, through the shared
    :func:`~equimodal.utils.interrupt.stop_signals` request) is passed on to torchrun, which passes it to
    the ranks: they checkpoint and end, and this raises :class:`Interrupted`. A second Ctrl-C kills it.
    """
    from ...utils.interrupt import stop_signals

    log = log_path(task, "torchrun")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(task.threads)}
    with open(log, "ab") as sink, stop_signals() as stop:
        proc = subprocess.Popen(torchrun_command(task), stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None and stop.signum is None:
                time.sleep(0.2)
            if stop.signum is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
                raise Interrupted(stop.signum, f"stopped {task.name} (torchrun)")
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
            raise Interrupted(int(signal.SIGINT), f"killed {task.name} (torchrun)") from None
    if proc.returncode != 0:
        return task.folder, FAILED, f"torchrun exited with code {proc.returncode}; its output: {log}"
    return task.folder, DONE, None
