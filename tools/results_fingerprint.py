"""Train every registered balancer briefly on two built-in datasets and record what the runs wrote.

Used to show that a refactoring changed no result: run it before (``--write before.json``) and after
(``--check before.json``); every ``summary.json`` and ``metrics.csv`` must be identical but for the
wall-clock fields (``time_per_epoch``, ``epoch_time``), which vary from run to run.

    python tools/results_fingerprint.py --write /tmp/before.json
    python tools/results_fingerprint.py --check /tmp/before.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import equimodal as em
from equimodal.balancers import get_balancer_class
from equimodal.engine.config import load_config
from equimodal.engine.trainer import train

DATASETS = {
    "mfeat_facmor": ["data.options.views=fac,mor", "data.batch_size=64"],
    "avdigits": ["data.name=avdigits", "data.batch_size=64"],
}
COMMON = ["train.epochs=2", "train.seed=0", "train.progress=false", "train.num_threads=1"]
CLOCK = ("time_per_epoch", "epoch_time")


def _options(balancer: str, dataset: str) -> list[str]:
    if balancer == "unimodal":
        first = "fac" if dataset == "mfeat_facmor" else "image"
        return [f"balancer.options.modality={first}"]
    return []


def _without_clock(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items() if k not in CLOCK}
    return value


def fingerprint(balancers: list[str]) -> dict[str, Any]:
    """``{dataset/balancer: {"summary": ..., "metrics": [...]}}`` with the wall-clock fields left out."""
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, sets in DATASETS.items():
            for name in balancers:
                cfg = load_config(None, [*sets, *COMMON, f"balancer.name={name}", *_options(name, dataset)])
                out = Path(tmp) / dataset / name
                train(cfg, out)
                summary = json.loads((out / "summary.json").read_text())
                with open(out / "metrics.csv") as f:
                    rows = [_without_clock(r) for r in csv.DictReader(f)]
                result[f"{dataset}/{name}"] = {"summary": _without_clock(summary), "metrics": rows}
                print(f"{dataset}/{name}: test acc {summary['test']['test_acc']:.4f}", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", help="write the fingerprint to this JSON file")
    g.add_argument("--check", help="compare with a fingerprint written before")
    p.add_argument(
        "--balancers",
        help="comma-separated names (default: those of --check's file, or every registered balancer "
        "that trains without other runs)",
    )
    args = p.parse_args()
    before = json.loads(Path(args.check).read_text()) if args.check else None
    if args.balancers:
        names = args.balancers.split(",")
    elif before is not None:  # the balancers the reference holds
        names = sorted({key.split("/", 1)[1] for key in before})
    else:  # every registered one that trains alone (umt reads unimodal runs first)
        names = [n for n in em.list_balancers() if get_balancer_class(n).unimodal_runs_option is None]
    now = fingerprint(names)
    if before is None:
        Path(args.write).write_text(json.dumps(now, indent=1, sort_keys=True))
        print(f"{len(now)} runs written to {args.write}")
        return 0
    differ = [k for k in now if before.get(k) != json.loads(json.dumps(now[k]))]
    missing = [k for k in before if k not in now]
    for k in differ:
        print(f"DIFFERS: {k}")
    for k in missing:
        print(f"NOT RUN: {k}")
    print(f"{len(now) - len(differ)} of {len(now)} runs identical to {args.check}")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
