"""Tasks run in worker processes that one signal stops: the pool under ``compare``, ``study``,
``diagnose`` and ``prepare``.

:func:`run_tasks` runs ``fn(task)`` for every task, in the calling process (``workers=1``) or in
``workers`` ``spawn`` processes that each take one task at a time; the caller polls their reports every
:data:`POLL_SECONDS`. It runs under the caller's :func:`~equimodal.utils.interrupt.stop_signals` request:

- The first SIGINT / SIGTERM dispatches nothing more and sends SIGTERM (never SIGINT: the trainer reads
  a second SIGINT as "stop at once") to every worker. A worker inside ``train`` writes its checkpoint at
  the next optimizer step and reports :class:`~equimodal.utils.interrupt.Interrupted`; elsewhere SIGTERM
  aborts its task (:class:`WorkerStop`; atomic writes remove their temporary files). The caller waits up
  to :data:`GRACE_SECONDS` for their reports, then SIGKILLs what is left; a second Ctrl-C kills at once.
- Workers ignore SIGINT outside ``train`` (a terminal's Ctrl-C reaches the whole process group; the
  driver decides), and on Linux they get SIGTERM when the driver dies, even by SIGKILL, so none trains on.
- A worker that dies without reporting (an out-of-memory kill) fails its task, named, and is replaced.

With ``workers=1`` a task runs in the calling process: an ``Interrupted`` it raises stops the loop, and
a signal that arrives between two tasks stops it before the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from .interrupt import Interrupted, StopRequest

GRACE_SECONDS = 30.0
"""How long a stop waits for the tasks in flight to reach a safe point before it kills their workers."""

POLL_SECONDS = 0.2
"""How often the driver looks at its stop request while it waits for reports."""

_PR_SET_PDEATHSIG = 1


class WorkerStop(BaseException):
    """Raised in a worker by SIGTERM outside ``train``: abort the task (not an ``Exception``, so the task's
    own error handling does not report it as a failure)."""


@dataclass(frozen=True)
class Hooks:
    """What the caller is told: a task starts, a task ends (its value or an error), a message to show."""

    start: Callable[[int], None]
    done: Callable[[int, Any, str | None], None]
    say: Callable[[str], None]
    name: Callable[[int], str] = str


@dataclass
class Outcome:
    """How :func:`run_tasks` ended: ``signum`` is None when every task was tried.

    Attributes:
        signum: the signal that stopped it, or None.
        stopped: tasks in flight that stopped at a safe point (a trainer: with its checkpoint).
        killed: tasks in flight whose worker was still running after the grace period (SIGKILLed).
        not_started: tasks never dispatched.
        queued: tasks handed to a scheduler that go on after the call (an executor told not to wait).
    """

    signum: int | None = None
    stopped: list[int] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    not_started: list[int] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    workers: int,
    hooks: Hooks,
    stop: StopRequest,
    grace: float = GRACE_SECONDS,
    slots: Sequence[dict[str, str]] | None = None,
) -> Outcome:
    """Run ``fn(task)`` for every task (see the module docstring); never raises for a task's error.

    Args:
        fn: a module-level function (it is sent to the worker processes).
        tasks: picklable arguments, one per call.
        workers: processes; 1 runs every task in this process.
        hooks: the caller's callbacks (``done`` gets ``(index, value, None)`` or ``(index, None, error)``).
        stop: the request set by the caller's :func:`~equimodal.utils.interrupt.stop_signals`.
        grace: seconds a stop waits for the tasks in flight before it kills their workers.
        slots: one environment per worker (e.g. ``{"CUDA_VISIBLE_DEVICES": "1"}``), set in that worker
            before its first task; their number is the number of workers (``workers`` is then ignored). A
            worker that dies is replaced in its slot.

    Raises:
        KeyboardInterrupt: a second Ctrl-C while one task runs in this process.
    """
    if slots is None and (workers <= 1 or stop.signum is not None):
        return _run_here(fn, tasks, hooks, stop)
    if stop.signum is not None:
        return Outcome(stop.signum, not_started=list(range(len(tasks))))
    envs = list(slots) if slots is not None else [{}] * workers
    pool, outcome = _Pool(fn, envs[: len(tasks)]), Outcome()
    try:
        _run_pool(pool, tasks, hooks, stop, outcome)
        if stop.signum is None:
            pool.close()
            return outcome
        outcome.signum = stop.signum
        _stop_pool(pool, hooks, stop, outcome, grace)
        tried = not (outcome.stopped or outcome.killed or outcome.not_started)
        return Outcome() if tried else outcome  # as in this process: a stop after the last task is none
    finally:
        pool.kill()  # normally none is left; after an unexpected error, no worker outlives the driver


def _run_here(fn: Callable[[Any], Any], tasks: Sequence[Any], hooks: Hooks, stop: StopRequest) -> Outcome:
    """Every task in this process; a stop request is honoured before each task and inside ``train``."""
    for i, task in enumerate(tasks):
        if stop.signum is not None:
            return Outcome(stop.signum, not_started=list(range(i, len(tasks))))
        hooks.start(i)
        kind, *rest = _attempt(fn, task)
        if kind == "stopped":
            return Outcome(stop.signum or rest[0], stopped=[i], not_started=list(range(i + 1, len(tasks))))
        hooks.done(i, rest[0] if kind == "done" else None, rest[0] if kind == "error" else None)
    return Outcome()  # every task was tried (a stop that came during the last one changes nothing)


def _attempt(fn: Callable[[Any], Any], task: Any) -> tuple[Any, ...]:
    """``("done", value)``, ``("error", message)`` or ``("stopped", signum, message)``."""
    try:
        return ("done", fn(task))
    except Interrupted as exc:
        return ("stopped", exc.signum, str(exc))
    except Exception as exc:  # noqa: BLE001 - one task's failure stops nothing
        return ("error", f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------- the worker side
def _raise_stop(_signum: int, _frame: Any) -> None:
    raise WorkerStop


def _die_with_parent(parent: int) -> None:
    """Ask Linux to send SIGTERM when the driver dies (a no-op elsewhere); exit if it is already gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        raise WorkerStop


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    """Send a report whole: SIGTERM waits until it is written (a half-written message would be garbage)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        conn.send(message)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _worker(fn: Callable[[Any], Any], conn: Connection, parent: int, env: dict[str, str]) -> None:
    """A worker's life: one task at a time until the driver sends None, closes, dies or signals."""
    os.environ.update(env)  # its slot (a GPU of its own): set before any task initialises CUDA
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        _die_with_parent(parent)
        while (task := conn.recv()) is not None:
            report = _attempt(fn, task)
            _send(conn, report)
            if report[0] == "stopped":
                break  # the signal was meant to end this process
    except (WorkerStop, KeyboardInterrupt):
        with contextlib.suppress(Exception, WorkerStop):
            _send(conn, ("stopped", int(signal.SIGTERM), "aborted"))
    except (EOFError, OSError):
        pass  # the driver is gone
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a late SIGTERM ends the exit quietly
        with contextlib.suppress(OSError):
            conn.close()
    _exit_now()


def _exit_now() -> None:
    """Leave at once once every report is sent: the interpreter's teardown (seconds with torch loaded
    on a busy machine) would only delay the driver, which waits for the process to end."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------- the driver side
@dataclass
class _Worker:
    process: Any
    conn: Connection
    slot: int
    task: int | None = None
    eof: bool = False


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a worker is created, so that it starts ignoring it (a Ctrl-C during its
    start-up would otherwise print a traceback); a Ctrl-C in these few milliseconds reaches the workers
    in ``train``, whose report stops the driver too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Pool:
    """The worker processes and their pipes (one task at a time each), one per slot (its environment)."""

    def __init__(self, fn: Callable[[Any], Any], envs: Sequence[dict[str, str]]) -> None:
        self.fn, self.envs, self.ctx = fn, list(envs), mp.get_context("spawn")
        self.size = len(self.envs)
        self.workers: list[_Worker] = []
        for _ in range(self.size):
            self.add()

    def add(self) -> None:
        """Start one worker in a free slot."""
        taken = {w.slot for w in self.workers}
        slot = next(k for k in range(self.size) if k not in taken)
        ours, theirs = self.ctx.Pipe()
        process = self.ctx.Process(
            target=_worker, args=(self.fn, theirs, os.getpid(), self.envs[slot]), name="equimodal-worker"
        )
        with _sigint_ignored():
            process.start()
        theirs.close()
        self.workers.append(_Worker(process, ours, slot))

    def idle(self) -> list[_Worker]:
        return [w for w in self.workers if w.task is None and not w.eof]

    def busy(self) -> list[_Worker]:
        return [w for w in self.workers if w.task is not None]

    def dispatch(self, worker: _Worker, index: int, task: Any) -> None:
        worker.task = index
        try:
            worker.conn.send(task)
        except OSError:
            worker.eof = True  # it died: collect() reports its task

    def collect(self, timeout: float) -> list[tuple[int, tuple[Any, ...]]]:
        """Wait up to ``timeout`` for reports; returns ``(task, report)`` pairs, a dead worker's task as
        ``("died", exit code)``. Dead workers leave the pool."""
        handles: dict[Any, _Worker] = {w.process.sentinel: w for w in self.workers}
        handles.update({w.conn: w for w in self.workers if not w.eof})
        events: list[tuple[int, tuple[Any, ...]]] = []
        for worker in {id(handles[h]): handles[h] for h in wait(list(handles), timeout)}.values():
            events += self._drain(worker)
        return events

    def _drain(self, worker: _Worker) -> list[tuple[int, tuple[Any, ...]]]:
        events = []
        try:
            while not worker.eof and worker.conn.poll():
                report = worker.conn.recv()
                if worker.task is not None:
                    events.append((worker.task, report))
                worker.task = None
        except Exception:  # noqa: BLE001 - EOF, or a message cut off by a kill: the worker is gone
            worker.eof = True
        if worker.eof or not worker.process.is_alive():
            worker.process.join(timeout=1.0)
            if worker.process.exitcode is not None:
                if worker.task is not None:
                    events.append((worker.task, ("died", worker.process.exitcode)))
                self.workers.remove(worker)
                worker.conn.close()
        return events

    def terminate(self) -> None:
        """SIGTERM to every worker."""
        for w in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.process.pid, signal.SIGTERM)

    def kill(self) -> list[int]:
        """SIGKILL every worker still there; returns the tasks they held."""
        held = [w.task for w in self.workers if w.task is not None]
        for w in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.process.pid, signal.SIGKILL)
            w.process.join()
            w.conn.close()
        self.workers.clear()
        return held

    def close(self) -> None:
        """Tell idle workers to exit and wait for them."""
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
        for w in self.workers:
            w.process.join(timeout=10.0)


def _died(code: int | None) -> str:
    how = f"was killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
    note = " (out of memory?)" if code == -signal.SIGKILL else ""
    return f"its worker process {how}{note} before reporting; rerun the same command to retry it"


def _record(index: int, report: tuple[Any, ...], hooks: Hooks, stop: StopRequest, outcome: Outcome) -> None:
    """Hand one report to the caller; once a stop is requested, a stopped or dead task counts as stopped."""
    kind = report[0]
    if kind == "stopped" and report[1] == signal.SIGINT and stop.signum is None:
        stop.signum = int(signal.SIGINT)  # a Ctrl-C reached the group while the driver ignored SIGINT
    if kind in ("stopped", "died") and stop.signum is not None:
        outcome.stopped.append(index)
    elif kind == "done":
        hooks.done(index, report[1], None)
    elif kind == "error":
        hooks.done(index, None, report[1])
    elif kind == "died":
        hooks.done(index, None, _died(report[1]))
    else:  # a SIGTERM sent to this worker alone
        hooks.done(index, None, f"{signal.Signals(report[1]).name} stopped its worker: {report[2]}")


def _run_pool(pool: _Pool, tasks: Sequence[Any], hooks: Hooks, stop: StopRequest, outcome: Outcome) -> None:
    """Dispatch and collect until every task was tried or a stop is requested; dead workers are replaced."""
    pending = deque(range(len(tasks)))
    while stop.signum is None and (pending or pool.busy()):
        for worker in pool.idle():
            if not pending or stop.signum is not None:
                break
            index = pending.popleft()
            hooks.start(index)
            pool.dispatch(worker, index, tasks[index])
        for index, report in pool.collect(POLL_SECONDS):
            _record(index, report, hooks, stop, outcome)
        while stop.signum is None and len(pool.workers) < min(pool.size, len(pending) + len(pool.busy())):
            pool.add()
    outcome.not_started = list(pending)


def _stop_pool(pool: _Pool, hooks: Hooks, stop: StopRequest, outcome: Outcome, grace: float) -> None:
    """SIGTERM every worker, collect their reports for up to ``grace`` seconds, then SIGKILL the rest."""
    pool.terminate()
    try:
        flight = [hooks.name(w.task) for w in pool.busy() if w.task is not None]
        if flight:
            hooks.say(
                f"Stopping: waiting up to {grace:.0f} s for {', '.join(flight)} to stop at a safe point "
                "(Ctrl-C again stops at once)."
            )
        deadline = time.monotonic() + grace
        while pool.workers and time.monotonic() < deadline:
            for index, report in pool.collect(POLL_SECONDS):
                _record(index, report, hooks, stop, outcome)
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: kill at once
    outcome.killed = pool.kill()
    if outcome.killed:
        names = ", ".join(hooks.name(i) for i in outcome.killed)
        hooks.say(f"Killed the workers of {names}: they did not stop in time.")
