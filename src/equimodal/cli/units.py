"""``equimodal units``: what AMSS masks in a config's model, and why not the rest
(:func:`equimodal.amss.explain.describe_units`)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from .common import add_config, add_set, command

HELP = "list what AMSS masks in a config's model (units per parameter) and why not"


def run(args: argparse.Namespace) -> int:
    """Print what AMSS masks in the model ``equimodal train`` would build for CONFIG, and why not the rest."""
    from ..amss.explain import amss_balancers, describe_units
    from ..data import load_dataset
    from ..engine.config import load_config
    from ..engine.trainer import build_model, seed_everything
    from ..reporting.units import rich_tables

    cfg = load_config(args.config, args.set or [])
    seed_everything(cfg.train.seed)
    model = build_model(cfg, load_dataset(cfg.data.name, seed=cfg.train.seed, **cfg.data.options))
    name, options = cfg.balancer.name, cfg.balancer.options
    console = Console(width=min(Console().width, 80))
    if name not in amss_balancers():
        console.print(f"Balancer {name!r} masks no units; showing what 'amss' would mask with its defaults.")
        name, options = "amss", {}
    report = describe_units(model, balancer=name, **options)
    shown = ", ".join(f"{k}={v!r}" for k, v in report.selection.summary().items())
    console.print(f"{cfg.data.name} / {name} / {cfg.model.fusion} fusion: {shown}", highlight=False)
    for table in rich_tables(report):
        console.print(table)
    if report.frozen:
        console.print(f"{report.frozen} frozen parameter(s) (requires_grad=False) not listed.")
    return 0


def add_parser(sub: Any) -> None:
    """Add ``units`` and its options."""
    u = command(sub, "units", run, HELP)
    add_config(u)
    add_set(u, "override, e.g. balancer.options.linear_rows=auto")
