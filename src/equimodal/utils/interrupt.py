"""Stopping a run cleanly on SIGINT / SIGTERM: a request the trainer honours at a step boundary.

The first SIGINT or SIGTERM sets a :class:`StopRequest`; the trainer sees it after the current optimizer
step, writes ``last.pt`` (mid-epoch) and raises :class:`Interrupted`, which the CLI turns into exit code
``128 + signal`` with a line saying how to resume. A second SIGINT interrupts at once (``KeyboardInterrupt``).
A :func:`stop_signals` block inside another (a trainer inside a driver's loop of runs) shares the outer
block's request: a stop asked for before the trainer started holds, and one asked for while it ran
reaches the driver too. Outside any block, :func:`terminate_raises` turns SIGTERM into
:class:`Terminated`, as SIGINT raises ``KeyboardInterrupt``, so the CLI can exit 143 after cleaning up.

Under DDP every process must stop at the same step, so the request is all-reduced; to keep that
collective (and its host sync) off most steps it is read every :data:`DDP_CHECK_EVERY` optimizer steps
there (every step in a single process, where it is a plain Python flag).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

DDP_CHECK_EVERY = 10
"""Under DDP, the stop request is all-reduced every this many optimizer steps."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run between two optimizer steps (a checkpoint was written)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """Set by SIGINT / SIGTERM (see :func:`stop_signals`); the trainer stops at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def requested(self, step: int, world: int, device: torch.device) -> bool:
        """Whether to stop after optimizer step ``step`` (any process signalled; all ranks agree)."""
        flag = self.signum is not None
        if world > 1:
            if step % DDP_CHECK_EVERY:
                return False
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.signum is None:
                self.signum = int(signal.SIGTERM)  # another process was signalled
        return flag

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"


class Terminated(BaseException):
    """SIGTERM outside a :func:`stop_signals` block (see :func:`terminate_raises`)."""

    signum = int(signal.SIGTERM)


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM (not an ``Exception``: no ``except Exception`` swallows it).

    Outside the main thread (where handlers cannot be set) SIGTERM keeps its handler.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(_signum: int, _frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Turn the first SIGINT / SIGTERM into a stop request (a second SIGINT interrupts at once).

    Inside another ``stop_signals`` block the outer request is shared (see the module docstring).
    Outside the main thread (where handlers cannot be set) the request is never set.
    """
    if threading.current_thread() is not threading.main_thread():
        yield StopRequest()
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    outer = getattr(previous[signal.SIGTERM], "stop_request", None)
    request = outer if isinstance(outer, StopRequest) else StopRequest()

    def handle(signum: int, _frame: Any) -> None:
        if request.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.signum = signum

    handle.stop_request = request  # type: ignore[attr-defined]
    for s in previous:
        signal.signal(s, handle)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
