"""``--executor local``: worker processes on this machine, each run placed on a device of its own.

Without ``--devices`` it is the pool of :mod:`equimodal.utils.workers` with ``--jobs`` processes (1: in
the calling process). With ``--devices cuda:0,cuda:1`` (or ``all``: every visible GPU) each device gets
``--per-device`` worker slots; a worker sees only its device (``CUDA_VISIBLE_DEVICES`` is set in it
before its first task), so a config's ``train.device: auto`` or ``cuda`` trains on that device and the
runs' configs do not depend on where they ran.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ...utils.interrupt import StopRequest
from ...utils.workers import Hooks, Outcome, run_tasks
from .base import Execution, RunTask, run_task, visible_gpus


def device_slots(devices: Sequence[str], per_device: int, per_run: int = 1) -> list[dict[str, str]]:
    """One environment per worker: ``per_device`` slots per device, each seeing only its GPU; with
    ``per_run`` > 1 (``--gpus-per-run``) consecutive devices are grouped, a slot seeing its group (the
    run's torchrun processes take one GPU each).

    ``devices`` holds ``cuda:<k>`` (or ``<k>``) names, or ``all``; the index is the one among the GPUs
    this process sees (``CUDA_VISIBLE_DEVICES`` of the driver, if set, is honoured).

    Raises:
        ValueError: a name that is not a CUDA device, ``all`` on a machine without GPUs, or a number of
            devices that is not a multiple of ``per_run``.
    """
    names = list(devices)
    if names == ["all"]:
        names = visible_gpus()
        if not names:
            raise ValueError(
                "--devices all: this machine shows no CUDA GPU (torch.cuda.is_available() is False). Drop "
                "--devices to train on the CPU with --jobs processes."
            )
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [v.strip() for v in parent.split(",")] if parent else None
    indices: list[str] = []
    for name in names:
        index = name.removeprefix("cuda:")
        if not index.isdigit():
            raise ValueError(
                f"--devices {','.join(devices)}: {name!r} is not a CUDA device; expected a list such as "
                "cuda:0,cuda:1 (or all). Runs on the CPU need no --devices: pass --jobs N."
            )
        if visible is not None:
            if int(index) >= len(visible):
                raise ValueError(
                    f"--devices: {name} does not exist here: CUDA_VISIBLE_DEVICES={parent} shows "
                    f"{len(visible)} GPU(s), cuda:0 to cuda:{len(visible) - 1}."
                )
            index = visible[int(index)]
        indices.append(index)
    if len(indices) % per_run:
        raise ValueError(
            f"--gpus-per-run {per_run} groups the {len(indices)} device(s) of --devices into runs of {per_run} "
            f"GPUs, and {len(indices)} is not a multiple of {per_run}: pass a multiple of {per_run} devices."
        )
    groups = [",".join(indices[k : k + per_run]) for k in range(0, len(indices), per_run)]
    return [{"CUDA_VISIBLE_DEVICES": group} for group in groups for _ in range(per_device)]


class LocalExecutor:
    """Processes on this machine (see the module docstring)."""

    name = "local"

    def __init__(self, execution: Execution) -> None:
        self.jobs = execution.jobs
        self.slots = (
            device_slots(execution.devices, execution.per_device, execution.gpus_per_run)
            if execution.devices
            else None
        )

    def parallelism(self, tasks: int) -> int:
        return max(1, min(tasks, len(self.slots) if self.slots is not None else self.jobs))

    def run(self, tasks: Sequence[RunTask], hooks: Hooks, stop: StopRequest) -> Outcome:
        return run_tasks(run_task, tasks, self.jobs, hooks, stop, slots=self.slots)
