"""``equimodal train``: one run, kept in its own folder (resumed when rerun), its figures printed."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..engine.run_folder import BEST, CONFIG, LAST, METRICS, SUMMARY
from .common import add_config, add_set, command

HELP = "train one run (default: the built-in mfeat dataset)"


def summary_table(summary: dict[str, Any]) -> Table:
    """The selected epoch's val and test figures: fused, per modality, probes, removals, imbalance."""
    mods = summary["modalities"]
    table = Table(
        title=f"{summary['dataset']} / {summary['balancer']} (epoch {summary['selected_epoch']} chosen on val)"
    )
    table.add_column("metric")
    table.add_column("val", justify="right")
    table.add_column("test", justify="right")
    val, test = summary["val"], summary["test"]

    def pct(d: dict[str, float], key: str) -> str:
        v = d.get(key)
        return "-" if v is None else f"{100 * v:.1f}"

    table.add_row("fused accuracy", pct(val, "val_acc"), pct(test, "test_acc"))
    table.add_row("fused macro-F1", pct(val, "val_f1"), pct(test, "test_f1"))
    for m in mods:
        table.add_row(f"{m}: unimodal accuracy", pct(val, f"val_acc_{m}"), pct(test, f"test_acc_{m}"))
    for m in mods:
        if f"test_probe_{m}" in test:
            table.add_row(f"{m}: linear probe", pct(val, f"val_probe_{m}"), pct(test, f"test_probe_{m}"))
    for m in mods:
        if f"test_removed_{m}" in test:
            table.add_row(f"fused without {m}", "", pct(test, f"test_removed_{m}"))
    table.add_row("imbalance (spread)", pct(val, "val_imbalance"), pct(test, "test_imbalance"))
    return table


def default_run_folder(cfg: Any) -> Path:
    """``runs/train/<dataset>-<balancer>-<8 hex digits of the config>``: a config's own folder, so that
    rerunning the same command resumes it (every process of a torchrun agrees on it) and another config
    gets another folder."""
    from ..engine.config import config_to_dict

    digest = hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / "train" / f"{cfg.data.name}-{cfg.balancer.name}-{digest}"


def run(args: argparse.Namespace) -> int:
    """Train the run and print its summary table (only the first process under torchrun)."""
    from ..engine.config import load_config
    from ..engine.trainer import train

    cfg = load_config(args.config, args.set or [])
    if args.no_save and args.out:
        raise ValueError("--no-save keeps nothing, --out names where to keep the run: pass one of them.")
    out = None if args.no_save else Path(args.out) if args.out else default_run_folder(cfg)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only the first process reports
    console = Console(width=min(Console().width, 100))

    def announce() -> None:
        if main_process and out is not None and not args.out:
            console.print(f"Run folder: {out} (rerun the same command to resume it)", highlight=False)

    summary = train(
        cfg, out, resume=not args.no_resume, overwrite=args.overwrite, on_start=announce,
        skip_finished=args.skip_finished,
    )  # fmt: skip
    if main_process:
        console.print(summary_table(summary))
        if out is not None:
            console.print(f"Run folder: {out}", highlight=False)
        else:
            console.print(
                "--no-save: nothing was kept. Pass --out DIR (or leave it out) to keep the run folder."
            )
    return 0


def add_parser(sub: Any) -> None:
    """Add ``train`` and its options."""
    t = command(sub, "train", run, HELP)
    add_config(t)
    add_set(t)
    t.add_argument(
        "--out",
        help=f"run folder for {CONFIG}, {METRICS}, {BEST}, {SUMMARY} (default: "
        "runs/train/DATASET-BALANCER-HASH, one per config, so a rerun resumes)",
    )
    t.add_argument("--no-save", action="store_true", help="keep nothing on disk (no run folder, no resume)")
    t.add_argument("--no-resume", action="store_true", help=f"start afresh even if OUT/{LAST} exists")
    t.add_argument("--overwrite", action="store_true", help="replace a run of another config in OUT")
    t.add_argument(
        "--skip-finished",
        action="store_true",
        help="when OUT holds a finished run of this config, print its summary instead of evaluating it again",
    )
