"""Paired differences of compare rows against a reference row, in test and validation accuracy.

Reads one or more ``equimodal compare`` output folders (a row's runs are looked up in every folder, so a
comparison extended later into a second folder counts as one) and prints a markdown table: per label,
the test accuracy (mean ± std over seeds), the paired test difference to ``--reference`` with the same
bootstrap 95 % interval as ``compare``, the paired validation difference (what a choice on validation
data looks at), each modality's probe, and how many seeds did not finish (e.g. a non-finite loss).
These are the tables of docs/diagnose.md, e.g.:

    python benchmarks/paired_table.py runs/i14_avdh runs/i14_avdh_b --labels own_w2,own_signal,mmpareto
    python benchmarks/paired_table.py runs/i14_avdh runs/i14_avdh_b --labels own_w2 --reference mmpareto
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from equimodal.reporting.statistics import bootstrap_ci


def runs_of(folders: list[Path], label: str) -> tuple[dict[int, dict[str, Any]], int]:
    """The finished runs of ``label`` by seed (their summary.json), and the number of unfinished ones."""
    finished, unfinished = {}, 0
    for folder in folders:
        for seed_dir in sorted((folder / label).glob("seed*")):
            summary = seed_dir / "summary.json"
            if summary.is_file():
                finished[int(seed_dir.name[4:])] = json.loads(summary.read_text())
            else:
                unfinished += 1
    return finished, unfinished


def paired(
    a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], split: str
) -> tuple[float, float, float]:
    """Mean paired difference ``a - b`` of the split's accuracy in pp, with compare's bootstrap interval."""
    seeds = sorted(set(a) & set(b))
    d = 100 * np.array([a[s][split][f"{split}_acc"] - b[s][split][f"{split}_acc"] for s in seeds])
    if d.size == 0:
        return (float("nan"),) * 3
    low, high = bootstrap_ci(d[:, None], lambda r: float(r.mean()))
    return float(d.mean()), low, high


def table(folders: list[Path], labels: list[str], reference: str) -> str:
    base, _ = runs_of(folders, reference)
    if not base:
        raise SystemExit(f"no finished runs of the reference {reference!r} in {[str(f) for f in folders]}")
    modalities = list(next(iter(base.values()))["modalities"])
    rows = [
        f"| method | test acc | Δ test vs {reference} [95% CI] | Δ val vs {reference} | "
        + " | ".join(f"{m} probe" for m in modalities)
        + " |",
        "|---|---|---|---|" + "---|" * len(modalities),
    ]
    for label in labels:
        runs, unfinished = runs_of(folders, label)
        note = f" ({unfinished} seed(s) unfinished)" if unfinished else ""
        if not runs:
            rows.append(f"| {label}{note} | no finished run | | |" + " |" * len(modalities))
            continue
        acc = 100 * np.array([r["test"]["test_acc"] for r in runs.values()])
        spread = f" ± {acc.std(ddof=1):.1f}" if acc.size > 1 else ""
        probes = " | ".join(
            f"{100 * np.nanmean([r['test'].get(f'test_probe_{m}', np.nan) for r in runs.values()]):.1f}"
            for m in modalities
        )
        if label == reference:
            rows.append(f"| {label}{note} | {acc.mean():.1f}{spread} | | | {probes} |")
            continue
        t, lo, hi = paired(runs, base, "test")
        v, _, _ = paired(runs, base, "val")
        rows.append(
            f"| {label}{note} | {acc.mean():.1f}{spread} | {t:+.2f} [{lo:+.2f}, {hi:+.2f}] | {v:+.2f} | {probes} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="compare output folders (merged)")
    parser.add_argument("--labels", required=True, help="comma-separated row labels")
    parser.add_argument("--reference", default="none", help="the row the differences are taken against")
    args = parser.parse_args()
    print(table(args.folders, [x for x in args.labels.split(",") if x], args.reference))


if __name__ == "__main__":
    main()
