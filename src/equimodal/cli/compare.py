"""``equimodal compare``: :func:`equimodal.experiments.compare`, its compact table printed."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from ..engine.preflight import PLOTS_INSTALL
from ..experiments import ComparisonResult, compare
from ..experiments.execution import RunPlan
from ..registry import name_list
from ..reporting.tables import results_table, table_notes
from . import common
from .common import add_config, add_execution, add_set, command, print_failures

HELP = "run several balancers x seeds and tabulate mean +/- std"


def print_results(console: Console, result: ComparisonResult) -> None:
    """Print the compact table, its notes, and where the full tables are."""
    console.print(results_table(result.rows, result.title, result.seeds))
    for note in table_notes(result.rows):
        console.print(note, highlight=False, markup=False)
    files = result.files
    plot = f"; plot: {files['figure']}" if "figure" in files else f"; no plot ({PLOTS_INSTALL} to draw it)"
    console.print(
        "Full table (macro-F1, per-modality unimodal and probe accuracy, imbalance, time/epoch): "
        f"{files['markdown']}, {files['csv']}{plot}",
        highlight=False,
        markup=False,
    )


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print its table; exit code 1 when runs failed."""
    console = Console()
    result = compare(
        config=args.config, dataset=args.dataset, seeds=args.seeds, out=args.out,
        balancers=name_list(args.balancers), execution=common.execution_from_args(args),
        overwrite=args.overwrite, references=not args.no_references, variants=args.variant or (),
        overrides=args.set or (), console=console,
    )  # fmt: skip
    if isinstance(result, RunPlan):
        return common.print_plan(console, result)
    print_results(console, result)
    return print_failures(console, result.failures)


def add_parser(sub: Any) -> None:
    """Add ``compare`` and its options."""
    c = command(sub, "compare", run, HELP)
    add_config(c, "base YAML file or preset")
    c.add_argument(
        "--dataset",
        help="dataset name: alone, its shipped preset (the recipe `equimodal train NAME` runs) when there is "
        "one, else the default config with data.name=NAME; with CONFIG, CONFIG with data.name=NAME",
    )
    c.add_argument("--balancers", default="none,amss,amss_plus", help="comma-separated balancer names")
    c.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    add_set(c, "override for every run (repeatable)")
    c.add_argument("--out", default="runs/compare", help="folder for the runs and the tables")
    c.add_argument("--no-references", action="store_true", help="skip unimodal/ensemble/Adam reference rows")
    c.add_argument(
        "--variant",
        action="append",
        metavar="LABEL:KEY=VALUE,...",
        help="an extra row with its own overrides, e.g. amss_T1:balancer.name=amss,balancer.options.temperature=1",
    )
    add_execution(c, jobs=1)
