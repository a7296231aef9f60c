"""Where an experiment's runs are trained: this machine, a SLURM cluster or a Ray cluster.

``compare``, ``study`` and ``diagnose`` hand their missing runs to an executor (``--executor``, or
``execution=Execution(...)`` in Python):

- ``local`` (:mod:`.local`): worker processes on this machine, placed on its GPUs with ``--devices``;
- ``slurm`` (:mod:`.slurm`): a SLURM job array through ``submitit`` (``pip install 'equimodal[slurm]'``);
- ``ray`` (:mod:`.ray_cluster`): Ray tasks on a cluster (``pip install 'equimodal[ray]'``).

Every executor runs the same task function (:func:`~.base.run_task`): a run folder is claimed before
training (:mod:`equimodal.utils.claim`), so two drivers, two workers or two machines never train the
same run, and a run held by another live process is left to it and waited for.
"""

from __future__ import annotations

from .base import CLAIMED, DONE, EXECUTORS, FAILED, FINISHED, Execution, Executor, RunTask, run_task

SLURM_INSTALL = "pip install 'equimodal[slurm]'"
RAY_INSTALL = "pip install 'equimodal[ray]'"


def get_executor(execution: Execution) -> Executor:
    """The executor ``execution`` names, built.

    Raises:
        ModuleNotFoundError: its engine is not installed (the message names the install command).
        ValueError: a placement or a scheduler option that cannot be used.
    """
    if execution.executor == "local":
        from .local import LocalExecutor

        return LocalExecutor(execution)
    if execution.executor == "slurm":
        _require("submitit", "slurm", SLURM_INSTALL)
        from .slurm import SlurmExecutor

        return SlurmExecutor(execution)
    _require("ray", "ray", RAY_INSTALL)
    from .ray_cluster import RayExecutor

    return RayExecutor(execution)


def _require(module: str, executor: str, install: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(
            f"--executor {executor} needs the {module!r} package, which is not installed: {install} (in "
            "the environment every node uses), or pass --executor local.",
            name=module,
        )


__all__ = [
    "CLAIMED",
    "DONE",
    "EXECUTORS",
    "FAILED",
    "FINISHED",
    "RAY_INSTALL",
    "SLURM_INSTALL",
    "Execution",
    "Executor",
    "RunTask",
    "get_executor",
    "run_task",
]
