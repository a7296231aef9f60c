"""A method's cost in epochs of joint training, and its data plan's size, from ``compare`` run folders.

Epoch- and data-level methods cost whole extra passes (a per-sample inference pass over train, extra copies
of samples, re-initialisation diagnoses, model copies), and some only every few epochs, so a median time
per epoch hides them. For each label and seed this reads the run's ``metrics.csv``: the ``seconds`` column
is an epoch's wall time from its start, epoch-level work included, to the end of its last step (not the
validation). The cost of one epoch of the method, in epochs of joint training, is the run's mean seconds
per epoch over the mean of the reference's (``none``) run of the same seed; printed as the mean over seeds
with the range. Where the runs logged a data plan (``plan/entries`` and ``plan/train_size``, per epoch),
the mean number of entries per training sample is printed too: the part of the cost that is more data.

    python benchmarks/epoch_cost.py runs/new23_avdh --labels sample_valuation,modality_valuation,remix

Runs that shared cores with other runs give indicative ratios only.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def epoch_rows(run: Path) -> list[dict[str, str]]:
    """The rows of a run's ``metrics.csv`` (empty when it has none)."""
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def mean_of(rows: list[dict[str, str]], key: str) -> float:
    """The mean of a column over the rows that have a number in it (nan when none do)."""
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "", "nan")]
    return float(np.mean(values)) if values else float("nan")


def cost(folder: Path, label: str, reference: str) -> tuple[list[float], list[float]]:
    """Per seed: the epoch-cost ratio to ``reference``, and the plan's entries per training sample."""
    ratios, sizes = [], []
    for seed_dir in sorted((folder / label).glob("seed*")):
        rows, base = epoch_rows(seed_dir), epoch_rows(folder / reference / seed_dir.name)
        if not rows or not base:
            continue
        ratios.append(mean_of(rows, "seconds") / mean_of(base, "seconds"))
        entries, size = mean_of(rows, "plan/entries"), mean_of(rows, "plan/train_size")
        if np.isfinite(entries) and np.isfinite(size) and size > 0:
            sizes.append(entries / size)
    return ratios, sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="an `equimodal compare` output folder")
    parser.add_argument("--labels", required=True, help="comma-separated row labels")
    parser.add_argument("--reference", default="none", help="the joint-training row (default: none)")
    args = parser.parse_args(argv)
    print(
        "| method | epochs of joint training per epoch (mean [min, max] over seeds) | entries per sample | seeds |"
    )
    print("|---|---|---|---|")
    for label in args.labels.split(","):
        ratios, sizes = cost(args.folder, label, args.reference)
        if not ratios:
            print(f"| `{label}` | no finished pair of runs | | 0 |")
            continue
        r = np.array(ratios)
        size = f"{np.mean(sizes):.2f}" if sizes else ""
        print(f"| `{label}` | {r.mean():.2f} [{r.min():.2f}, {r.max():.2f}] | {size} | {len(r)} |")


if __name__ == "__main__":
    main()
