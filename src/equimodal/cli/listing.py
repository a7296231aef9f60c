"""``equimodal list``: the registered names of one kind, one per line (a balancer's alias follows the
names, with what it builds after it)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import command

HELP = "list registered names"
KINDS = ("balancers", "datasets", "models", "fusions", "presets", "studies")


def run(args: argparse.Namespace) -> int:
    """Print the names of ``args.what``."""
    from ..balancers import list_balancers
    from ..balancers.registry import BALANCERS
    from ..data import list_datasets
    from ..engine.config import list_presets
    from ..experiments.studies import list_studies
    from ..models import list_fusions
    from ..models.encoders import list_encoders

    what = {
        "balancers": list_balancers,
        "datasets": list_datasets,
        "models": list_encoders,
        "fusions": list_fusions,
        "presets": list_presets,
        "studies": list_studies,
    }
    for name in what[args.what]():
        print(name)
    if args.what == "balancers":
        for name, alias in BALANCERS.aliases().items():
            preset = ", ".join(f"{k}={v!r}" for k, v in alias.options.items())
            print(f"{name}  (alias: {alias.target} with {preset}: {alias.note})")
    return 0


def add_parser(sub: Any) -> None:
    """Add ``list`` and its argument."""
    ls = command(sub, "list", run, HELP)
    ls.add_argument("what", choices=list(KINDS))
