"""``--executor ray``: each run a Ray task on a Ray cluster (``pip install 'equimodal[ray]'``).

Where the runs go (``--ray-address``, ``Execution.ray_address``):

- not given: a Ray cluster on this machine, started for the call and shut down at its end. Its workers
  are told where this process imported ``equimodal`` from (``PYTHONPATH`` in the job's runtime
  environment), so a source checkout on ``sys.path`` works as well as an installed package;
- ``auto``: the cluster this machine is a node of (started with ``ray start``), or ``RAY_ADDRESS``;
- ``HOST:PORT``: the cluster whose head listens there (what ``ray start --head`` prints).

A cluster that was already there is joined as it is: every node must have the same environment as
the driver (equimodal and its dependencies installed, the same Python) and see the output folder at the
same path (a shared filesystem: a task gets its run folder as an absolute path). Nothing is shipped to
the workers. The driver should run on a node of the cluster (``ray://`` client addresses are untested).

Each run is one task asking for ``--threads x --gpus-per-run`` CPUs and, when the cluster has GPUs,
``--gpus-per-run`` GPUs; Ray starts it when a node has them free (Ray sets ``CUDA_VISIBLE_DEVICES`` of
the task to its GPUs) and never retries it. The task is a generator whose first item says that it
started on a worker, so a run is announced when it starts, not when it is queued; then it trains with
:func:`~.base.run_task` (claims, resumes, skips finished runs) and yields its report. A run that
raises, or whose worker dies (out of memory, a lost node), fails with ``Type: message`` and the others
go on. The runs' output (the trainer's log lines) stays in Ray's worker logs (the session's ``logs``
folder on each node), not on the driver's terminal.

SIGINT / SIGTERM: every unfinished task is cancelled. Ray drops the queued ones; in a running one it
calls the Python handler of SIGINT in the worker's main thread, where the task runs: inside ``train``
that is the trainer's stop request, so the run writes ``last.pt`` at its next optimizer step and ends
(``Interrupted``); before ``train`` (loading its config) it is a ``KeyboardInterrupt``, with nothing to
save yet. After :data:`~equimodal.utils.workers.GRACE_SECONDS`
(or at a second Ctrl-C) the tasks still running are force-cancelled (their workers killed): they resume
from their last checkpoint. Ray ends a driver's tasks when the driver ends, so nothing goes on after the
call: ``--no-wait`` is refused for this executor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ...utils.interrupt import Interrupted, StopRequest
from ...utils.workers import GRACE_SECONDS, Hooks, Outcome
from .base import Execution, RunTask, run_task

POLL_SECONDS = 1.0
"""How long the driver waits for the tasks' news before it looks at its stop request again."""

PROBE_SECONDS = 5.0
"""How long the driver waits for the head of a cluster to accept a connection before ``ray.init``."""

STARTED, DONE, STOPPED = "started", "done", "stopped"
"""The items a task yields: it started on a worker; its report; a stop ended its run (with a checkpoint)."""

_CANCELLED, _ENDED, _FAILED, _DIED = "cancelled", "ended", "failed", "died"
"""What the driver reads instead of a task's next item: Ray cancelled it; it ended without a report; it
raised (``Type: message``); its worker or node died."""

NO_EQUIMODAL = (
    " (a Ray worker could not load equimodal's task: every node of the cluster needs this version of "
    "equimodal in the environment its workers run in: install it there, e.g. pip install 'equimodal[ray]', "
    "or start the cluster with a PYTHONPATH that holds it)"
)
"""What a failed import of equimodal on a Ray worker means, and the way out."""


def ray_run(task: RunTask) -> Iterator[tuple[Any, ...]]:
    """The Ray task of one run: ``(STARTED,)`` once it runs on a worker, then ``(DONE, report)``
    with :func:`~.base.run_task`'s report, or ``(STOPPED, signum, message)`` when a signal or a
    cancellation stopped the run (after its checkpoint). A module-level function, imported by the workers."""
    yield (STARTED,)
    try:
        report = run_task(task)
    except Interrupted as stop:
        yield (STOPPED, stop.signum, str(stop))
        return
    yield (DONE, report)


def package_root() -> str:
    """The folder that holds the ``equimodal`` package this process imported (for a local cluster's
    ``PYTHONPATH``)."""
    import equimodal

    return str(Path(equimodal.__file__).resolve().parent.parent)


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Keep this process's SIGINT / SIGTERM handlers across ``ray.init``, which sets its own SIGTERM
    handler (exit at once): the driver's stop request must keep them to stop the runs cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in kept.items():
            if handler is not None:
                signal.signal(s, handler)


class RayExecutor:
    """Ray tasks on a Ray cluster (see the module docstring)."""

    name = "ray"

    def __init__(self, execution: Execution) -> None:
        self.address = execution.ray_address
        self.gpus_per_run = execution.gpus_per_run
        self.threads = execution.run_threads()
        self.grace = GRACE_SECONDS

    # --------------------------------------------------------------------------------------- the cluster
    def parallelism(self, tasks: int) -> int:
        """Runs at once: the cluster's GPUs per run (or its CPUs per run without GPUs), at most ``tasks``;
        ``tasks`` before this process has joined a cluster."""
        import ray

        if not ray.is_initialized():
            return max(1, tasks)
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
        fits = gpus // self.gpus_per_run if gpus else cpus // (self.threads * self.gpus_per_run)
        return max(1, min(tasks, int(fits)))

    def _connect(self) -> bool:
        """Join the cluster (or start a local one); returns whether this call connected (and so ends it).

        Raises:
            ConnectionError: no Ray cluster answers at the address. ValueError: it is no Ray address.
        """
        import ray

        if ray.is_initialized():
            return False
        options: dict[str, Any] = {
            "ignore_reinit_error": True,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        if self.address is None:
            # a cluster of this call: its workers may not share this process's sys.path (a source
            # checkout, a test run), so they are told where equimodal was imported from
            path = os.pathsep.join(p for p in (package_root(), os.environ.get("PYTHONPATH")) if p)
            options.update(
                address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}}
            )
        else:
            _check_reachable(self.address)
            options["address"] = self.address
        with _signal_handlers_kept():
            try:
                ray.init(**options)
            except ConnectionError as exc:
                raise _unreachable(str(self.address), exc) from exc
        return True

    def _resources(self, task: RunTask) -> dict[str, float]:
        """What one task asks Ray for, checked against the cluster's nodes.

        Raises:
            ValueError: no node of the cluster has that many CPUs (or GPUs): Ray would queue it forever.
        """
        import ray

        uses_gpus = ray.cluster_resources().get("GPU", 0.0) > 0
        need = {
            "num_cpus": float(task.threads * task.processes),
            "num_gpus": float(task.processes * uses_gpus),
        }
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        gpus = max((n.get("GPU", 0.0) for n in nodes if n.get("CPU", 0.0) >= need["num_cpus"]), default=0.0)
        if cpus < need["num_cpus"] or gpus < need["num_gpus"]:
            asked = f"{need['num_cpus']:g} CPUs (--threads {task.threads} x --gpus-per-run {task.processes})"
            asked += f" and {need['num_gpus']:g} GPUs" if uses_gpus else ""
            largest = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if uses_gpus else "")
            raise ValueError(
                f"--executor ray: each run asks for {asked} on one node, but the largest node of the Ray "
                f"cluster has {largest}: Ray would keep the runs queued forever. Pass a smaller --threads "
                "(or --gpus-per-run), or add larger nodes to the cluster."
            )
        return need

    # ------------------------------------------------------------------------------------------ the runs
    def run(self, tasks: Sequence[RunTask], hooks: Hooks, stop: StopRequest) -> Outcome:
        """Run every task as a Ray task (see the module docstring); never raises for a run's error.

        Raises:
            ConnectionError: the cluster at ``ray_address`` cannot be joined. ValueError: a run asks for
                more CPUs or GPUs than any node has.
            KeyboardInterrupt: a second Ctrl-C while joining the cluster.
        """
        import ray

        if not tasks:
            return Outcome()
        if stop.signum is not None:
            return Outcome(stop.signum, not_started=list(range(len(tasks))))
        connected = self._connect()
        try:
            if stop.signum is not None:  # a signal while the cluster started
                return Outcome(stop.signum, not_started=list(range(len(tasks))))
            follow = _Follow(ray, hooks, stop)
            try:
                follow.submit(tasks, self._resources(tasks[0]))
                follow.until_done_or_stopped()
                if stop.signum is None:
                    return Outcome()
                outcome = follow.stop(self.grace)
                tried = not (outcome.stopped or outcome.killed or outcome.not_started)
                return Outcome() if tried else outcome  # a stop after the last run ended is none
            finally:
                follow.cancel_all()  # none is left normally; after an unexpected error, none trains on
        finally:
            if connected:
                ray.shutdown()


class _Follow:
    """The tasks of one :meth:`RayExecutor.run` call: submitted, followed, reported, stopped."""

    def __init__(self, ray: Any, hooks: Hooks, stop: StopRequest) -> None:
        self.ray, self.hooks, self.stop_request = ray, hooks, stop
        self.refs: dict[Any, int] = {}  # the unfinished tasks' generators -> task index
        self.started: set[int] = set()
        self.outcome = Outcome()

    def submit(self, tasks: Sequence[RunTask], resources: dict[str, float]) -> None:
        remote = self.ray.remote(ray_run)
        options = {"num_returns": "streaming", "max_retries": 0, **resources}
        for i, task in enumerate(tasks):
            self.refs[remote.options(name=task.name, **options).remote(task)] = i

    def until_done_or_stopped(self) -> None:
        while self.refs and self.stop_request.signum is None:
            self._collect(POLL_SECONDS)

    def stop(self, grace: float) -> Outcome:
        """Cancel every unfinished task (SIGINT in a running one), wait up to ``grace`` seconds for them
        to stop, then force-cancel the rest; returns how the call ended."""
        self.outcome.signum = self.stop_request.signum
        for ref in list(self.refs):
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=False)
        running = [self.hooks.name(i) for i in self.refs.values() if i in self.started]
        if running:
            self.hooks.say(
                f"Stopping: waiting up to {grace:.0f} s for {', '.join(running)} to stop at a safe point "
                "(Ctrl-C again stops at once)."
            )
        deadline = time.monotonic() + grace
        try:
            while self.refs and time.monotonic() < deadline:
                self._collect(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: kill at once
        left = sorted(self.refs.values())
        self.cancel_all()
        self.outcome.killed += [i for i in left if i in self.started]
        self.outcome.not_started += [i for i in left if i not in self.started]
        if self.outcome.killed:
            names = ", ".join(self.hooks.name(i) for i in self.outcome.killed)
            self.hooks.say(
                f"Force-cancelled {names} (their Ray workers were killed): they did not stop in time."
            )
        return self.outcome

    def cancel_all(self) -> None:
        """Force-cancel every unfinished task (its worker is killed) and forget it."""
        for ref in list(self.refs):
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)
        self.refs.clear()

    def _collect(self, timeout: float) -> None:
        """Wait up to ``timeout`` for news of any task, then read every task that has some."""
        refs = list(self.refs)
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            self._record(ref, self._next(ref))

    def _next(self, ref: Any) -> tuple[Any, ...]:
        """The next item of a task whose next item is ready, or what ended it instead."""
        exceptions = self.ray.exceptions
        try:
            return tuple(self.ray.get(next(ref)))
        except StopIteration:  # a cancelled task's last items may be dropped
            return (_ENDED,)
        except exceptions.TaskCancelledError:
            return (_CANCELLED,)
        except exceptions.RayTaskError as exc:  # raised in the task: the error is its cause
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            if isinstance(cause, (exceptions.TaskCancelledError, KeyboardInterrupt)):
                return (_CANCELLED,)
            return (_FAILED, _task_error(cause))
        except exceptions.RayError as exc:  # its worker died, its node was lost, out of memory, ...
            message = f"{type(exc).__name__}: {_first_paragraph(str(exc))}"
            return (_DIED, f"{message} (rerun the same command to retry it)")

    def _record(self, ref: Any, item: tuple[Any, ...]) -> None:
        """Hand one item of task ``ref`` to the driver's hooks. Once a stop is requested, a task that ends
        without its report counts as stopped (it had started) or not started."""
        i, kind = self.refs[ref], item[0]
        if kind == STARTED:
            if i not in self.started:
                self.started.add(i)
                self.hooks.start(i)
            return
        del self.refs[ref]
        if kind == DONE:
            self.hooks.done(i, item[1], None)
        elif kind == _FAILED:
            self.hooks.done(i, None, item[1])
        elif self.stop_request.signum is not None:
            (self.outcome.stopped if i in self.started else self.outcome.not_started).append(i)
        elif kind == STOPPED:  # a signal that reached its worker alone (its node shutting down, ...)
            name = signal.Signals(item[1]).name
            self.hooks.done(
                i, None, f"Interrupted: {name} stopped it on its node, resumable by a rerun ({item[2]})"
            )
        elif kind == _DIED:
            self.hooks.done(i, None, item[1])
        else:
            how = "was cancelled outside this command" if kind == _CANCELLED else "ended without a report"
            self.hooks.done(
                i, None, f"TaskCancelledError: its Ray task {how}; rerun the same command to retry it"
            )


def _check_reachable(address: str) -> None:
    """Fail at once where ``ray.init`` would retry for minutes: the head must accept a connection.

    ``auto`` is resolved as Ray resolves it (``RAY_ADDRESS``, else this machine's latest cluster);
    ``ray://`` client addresses are left to Ray.

    Raises:
        ValueError: ``address`` is not a Ray address. ConnectionError: nothing answers there.
    """
    if address.startswith("ray://"):
        return
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:  # Ray's internals moved: ray.init says what is wrong, in its time
        return
    try:
        target = canonicalize_bootstrap_address_or_die(address)
    except ValueError as exc:
        raise ValueError(
            f"--ray-address {address!r} is not a Ray address ({exc}): expected HOST:PORT (what `ray start "
            "--head` prints), auto on a node of a running cluster, or no --ray-address for a Ray cluster "
            "started on this machine for the command."
        ) from None
    except ConnectionError as exc:
        raise _unreachable(address, exc) from None
    except Exception:  # noqa: BLE001 - a private helper of Ray: on any surprise, leave it to ray.init
        return
    host, _, port = str(target).rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except (OSError, ValueError) as exc:
        raise _unreachable(address, f"nothing answers at {target}: {exc}") from None


def _unreachable(address: str, reason: object) -> ConnectionError:
    """The error of a cluster that could not be joined, with the ways out."""
    cause = str(getattr(reason, "__cause__", None) or "")
    if "InvalidAuthToken" in cause or "AuthenticationError" in cause:
        how = (
            "The cluster asks for a token (Ray's token authentication): set RAY_AUTH_MODE=token and give "
            "this process the cluster's token (RAY_AUTH_TOKEN, or Ray's token file), as Ray's token "
            "authentication guide says."
        )
    else:
        how = (
            "Start one with `ray start --head` on its head node and pass the address it prints (HOST:PORT), "
            "pass auto on a node of a running cluster, or drop --ray-address to use a Ray cluster started "
            "on this machine for the command."
        )
    return ConnectionError(f"--ray-address {address}: no Ray cluster could be joined there ({reason}). {how}")


def _first_paragraph(text: str) -> str:
    """An error message up to its first blank line (Ray's messages go on with advice and log paths)."""
    return text.strip().split("\n\n", 1)[0].strip()


def _task_error(error: BaseException) -> str:
    """``Type: message`` of an error raised in a Ray task; a worker that could not load the task (its node
    lacks this equimodal) is named with the way out instead of Ray's listing of the worker's sys.path."""
    text = str(error).strip()
    if isinstance(error, RuntimeError) and text.startswith("The remote function failed to import"):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f"{lines[-1]}{NO_EQUIMODAL}"  # the traceback's last line: the import error itself
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "equimodal":
        return f"{type(error).__name__}: {text}{NO_EQUIMODAL}"
    return f"{type(error).__name__}: {_first_paragraph(text)}"
