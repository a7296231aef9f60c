"""``equimodal study``: :func:`equimodal.experiments.study`, its tables printed."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from ..experiments import study
from ..experiments.execution import RunPlan
from ..reporting.folders import STUDY_JSON
from .common import add_execution, command, execution_from_args, print_failures, print_plan

HELP = "run a documented grid that checks one claim (see `equimodal list studies`)"
DESCRIPTION = (
    "Run a study preset: its parts' rows x columns x seeds (resumable, paired by seed), then write "
    f"NAME.md, NAME.csv, NAME.png and {STUDY_JSON}. Quick by default (minutes on 2 cores); --full runs the "
    "full grid."
)


def run(args: argparse.Namespace) -> int:
    """Run the study, print its Markdown; exit code 1 when runs failed."""
    console = Console()
    result = study(
        name=args.name, full=args.full, out=args.out, docs=args.docs, execution=execution_from_args(args),
        overwrite=args.overwrite, console=console,
    )  # fmt: skip
    if isinstance(result, RunPlan):
        return print_plan(console, result)
    console.print(result.markdown, highlight=False, markup=False, soft_wrap=True)
    return print_failures(console, result.failures)


def add_parser(sub: Any) -> None:
    """Add ``study`` and its options."""
    st = command(sub, "study", run, HELP, DESCRIPTION)
    st.add_argument(
        "name",
        help="a shipped study (fusions, backbones, update_ratio, mask_units, modalities) or a YAML file",
    )
    st.add_argument("--full", action="store_true", help="the full grid (more seeds and epochs)")
    st.add_argument("--out", help="folder of the runs and tables (default runs/studies/NAME[_full])")
    st.add_argument("--docs", help="also copy NAME.md, .png and .csv into this folder (e.g. docs/studies)")
    add_execution(st, jobs=2)
