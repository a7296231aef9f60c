"""What the command modules share: building a sub-command, the options several commands take, and
printing the runs that failed."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console

from ..experiments import RunFailure

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
    """The options of the commands that train many runs (compare, study, diagnose)."""
    parser.add_argument("--jobs", type=int, default=jobs, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--overwrite", action="store_true", help="retrain runs in OUT that hold another config"
    )


def print_failures(console: Console, failures: Sequence[RunFailure]) -> int:
    """Print the failed runs (and how to retry them); returns the exit code (1 if any failed)."""
    if not failures:
        return 0
    console.print(f"[bold red]{len(failures)} run(s) failed[/] (rerun the same command to retry them):")
    for folder, error in failures:
        console.print(f"  {folder}: {error}")
    return 1
