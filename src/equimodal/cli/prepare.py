"""``equimodal prepare``: a dataset's raw download into the layout its loader reads
(:func:`equimodal.prepare.prepare`)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import command

HELP = "turn a dataset's raw download into the layout its loader reads"


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}`` with YAML-parsed values (numbers, booleans, lists)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"Option {item!r} must look like key=value (e.g. workers=4).")
        key, raw = item.split("=", 1)
        try:
            options[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ValueError(f"Option {item!r}: the value {raw!r} is not valid YAML; quote it.") from None
    return options


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset and print what was prepared and skipped, and how to train on it."""
    from ..prepare import prepare

    info = prepare(args.dataset, args.raw, args.out, workers=args.workers, **parse_options(args.set))
    counts = ", ".join(f"{n} {s}" for s, n in info["counts"].items())
    print(f"Prepared {args.dataset} into {args.out}: {counts} ({len(info['classes'])} classes).")
    skipped = info.get("skipped") or []
    if skipped:
        print(f"{len(skipped)} unusable input(s) were skipped (all listed in {args.out}/prepare.json):")
        for s in skipped[:10]:
            print(f"  {s['clip']}: {s['reason']}")
        if len(skipped) > 10:
            print(f"  ... and {len(skipped) - 10} more")
    print(f"Train on it: equimodal train {args.dataset} --set data.options.root={args.out}")
    return 0


def add_parser(sub: Any) -> None:
    """Add ``prepare`` and its options."""
    pr = command(sub, "prepare", run, HELP)
    pr.add_argument("dataset", help="cremad, kinetics_sounds, sarcasm, twitter15 or nvgesture")
    pr.add_argument("--raw", required=True, help="the folder holding the raw download (see README)")
    pr.add_argument("--out", required=True, help="the prepared folder to write (resumable)")
    pr.add_argument("--workers", type=int, help="worker processes (default: the CPUs available)")
    pr.add_argument("--set", action="append", metavar="KEY=VALUE", help="a preparer option (repeatable)")
