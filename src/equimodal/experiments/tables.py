"""A comparison's table, from its finished runs: one row per method, paired by seed with joint training.

:func:`comparison_table` reads the runs' summaries (and the unimodal runs' predictions, for the
late-fusion ensembles) and returns the rows as text cells, the columns, and the raw test figures per
method and seed. The cells are those of :mod:`equimodal.reporting.tables`; the statistics those of
:mod:`equimodal.reporting.statistics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..reporting.statistics import ensemble_accuracy, gap_closed, mean_ci
from ..reporting.tables import ONE_SEED, interval_text, mean_std
from .specs import RunSpec, finished_summary, run_folder

ENSEMBLES = {"ensemble_product": "product", "ensemble_mean": "mean"}
"""The ensemble rows and their rules (:func:`~equimodal.reporting.statistics.ensemble_accuracy`)."""


@dataclass
class ComparisonTable:
    """A comparison's table.

    Attributes:
        columns: the full table's columns (see :func:`comparison_columns`).
        rows: one dict per method (methods, variants, references, then the ensembles), every column a
            key, every cell text (``""`` where it does not apply).
        raw: ``{method: {seed: {"test_acc": fraction, ...}}}``: each finished run's test figures (an
            ensemble's: its accuracy alone), seeds as text (as the results JSON holds them).
    """

    columns: list[str]
    rows: list[dict[str, Any]]
    raw: dict[str, dict[str, dict[str, float]]]


def comparison_columns(modalities: Sequence[str]) -> list[str]:
    """``method``, ``n`` (seeds), ``train data`` (share of the training split), ``test acc``, ``test
    macro-F1``, ``<m> unimodal`` and ``<m> probe`` per modality, ``imbalance``, ``time/epoch vs none``,
    ``gap closed [95% CI]`` and ``Δacc vs none (pp)`` (paired by seed, bootstrap 95 % interval)."""
    columns = ["method", "n", "train data", "test acc", "test macro-F1"]
    columns += [f"{m} unimodal" for m in modalities] + [f"{m} probe" for m in modalities]
    return columns + ["imbalance", "time/epoch vs none", "gap closed [95% CI]", "Δacc vs none (pp)"]


def _train_share(fractions: Sequence[float | None]) -> str:
    """The share of the training split a method trained on (the rest held out for its own weights)."""
    known = [f for f in fractions if f is not None]
    return f"{100 * float(np.mean(known)):.0f} %" if known else "?"


def _difference_cell(d: np.ndarray) -> str:
    """``mean [lo, hi]`` of paired differences with a bootstrap 95% interval; one seed: no interval."""
    if d.size == 1:
        return f"{d[0]:+.2f} [{ONE_SEED}]"
    return interval_text(float(d.mean()), *mean_ci(d))


def ensembles(out: Path, seeds: Sequence[int], modalities: Sequence[str]) -> dict[str, dict[int, float]]:
    """Per seed, the product-rule and mean-rule ensembles of the unimodal runs (where all finished)."""
    ens: dict[str, dict[int, float]] = {label: {} for label in ENSEMBLES}
    for seed in seeds:
        folders = [run_folder(out, RunSpec(f"unimodal_{m}", (), seed)) for m in modalities]
        if all(f.predictions.exists() for f in folders):
            preds = [
                f.read_predictions(keys=("test_logits", "test_labels", "train_label_counts")) for f in folders
            ]
            logits = [p["test_logits"] for p in preds]
            labels, counts = preds[0]["test_labels"], preds[0]["train_label_counts"]
            for label, rule in ENSEMBLES.items():
                ens[label][seed] = ensemble_accuracy(logits, labels, counts, rule)
    return ens


def _gap_cell(
    runs: Mapping[int, dict[str, Any]], joint: Mapping[int, dict[str, Any]], ep: Mapping[int, float]
) -> str:
    """The fraction of the joint-to-ensemble gap a method closes, with its interval ('' when unpaired)."""
    paired = [s for s in sorted(runs) if s in joint and s in ep]
    if len(paired) == 1:
        return ONE_SEED  # whether there is a gap at all needs seeds to tell
    if len(paired) < 2:
        return ""
    j = np.array([joint[s]["test"]["test_acc"] for s in paired])
    e = np.array([ep[s] for s in paired])
    gap_lo, _ = mean_ci(e - j)
    if gap_lo <= 0:
        # No significant gap between joint training and the ensemble: a fraction of it is noise.
        return "n/a (no gap)"
    return interval_text(*gap_closed(np.array([runs[s]["test"]["test_acc"] for s in paired]), j, e))


def method_row(
    label: str,
    runs: Mapping[int, dict[str, Any]],
    joint: Mapping[int, dict[str, Any]],
    ep: Mapping[int, float],
    modalities: Sequence[str],
    base_time: float,
) -> dict[str, Any]:
    """One table row: a label's seeds summarised, paired by seed with the joint ('none') runs."""
    ss = sorted(runs)
    t = [runs[s]["test"] for s in ss]
    row: dict[str, Any] = {
        "method": label,
        "n": len(ss),
        "train data": _train_share([runs[s].get("train_fraction") for s in ss]),
        "test acc": mean_std([x["test_acc"] for x in t]),
        "test macro-F1": mean_std([x["test_f1"] for x in t]),
    }
    for m in modalities:
        row[f"{m} unimodal"] = mean_std([x.get(f"test_acc_{m}", math.nan) for x in t])
        row[f"{m} probe"] = mean_std([x.get(f"test_probe_{m}", math.nan) for x in t])
    row["imbalance"] = mean_std([x["test_imbalance"] for x in t])
    row["time/epoch vs none"] = f"{np.median([runs[s]['time_per_epoch'] for s in ss]) / base_time:.2f}"
    if label == "none":
        return row
    paired = [s for s in ss if s in joint]
    if paired:
        row["Δacc vs none (pp)"] = _difference_cell(
            100 * np.array([runs[s]["test"]["test_acc"] - joint[s]["test"]["test_acc"] for s in paired])
        )
    if not label.startswith("unimodal_"):
        row["gap closed [95% CI]"] = _gap_cell(runs, joint, ep)
    return row


def _ensemble_row(
    label: str, accs: Mapping[int, float], joint: Mapping[int, dict[str, Any]]
) -> dict[str, Any]:
    """An ensemble's row: its accuracy over seeds and its paired difference to joint training."""
    ss = sorted(accs)
    row: dict[str, Any] = {"method": label, "n": len(ss), "test acc": mean_std([accs[s] for s in ss])}
    paired = [s for s in ss if s in joint]
    if paired:
        row["Δacc vs none (pp)"] = _difference_cell(
            100 * np.array([accs[s] - joint[s]["test"]["test_acc"] for s in paired])
        )
    return row


def comparison_table(
    out: Path,
    specs: Sequence[RunSpec],
    modalities: Sequence[str],
    refs: bool,
    expected: Mapping[RunSpec, dict[str, Any]] | None = None,
) -> ComparisonTable:
    """Collect the finished runs of ``specs`` in ``out`` into the comparison's table.

    With ``expected`` (spec -> resolved config), a run folder written with another config (an older
    comparison into the same folder) is left out instead of being mixed into the table.
    """
    by_label: dict[str, dict[int, dict[str, Any]]] = {}
    for s in specs:
        summary = finished_summary(out, s, None if expected is None else expected[s])
        if summary is not None:
            by_label.setdefault(s.label, {})[s.seed] = summary
    joint = by_label.get("none", {})
    base_time = np.median([r["time_per_epoch"] for r in joint.values()]) if joint else float("nan")
    seeds = sorted({s.seed for s in specs})
    ens = ensembles(out, seeds, modalities) if refs else {label: {} for label in ENSEMBLES}
    columns = comparison_columns(modalities)
    rows = [
        method_row(label, runs, joint, ens["ensemble_product"], modalities, base_time)
        for label, runs in by_label.items()
    ]
    rows += [_ensemble_row(label, accs, joint) for label, accs in ens.items() if accs]
    rows = [{c: r.get(c, "") for c in columns} for r in rows]  # every column, in the table's order
    raw = {lab: {str(s): r["test"] for s, r in runs.items()} for lab, runs in by_label.items()}
    raw.update({lab: {str(s): {"test_acc": a} for s, a in accs.items()} for lab, accs in ens.items() if accs})
    return ComparisonTable(columns, rows, raw)
