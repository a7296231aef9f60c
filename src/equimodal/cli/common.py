"""What the command modules share: building a sub-command, the options several commands take, and
printing the runs that failed."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console

from ..experiments import RunFailure
from ..experiments.execution import RunPlan
from ..experiments.executors import EXECUTORS, Execution
from ..experiments.executors.slurm_options import SLURM_KEYS

SET_HELP = "override, e.g. optim.lr=0.01 (repeatable)"
CONFIG_HELP = "a YAML file or a shipped preset name (see `equimodal list presets`)"


def command(
    sub: Any, name: str, run: Callable[[argparse.Namespace], int], help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """Add the sub-command ``name`` whose arguments go to ``run`` (it returns the exit code)."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.set_defaults(func=run)
    return parser


def add_config(parser: argparse.ArgumentParser, help: str = CONFIG_HELP) -> None:
    """The optional ``config`` positional argument (a YAML file or a shipped preset)."""
    parser.add_argument("config", nargs="?", help=help)


def add_set(parser: argparse.ArgumentParser, help: str = SET_HELP) -> None:
    """The repeatable ``--set KEY=VALUE`` option."""
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=help)


def add_execution(parser: argparse.ArgumentParser, jobs: int) -> None:
    """The options of the commands that train many runs (compare, study, diagnose): where the runs are
    trained (``--executor`` and its placement), a dry run, and ``--overwrite``."""
    g = parser.add_argument_group("where the runs are trained")
    g.add_argument(
        "--executor", default="local", choices=EXECUTORS,
        help="local: processes on this machine; slurm: a job array through submitit; ray: Ray tasks",
    )  # fmt: skip
    g.add_argument(
        "--jobs", type=int, default=jobs, metavar="N", help="runs in parallel on this machine (processes)"
    )
    g.add_argument(
        "--threads",
        type=_threads,
        default=1,
        metavar="N",
        help="torch threads per run, or auto (cores / runs)",
    )
    g.add_argument(
        "--devices", metavar="LIST",
        help="place the runs on these GPUs, one slot each (cuda:0,cuda:1 or all); local only",
    )  # fmt: skip
    g.add_argument(
        "--per-device", type=int, default=1, metavar="N", help="runs at once on each device of --devices"
    )
    g.add_argument(
        "--gpus-per-run", type=int, default=1, metavar="N",
        help="GPUs of each run; above 1 launched through torchrun",
    )  # fmt: skip
    g.add_argument(
        "--slurm", action="append", metavar="KEY=VALUE",
        help="a SLURM parameter for submitit, e.g. partition=gpu time=120 (minutes) mem_gb=32; keys: "
        f"{', '.join(SLURM_KEYS)} (cluster=local tries it on this machine); repeatable",
    )  # fmt: skip
    g.add_argument(
        "--slurm-config", metavar="FILE", help="a YAML file of SLURM parameters (the --slurm keys; flags win)"
    )
    g.add_argument(
        "--ray-address", metavar="ADDRESS",
        help="the Ray cluster to join (default: a local one; auto: this node's)",
    )  # fmt: skip
    g.add_argument(
        "--no-wait", action="store_true",
        help="submit the runs and return (slurm); rerun the same command to follow them and write the tables",
    )  # fmt: skip
    g.add_argument(
        "--dry-run", action="store_true",
        help="list the runs to train, finished and held elsewhere, with a time estimate; train nothing",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="retrain runs in OUT that hold another config"
    )


def _threads(text: str) -> int | str:
    """``--threads``: a whole number, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or auto, found {text!r}") from None


def execution_from_args(args: argparse.Namespace) -> Execution:
    """The :class:`~equimodal.experiments.executors.Execution` the options of :func:`add_execution` ask for.

    Raises:
        ValueError: a malformed ``--slurm`` pair, or a ``--slurm-config`` that is not a mapping.
    """
    from ..experiments.executors.slurm_options import slurm_options

    devices = tuple(d.strip() for d in args.devices.split(",") if d.strip()) if args.devices else ()
    return Execution(
        executor=args.executor, jobs=args.jobs, threads=args.threads, devices=devices,
        per_device=args.per_device, gpus_per_run=args.gpus_per_run, wait=not args.no_wait,
        dry_run=args.dry_run, slurm=slurm_options(args.slurm_config, args.slurm or ()),
        ray_address=args.ray_address,
    ).checked()  # fmt: skip


def print_plan(console: Console, plan: RunPlan) -> int:
    """Print where the runs stand (a dry run, or runs left in flight); returns the exit code 0."""
    console.print(plan.describe(), highlight=False, markup=False)
    return 0


def print_failures(console: Console, failures: Sequence[RunFailure]) -> int:
    """Print the failed runs (and how to retry them); returns the exit code (1 if any failed)."""
    if not failures:
        return 0
    console.print(f"[bold red]{len(failures)} run(s) failed[/] (rerun the same command to retry them):")
    for folder, error in failures:
        console.print(f"  {folder}: {error}")
    return 1
