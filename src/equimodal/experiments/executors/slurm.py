"""``--executor slurm``: every missing run as one task of a SLURM job array, through ``submitit``.

The runs of one call are submitted together (``map_array``: one ``sbatch --array``), each job running
:func:`~.base.run_task` on its node; the run folders must be on a filesystem that the nodes share.

Where the files go:

- submitit's job files (the pickled task, its result, the job's stdout and stderr) go to
  ``OUT/.submitit/<job id>/`` by default, where ``OUT`` is the experiment's folder, taken from the tasks
  (:attr:`~.base.RunTask.out`; tasks built without it: the common folder of their run folders'
  grandparents); a local job's id is its process id, which a later call may get again, so ``cluster:
  local`` keeps each call's jobs in a folder of their own, ``OUT/.submitit/local-<time>-<random>/<job
  id>/``. ``--slurm folder=PATH`` puts them elsewhere (``%j`` in it stands for the job id);
- next to each run folder, links to its job's logs, ``OUT/<label>/seed<k>.slurm.out`` and ``.err``
  (:func:`link_logs`), and a marker, ``OUT/<label>/seed<k>.queued.json``, that says which job the run was
  submitted to (:func:`~.base.queued_marker`); the job removes it when it starts. A later call on the
  same folder reads it and waits for a job that is still queued or running (:meth:`SlurmExecutor.still_queued`)
  instead of submitting the run again.

The ``--slurm`` keys (:data:`~.slurm_options.SLURM_KEYS`) map onto submitit's parameters: ``time`` ->
``timeout_min`` (default :data:`DEFAULT_TIME_MIN`: submitit's own default, 5 minutes, would end most
runs), ``mem_gb``, ``cpus_per_task`` (default ``--threads`` x ``--gpus-per-run``), ``gpus_per_node``
(default ``--gpus-per-run`` when it is above 1 or a run's ``train.device`` names a CUDA device, else
none: a config on ``train.device: auto`` gets a GPU only with ``gpus_per_node``), and the SLURM-only
``partition``, ``account``, ``qos``, ``constraint``, ``exclude``, ``array_parallelism`` and ``setup``.

``cluster`` picks submitit's backend: ``slurm`` (default); ``local``, processes on this machine, to try a
setup (every job starts at once: ``array_parallelism``, the memory and the CPUs are not applied; it sees
a GPU only with ``gpus_per_node``; ``setup`` lines run before each job; the jobs share the terminal's
process group, so a Ctrl-C there reaches them too and submitit's controller ends them within a second,
to resume from their last checkpoint); ``debug``, every job in this process, one after the other (no
``--no-wait``).

With ``wait`` (the default) the call follows the jobs, polling every :data:`POLL_SECONDS`: a job seen
running (its marker gone, or the scheduler says so) is reported started, a finished one with its run's
report, a job that ended without a report (killed, out of memory, out of time) as a failure naming its
logs. SIGINT / SIGTERM cancels the jobs: queued ones never start, running ones get SIGTERM (the trainer
writes its checkpoint), and their reports are awaited for up to :data:`GRACE_SECONDS`. Without ``wait``
(``--no-wait``) the call returns once the jobs are submitted; rerun the same command to follow them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...utils.interrupt import StopRequest
from ...utils.io import atomic_write_text
from ...utils.workers import Hooks, Outcome
from .base import FAILED, Execution, RunTask, queued_marker, run_task

CLUSTERS = ("slurm", "local", "debug")
"""submitit's backends (``--slurm cluster=...``)."""

DEFAULT_TIME_MIN = 24 * 60
"""The time limit of a run's job without ``--slurm time=MINUTES``: one day."""

POLL_SECONDS = 2.0
"""How often the jobs are looked at while the call follows them."""

GRACE_SECONDS = 30.0
"""How long a stop waits for the running jobs to report (their runs write a checkpoint on SIGTERM)."""

STATE_REFRESH_SECONDS = 60.0
"""How often the scheduler is asked (``sacct``, one call for every job) for states it may have changed:
a job that died without a result is seen at the latest this long after its end."""

QUEUE_LAG_SECONDS = 120.0
"""A job the scheduler does not know yet counts as queued this long after its submission (``sacct``
lags behind ``sbatch``); after that it counts as gone."""

ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
     "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
)  # fmt: skip
"""The SLURM job states of a job that still has to run or is running."""


def link_logs(folder: Path, stdout: Path, stderr: Path) -> None:
    """Links next to the run folder to its job's logs, ``seed<k>.slurm.out`` and ``seed<k>.slurm.err``
    (a later submission of the run replaces them); a filesystem without symbolic links gets none."""
    for suffix, target in (("out", stdout), ("err", stderr)):
        link = folder.with_name(f"{folder.name}.slurm.{suffix}")
        tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            os.symlink(Path(target).absolute(), tmp)
            os.replace(tmp, link)
        except OSError:
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ the parameters
def _count(options: Mapping[str, Any], key: str, what: str, least: int = 1) -> int | None:
    """``options[key]`` as a whole number >= ``least`` (None when absent)."""
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(
            f"--slurm {key}={value!r}: expected {what}, a whole number >= {least} (e.g. --slurm {key}="
            f"{max(least, 2)})."
        )
    return value


def setup_lines(value: Any) -> list[str]:
    """The ``setup`` key as shell lines: a list, or one string of lines separated by ``;``."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [line.strip() for line in value.split(";") if line.strip()]
    if isinstance(value, Sequence) and all(isinstance(line, str) for line in value):
        return [line for line in value if line.strip()]
    raise ValueError(
        f"--slurm setup={value!r}: expected shell lines, a list of strings or one string separated by ';' "
        "(e.g. --slurm 'setup=module load cuda; source .venv/bin/activate')."
    )


def submitit_parameters(
    options: Mapping[str, Any], execution: Execution, threads: int, gpu_config: bool
) -> dict[str, Any]:
    """submitit's ``update_parameters`` arguments for the ``--slurm`` keys ``options`` (see the module
    docstring), for runs of ``threads`` torch threads; ``gpu_config``: a run's config names a CUDA device.

    Only what the chosen backend takes is passed (the SLURM-only keys are dropped off SLURM).

    Raises:
        ValueError: a value of the wrong kind (the message names the key and an example).
    """
    cluster = options.get("cluster", "slurm")
    params: dict[str, Any] = {"name": "equimodal"}
    time_min = options.get("time", DEFAULT_TIME_MIN)
    if isinstance(time_min, bool) or not isinstance(time_min, int | float) or time_min <= 0:
        raise ValueError(
            f"--slurm time={time_min!r}: expected the time limit of each run's job in minutes, a number > 0 "
            "(e.g. --slurm time=120 for two hours)."
        )
    params["timeout_min"] = max(1, math.ceil(time_min))
    if options.get("mem_gb") is not None:
        mem = options["mem_gb"]
        if isinstance(mem, bool) or not isinstance(mem, int | float) or mem <= 0:
            raise ValueError(f"--slurm mem_gb={mem!r}: expected the memory of each run's job in GB, e.g. 16.")
        params["mem_gb"] = mem
    cpus = _count(options, "cpus_per_task", "the CPUs of each run's job")
    params["cpus_per_task"] = cpus if cpus is not None else threads * execution.gpus_per_run
    gpus = _count(options, "gpus_per_node", "the GPUs of each run's job", least=0)
    if gpus is None and (execution.gpus_per_run > 1 or gpu_config):
        gpus = execution.gpus_per_run
    if gpus:
        params["gpus_per_node"] = gpus
    lines = setup_lines(options.get("setup"))
    parallel = _count(options, "array_parallelism", "how many runs of the array run at once")
    if cluster == "slurm":
        for key in ("partition", "account", "qos", "constraint", "exclude"):
            if options.get(key) not in (None, ""):
                params[f"slurm_{key}"] = str(options[key])
        if parallel is not None:
            params["slurm_array_parallelism"] = parallel
        if lines:
            params["slurm_setup"] = lines
    elif cluster == "local" and lines:
        params["local_setup"] = lines
    if cluster == "debug":  # in this process: no resources to ask for
        params = {"name": params["name"]}
    return params


def experiment_folder(tasks: Sequence[RunTask]) -> Path:
    """The experiment's folder: the tasks' :attr:`~.base.RunTask.out`, else the common folder of their
    run folders' grandparents (``OUT/<label>/seed<k>``: ``OUT``, or above it for labels with slashes)."""
    outs = {t.out for t in tasks if t.out}
    if len(outs) == 1:
        return Path(outs.pop())
    return Path(os.path.commonpath([str(Path(t.folder).parent.parent) for t in tasks]))


def _uses_gpu(tasks: Sequence[RunTask]) -> bool:
    """Whether a task's config trains on a CUDA device (``train.device: cuda``; ``auto`` does not count)."""
    from ...engine.config import load_config

    seen: set[tuple[str | None, tuple[str, ...]]] = set()
    for task in tasks:
        key = (task.config, tuple(o for o in task.overrides if not o.startswith("train.seed=")))
        if key in seen:
            continue
        seen.add(key)
        try:
            device = load_config(task.config, task.overrides).train.device
        except Exception:  # noqa: BLE001 - the run's own start reports a broken config
            continue
        if device.startswith("cuda"):
            return True
    return False


# ---------------------------------------------------------------------------------------- the jobs
def _log_paths(job: Any) -> str:
    """The job's stdout and stderr files."""
    paths = job.paths
    return f"{paths.stdout}, {paths.stderr}" if paths.stderr != paths.stdout else str(paths.stdout)


def _trace_tail(text: str) -> str:
    """The last line of a traceback inside submitit's error message (the exception, ``Type: message``)."""
    inside = re.findall(r"-{10,}\n(.*?)\n-{10,}", text, flags=re.S)
    lines = [line.strip() for line in (inside[0] if inside else text).splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def job_error(job: Any, error: BaseException) -> str:
    """What a job that ended without its run's report says: its error or its state, and its logs."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    if isinstance(error, FailedJobError):
        what = f"its job {job.job_id} raised {_trace_tail(str(error))}"
    elif isinstance(error, UncompletedJobError):
        state = "unknown"
        with contextlib.suppress(Exception):
            state = str(job.state)
        what = (
            f"its job {job.job_id} ended without a result (state: {state}; killed, out of memory or out of "
            "time?); rerun the same command to retry it"
        )
    else:
        what = f"its job {job.job_id} could not be read: {type(error).__name__}: {error}"
    return f"{what}; log: {_log_paths(job)}"


class SlurmExecutor:
    """A SLURM job array through submitit (see the module docstring)."""

    name = "slurm"

    def __init__(self, execution: Execution) -> None:
        self.execution = execution
        self.options = dict(execution.slurm)
        self.cluster = str(self.options.get("cluster", "slurm"))
        if self.cluster not in CLUSTERS:
            raise ValueError(
                f"--slurm cluster={self.cluster!r}: expected one of {', '.join(CLUSTERS)} (slurm: the SLURM "
                "cluster this machine submits to; local: this machine, to try a setup; debug: in this process)."
            )
        if self.cluster == "debug" and not execution.wait:
            raise ValueError(
                "--slurm cluster=debug trains the runs in this command's process, so --no-wait cannot leave "
                "them running: drop --no-wait, or pass --slurm cluster=local."
            )
        # every value checked now, before anything is trained or submitted
        submitit_parameters(self.options, execution, 1, False)
        setup_lines(self.options.get("setup"))
        self.array_parallelism = _count(self.options, "array_parallelism", "runs of the array at once")
        self._refreshed = float("-inf")

    def parallelism(self, tasks: int) -> int:
        if self.cluster == "debug":
            return 1
        if self.cluster == "local":  # submitit starts every local job at once
            return max(1, tasks)
        return max(1, min(tasks, self.array_parallelism or tasks))

    # ------------------------------------------------------------------------------------- submitting
    def folder(self, tasks: Sequence[RunTask]) -> Path:
        """Where submitit keeps its job files (``%j``: the job id)."""
        given = self.options.get("folder")
        if given:
            return Path(str(given)).expanduser().absolute()
        root = experiment_folder(tasks) / ".submitit"
        if self.cluster == "local":  # a local job's id is its process id, which a later call may get again
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            return root / f"local-{stamp}-{uuid.uuid4().hex[:6]}" / "%j"
        return root / "%j"

    def _submit(self, tasks: Sequence[RunTask], hooks: Hooks) -> tuple[list[Any], Path]:
        """Submit every task as one job array and write their markers; returns the jobs and the folder."""
        import submitit

        folder = self.folder(tasks)
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
        except RuntimeError as exc:  # submitit's SLURM backend looks for srun
            raise ValueError(
                f"--executor slurm: this machine cannot submit SLURM jobs ({exc}). Run the command on the "
                "cluster's login node, or pass --slurm cluster=local to try the setup on this machine."
            ) from None
        gpu = _uses_gpu(tasks) if "gpus_per_node" not in self.options else False
        params = submitit_parameters(self.options, self.execution, tasks[0].threads, gpu)
        executor.update_parameters(**params)
        try:
            jobs = executor.map_array(run_task, list(tasks))
        except Exception as exc:  # noqa: BLE001 - sbatch refused the array: named, with the way out
            raise ValueError(
                f"--executor slurm: submitting the {len(tasks)} runs failed: {type(exc).__name__}: "
                f"{str(exc).strip()}\nCheck the --slurm options (partition, account, qos, time, mem_gb, "
                "gpus_per_node) against what the cluster allows; nothing was submitted."
            ) from None
        submitted = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for task, job in zip(tasks, jobs, strict=True):
            marker = {
                "executor": self.name, "cluster": self.cluster, "job": str(job.job_id),
                "folder": str(folder), "submitted": submitted, "log": str(job.paths.stdout),
            }  # fmt: skip
            if self.cluster != "debug":
                atomic_write_text(queued_marker(Path(task.folder)), json.dumps(marker, indent=1) + "\n")
                link_logs(Path(task.folder), job.paths.stdout, job.paths.stderr)
        hooks.say(self._submitted_line(jobs, params, folder))
        return jobs, folder

    def _submitted_line(self, jobs: Sequence[Any], params: Mapping[str, Any], folder: Path) -> str:
        if self.cluster == "slurm":
            where = f"as SLURM job array {str(jobs[0].job_id).split('_')[0]}"
        elif self.cluster == "local":
            where = "to submitit's local executor (processes on this machine)"
        else:
            where = "to submitit's debug executor (in this process)"
        asked = [f"{params['slurm_partition']} partition"] if "slurm_partition" in params else []
        if self.cluster != "debug":
            asked.append(f"{params['cpus_per_task']} CPU(s)")
            gpus = params.get("gpus_per_node", 0)
            asked.append(f"{gpus} GPU(s)" if gpus else "no GPU: --slurm gpus_per_node=1 asks for one")
            asked.append(f"{params['timeout_min']:g} min")
            asked += [f"{params['mem_gb']:g} GB"] if "mem_gb" in params else []
        each = f" ({', '.join(asked)} each)" if asked else ""
        logs = f"; job files and logs: {folder.parent if folder.name == '%j' else folder}"
        return f"Submitted {len(jobs)} run(s) {where}{each}{logs}"

    # -------------------------------------------------------------------------------------- running
    def run(self, tasks: Sequence[RunTask], hooks: Hooks, stop: StopRequest) -> Outcome:
        """Submit every task as one job array, then follow the jobs (see the module docstring)."""
        if not tasks:
            return Outcome()
        if stop.signum is not None:
            return Outcome(stop.signum, not_started=list(range(len(tasks))))
        jobs, folder = self._submit(tasks, hooks)
        if self.cluster == "debug":
            return self._run_here(jobs, hooks, stop)
        if not self.execution.wait:
            return Outcome(queued=list(range(len(tasks))))
        return self._follow(jobs, tasks, folder, hooks, stop)

    def _run_here(self, jobs: Sequence[Any], hooks: Hooks, stop: StopRequest) -> Outcome:
        """The debug backend: each job's function called in this process, one after the other (submitit's
        own debug jobs would open a debugger on an error)."""
        from ...utils.workers import run_tasks

        return run_tasks(_call, [job.submission() for job in jobs], 1, hooks, stop)

    def _follow(
        self, jobs: Sequence[Any], tasks: Sequence[RunTask], folder: Path, hooks: Hooks, stop: StopRequest
    ) -> Outcome:
        """Report each job's start and end until every job has ended or a stop is requested."""
        started: set[int] = set()
        ended: set[int] = set()
        while len(ended) < len(jobs):
            self._refresh(jobs)
            for i, job in enumerate(jobs):
                if i in ended:
                    continue
                done = job.done()
                if i not in started and (done or self._running(job, tasks[i])):
                    started.add(i)
                    hooks.start(i)
                if done:
                    ended.add(i)
                    self._report(i, job, tasks[i], hooks)
            if len(ended) == len(jobs):
                break
            deadline = time.monotonic() + POLL_SECONDS
            while stop.signum is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if stop.signum is not None:
                return self._stop(jobs, tasks, (started, ended), hooks, stop)
        if self.cluster == "local" and "%j" in folder.name:
            with contextlib.suppress(OSError):  # submitit's local jobs make the pattern's folder, empty
                folder.rmdir()
        return Outcome()

    def _refresh(self, jobs: Sequence[Any]) -> None:
        """Ask SLURM for every job's state every :data:`STATE_REFRESH_SECONDS` (submitit's own polling
        slows down to once in ten minutes)."""
        if self.cluster != "slurm" or time.monotonic() - self._refreshed < STATE_REFRESH_SECONDS:
            return
        self._refreshed = time.monotonic()
        with contextlib.suppress(Exception):
            type(jobs[0]).watcher.update()

    def _running(self, job: Any, task: RunTask) -> bool:
        """Whether the job has started: its run removed its marker, or the scheduler says it runs."""
        if not queued_marker(Path(task.folder)).exists():
            return True
        with contextlib.suppress(Exception):
            return str(job.state).split(" ")[0].upper() in ("RUNNING", "COMPLETING", "FINISHED")
        return False

    def _report(self, i: int, job: Any, task: RunTask, hooks: Hooks) -> None:
        """Hand a finished job's report to the driver: the run's report (a failed run with the job's logs),
        or the job's own error."""
        with contextlib.suppress(OSError):  # a job that never started leaves its marker
            queued_marker(Path(task.folder)).unlink(missing_ok=True)
        try:
            value = job.result()
        except Exception as exc:  # noqa: BLE001 - the job raised, was killed or left no result
            hooks.done(i, None, job_error(job, exc))
            return
        if isinstance(value, tuple) and len(value) == 3 and value[1] == FAILED:
            value = (value[0], FAILED, f"{value[2]}; log: {_log_paths(job)}")
        hooks.done(i, value, None)

    def _stop(
        self,
        jobs: Sequence[Any],
        tasks: Sequence[RunTask],
        seen: tuple[set[int], set[int]],
        hooks: Hooks,
        stop: StopRequest,
    ) -> Outcome:
        """Cancel the jobs that have not ended; wait up to :data:`GRACE_SECONDS` for the running ones."""
        started, ended = seen
        outcome = Outcome(signum=stop.signum)
        flight = [i for i in range(len(jobs)) if i not in ended]
        running = [i for i in flight if i in started]
        outcome.not_started = [i for i in flight if i not in started]
        self._cancel([jobs[i] for i in flight])
        for i in outcome.not_started:  # cancelled before it started: no job is queued for the run now
            with contextlib.suppress(OSError):
                queued_marker(Path(tasks[i].folder)).unlink(missing_ok=True)
        if running:
            hooks.say(
                f"Stopping: cancelled the jobs; waiting up to {GRACE_SECONDS:.0f} s for "
                f"{', '.join(hooks.name(i) for i in running)} to stop at a safe point (Ctrl-C again stops "
                "at once)."
            )
        left = list(running)
        try:
            deadline = time.monotonic() + GRACE_SECONDS
            while left and time.monotonic() < deadline:
                for i in [i for i in left if jobs[i].done()]:
                    left.remove(i)
                    try:
                        value = jobs[i].result()
                    except Exception:  # noqa: BLE001 - stopped on the signal, or killed: resumable
                        outcome.stopped.append(i)
                        continue
                    hooks.done(i, value, None)  # it finished before the signal reached it
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: leave at once
        if left and self.cluster == "local":
            for i in left:
                with contextlib.suppress(Exception):
                    jobs[i].cancel(check=False)  # SIGINT to the job's controller, which kills its process
            outcome.killed = left
            hooks.say(
                f"Killed the jobs of {', '.join(hooks.name(i) for i in left)}: they did not stop in time."
            )
        else:
            outcome.stopped += left  # SLURM kills them after its own grace period
        if not (outcome.stopped or outcome.killed or outcome.not_started):
            return Outcome()  # every job had ended: the stop changed nothing
        return outcome

    def _cancel(self, jobs: Sequence[Any]) -> None:
        """Cancel jobs: SLURM removes a queued job and sends SIGTERM to a running one (one ``scancel`` for
        them all); a local job's controller passes SIGTERM on to its process."""
        if not jobs:
            return
        if self.cluster == "slurm":
            with contextlib.suppress(OSError):
                subprocess.call(["scancel", *[str(job.job_id) for job in jobs]])
            return
        for job in jobs:
            with contextlib.suppress(Exception):
                for pid in _controllers(int(job.job_id)):
                    os.kill(pid, signal.SIGTERM)

    # ---------------------------------------------------------------------------- an earlier call's jobs
    def still_queued(self, marker: Mapping[str, Any]) -> bool:
        """Whether the job a run's marker names still has to run or is running.

        ``slurm``: its result file is absent and SLURM says it is pending, running or requeued (one
        ``sacct`` call for every job of the array, repeated at most every :data:`STATE_REFRESH_SECONDS`);
        a job SLURM does not know yet counts as queued for :data:`QUEUE_LAG_SECONDS` after its submission.
        ``local``: a local job cannot be re-attached once its driver has exited, so the job's controller
        process is looked at: queued while its result file is absent and a process of that id runs
        submitit (Linux: ``/proc``; elsewhere, while a process of that id exists). ``debug``: never.
        """
        from submitit.core.utils import JobPaths

        job_id = str(marker.get("job", ""))
        folder = marker.get("folder")
        if not job_id or not folder or marker.get("cluster", "slurm") not in ("slurm", "local"):
            return False
        if JobPaths(str(folder), job_id=job_id, task_id=0).result_pickle.exists():
            return False
        if marker.get("cluster") == "local":
            return _submitit_process(job_id)
        state = self._slurm_state(job_id)
        if state == "UNKNOWN":
            return _age_seconds(marker.get("submitted")) < QUEUE_LAG_SECONDS
        return state in ACTIVE_STATES

    def _slurm_state(self, job_id: str) -> str:
        """SLURM's state of a job (``UNKNOWN`` when ``sacct`` does not list it, or fails)."""
        from submitit.slurm.slurm import SlurmJob

        watcher = SlurmJob.watcher
        known = watcher.get_info(job_id, mode="cache")  # registers it: the next update asks for it
        if not known or time.monotonic() - self._refreshed > STATE_REFRESH_SECONDS:
            self._refreshed = time.monotonic()
            watcher.update()
        state = watcher.get_state(job_id, mode="cache")
        return (state.split() or ["UNKNOWN"])[0].upper()


def _call(submission: Any) -> Any:
    """Run a submitit submission's function (the debug backend, in this process)."""
    return submission.function(*submission.args, **submission.kwargs)


def _controllers(pid: int) -> list[int]:
    """The process of a local job that passes SIGTERM on to the run: the job's own process, or, when
    ``setup`` lines made it a shell, the submitit controller the shell started (Linux ``/proc``)."""
    proc = Path("/proc") / str(pid)
    try:
        if b"submitit.local._local" in (proc / "cmdline").read_bytes().split(b"\0")[:3]:
            return [pid]
        children = (proc / "task" / str(pid) / "children").read_text().split()
    except OSError:
        return [pid]
    found = []
    for child in children:
        with contextlib.suppress(OSError):
            if b"submitit.local._local" in (Path("/proc") / child / "cmdline").read_bytes():
                found.append(int(child))
    return found or [pid]


def _submitit_process(pid_text: str) -> bool:
    """Whether process ``pid_text`` is alive and runs submitit (a reused id, or a zombie, is not)."""
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # someone else's process: alive, and cannot be looked into
    proc = Path("/proc") / str(pid)
    if not proc.is_dir():
        return True  # no /proc here: alive is all that can be told
    try:
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
        return False
    return b"submitit" in cmdline


def _age_seconds(stamp: Any) -> float:
    """Seconds since an ISO time (infinite when it cannot be read)."""
    try:
        when = datetime.datetime.fromisoformat(str(stamp))
    except ValueError:
        return float("inf")
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return (datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()
