"""Paired differences of compare rows against a reference row, in test and validation accuracy.

Reads one or more ``equimodal compare`` output folders (a row's runs are looked up in every folder, so a
comparison extended later into a second folder counts as one) and prints a markdown table: per label,
the test accuracy (mean ± std over seeds), the paired test difference to ``--reference`` with the same
bootstrap 95 % interval as ``compare``, the paired validation difference (what a choice on validation
data looks at), each modality's probe, and how many seeds did not finish (e.g. a non-finite loss).
These are the tables of docs/diagnose.md, e.g.:

    python benchmarks/paired_table.py runs/i14_avdh runs/i14_avdh_b --labels own_w2,own_signal,mmpareto
    python benchmarks/paired_table.py runs/i14_avdh runs/i14_avdh_b --labels own_w2 --reference mmpareto

With ``--across``, each folder is a task of its own: per task and over the tasks, the paired validation
and test differences of each label, with 95 % intervals (over the tasks: the mean of the per-task means,
every task weighted alike, its interval from resampling the seeds within each task). This is how AMSS+'s
default weights were chosen on validation across tasks (docs/results.md):

    python benchmarks/paired_table.py --across runs/new_avdh runs/new_cremadlike runs/new_mfeat_pixfou \
        runs/new_mfeat_facmor --labels amss_plus_floored --reference amss_plus
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


def differences(folder: Path, label: str, reference: str, split: str) -> np.ndarray:
    """The paired differences ``label - reference`` of the split's accuracy in pp, seed by seed."""
    a, _ = runs_of([folder], label)
    b, _ = runs_of([folder], reference)
    seeds = sorted(set(a) & set(b))
    return 100 * np.array([a[s][split][f"{split}_acc"] - b[s][split][f"{split}_acc"] for s in seeds])


def stratified_interval(
    per_task: list[np.ndarray], draws: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of the mean of the per-task means, the seeds resampled within each task."""
    rng = np.random.default_rng(seed)
    means = np.mean([d[rng.integers(0, d.size, (draws, d.size))].mean(1) for d in per_task], axis=0)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def across(folders: list[Path], labels: list[str], reference: str) -> str:
    rows = [
        f"| method | task | seeds | Δ val vs {reference} [95% CI] | Δ test vs {reference} [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        found: dict[str, list[np.ndarray]] = {"val": [], "test": []}
        for folder in folders:
            cells = []
            for split in ("val", "test"):
                d = differences(folder, label, reference, split)
                if d.size == 0:
                    raise SystemExit(f"no paired runs of {label!r} and {reference!r} in {folder}")
                found[split].append(d)
                low, high = bootstrap_ci(d[:, None], lambda r: float(r.mean()))
                cells.append(f"{d.mean():+.2f} [{low:+.2f}, {high:+.2f}]")
            rows.append(f"| {label} | {folder.name} | {found['val'][-1].size} | {cells[0]} | {cells[1]} |")
        cells = []
        for split in ("val", "test"):
            mean = float(np.mean([d.mean() for d in found[split]]))
            low, high = stratified_interval(found[split])
            cells.append(f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]")
        rows.append(f"| {label} | mean of the {len(folders)} tasks | | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="compare output folders (merged)")
    parser.add_argument("--labels", required=True, help="comma-separated row labels")
    parser.add_argument("--reference", default="none", help="the row the differences are taken against")
    parser.add_argument("--across", action="store_true", help="each folder a task: per task and over tasks")
    args = parser.parse_args()
    labels = [x for x in args.labels.split(",") if x]
    print((across if args.across else table)(args.folders, labels, args.reference))


if __name__ == "__main__":
    main()
