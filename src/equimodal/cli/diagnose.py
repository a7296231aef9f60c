"""``equimodal diagnose``: :func:`equimodal.experiments.diagnose`, its verdict and table printed."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from ..experiments import RunsFailed, diagnose
from ..experiments.diagnosis import Diagnosis
from ..experiments.execution import RunPlan
from ..reporting.folders import DIAGNOSIS
from ..reporting.tables import TERMINAL_LEGEND, diagnosis_table
from .common import (
    add_config,
    add_execution,
    add_set,
    command,
    execution_from_args,
    print_failures,
    print_plan,
)

HELP = "is there modality imbalance, which encoder is under-trained, how much is at stake"
DESCRIPTION = (
    "Train the joint model and each modality's branch alone under the same budget (or read them from a "
    "compare folder with --runs), then report per modality the accuracy alone, the head and probe inside "
    "joint training, the probe deficit, the learning speed and the gradient share, the headroom "
    "(product-rule ensemble minus joint) and a verdict with what to try."
)


def print_diagnosis(console: Console, diag: Diagnosis, written: Path) -> None:
    """The diagnosis on the terminal: wrapped paragraphs and a table within the console's width.

    The Markdown file (``written``) holds the same, with its wide table on one line per modality.
    """
    seeds = f"{diag.seeds} seed{'s' if diag.seeds != 1 else ''}"
    paragraphs = [
        Text(f"Diagnosis: {diag.dataset} ({seeds})", style="bold"),
        Text.assemble(("Verdict. ", "bold"), diag.verdict),
        Text.assemble(("What to try. ", "bold"), diag.recommendation),
        Text(
            f"Joint training {diag.joint:.1f} %, product-rule ensemble of the branches trained alone "
            f"{diag.ensemble:.1f} %, headroom {diag.headroom} pp (paired by seed, Student-t 95 % interval)."
        ),
    ]
    for text in paragraphs:
        console.print(text, overflow="fold")
        console.print()
    console.print(diagnosis_table(asdict(diag)["modalities"]))
    console.print(Text(TERMINAL_LEGEND), overflow="fold")
    console.print(Text(f"Written: {written}, .json and .png"), overflow="fold")


def run(args: argparse.Namespace) -> int:
    """Diagnose and print the verdict; with runs that did not finish, name them and raise."""
    console = Console()
    try:
        result = diagnose(
            config=args.config, overrides=args.set or (), seeds=args.seeds, out=args.out, runs=args.runs,
            execution=execution_from_args(args), overwrite=args.overwrite, console=console,
        )  # fmt: skip
    except RunsFailed as err:
        print_failures(console, err.failures)
        raise
    if isinstance(result, RunPlan):
        return print_plan(console, result)
    print_diagnosis(console, result.diagnosis, result.files["markdown"])
    return 0


def add_parser(sub: Any) -> None:
    """Add ``diagnose`` and its options."""
    dg = command(sub, "diagnose", run, HELP, DESCRIPTION)
    add_config(dg, "a YAML file or preset (default: the built-in mfeat)")
    add_set(dg, "override a config field (repeatable)")
    dg.add_argument("--seeds", type=int, default=3, help="seeds per run (the headroom's interval needs >= 2)")
    dg.add_argument(
        "--out", default="runs/diagnose", help=f"folder of the runs and of {DIAGNOSIS}.md/.json/.png"
    )
    dg.add_argument("--runs", help="read a compare folder (none/, unimodal_<m>/) instead of training")
    add_execution(dg, jobs=1)
