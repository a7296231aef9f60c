"""``equimodal compare``: balancers x seeds on one dataset, with reference rows and paired statistics.

Each run lives in ``OUT/<label>/seed<k>/`` and is skipped when its ``summary.json`` exists, so an
interrupted comparison resumes where it stopped. Reference rows computed in the same run: each
modality trained alone (``unimodal``), the late-fusion ensembles of those branches (product rule
and mean of probabilities), and joint training with SGD (``none``) and with Adam (``none_adam``).
For every method the fraction of the joint-to-ensemble gap it closes is estimated, paired by seed,
with a bootstrap confidence interval over seeds; it is reported as "n/a" when the gap itself is not
significantly above zero (then any fraction of it would be noise).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .io import atomic_write_text

log = logging.getLogger(__name__)

ADAM_OVERRIDES = ("optim.name=adam", "optim.lr=0.001", "optim.weight_decay=0")


@dataclass(frozen=True)
class RunSpec:
    """One run of the comparison: a row label, the overrides that define it, and a seed."""

    label: str
    overrides: tuple[str, ...]
    seed: int


def _run_one(args: tuple[str | None, tuple[str, ...], str, int]) -> tuple[str, str | None]:
    """Run one training; returns ``(run folder, error message or None)`` so one failure stops nothing."""
    config, overrides, out, threads = args
    import torch

    from .config import load_config
    from .train import train

    torch.set_num_threads(threads)
    try:
        cfg = load_config(config, list(overrides) + ["train.progress=false"])
        train(cfg, out)
    except Exception as exc:  # noqa: BLE001 - reported per run, the comparison goes on
        log.exception("run %s failed", out)
        return out, f"{type(exc).__name__}: {exc}"
    return out, None


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """``LABEL:key=value,key=value`` -> ``(LABEL, overrides)``; a named, fully specified extra row."""
    label, sep, rest = text.partition(":")
    overrides = tuple(x.strip() for x in rest.split(",") if x.strip())
    if not sep or not label.strip() or not overrides or any("=" not in o for o in overrides):
        raise ValueError(
            f"--variant {text!r} must look like LABEL:key=value[,key=value...], e.g. "
            "amss_T1:balancer.name=amss,balancer.options.temperature=1.0"
        )
    return label.strip(), overrides


def run_specs(
    base: Sequence[str],
    balancers: Sequence[str],
    modalities: Sequence[str],
    seeds: int,
    refs: bool,
    variants: Sequence[tuple[str, tuple[str, ...]]] = (),
) -> list[RunSpec]:
    """All runs of a comparison (methods, then variants, then the reference runs)."""
    specs: list[RunSpec] = []
    labels: list[tuple[str, tuple[str, ...]]] = [(b, (f"balancer.name={b}",)) for b in balancers]
    labels += list(variants)
    if refs:
        if "none" not in balancers:
            labels.append(("none", ("balancer.name=none",)))
        labels.append(("none_adam", ("balancer.name=none", *ADAM_OVERRIDES)))
        labels += [
            (f"unimodal_{m}", ("balancer.name=unimodal", f"balancer.options.modality={m}"))
            for m in modalities
        ]
    for seed in range(seeds):
        for label, ov in labels:
            specs.append(RunSpec(label, (*base, *ov, f"train.seed={seed}"), seed))
    return specs


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def ensemble_accuracy(paths: Sequence[Path], rule: str) -> float:
    """Test accuracy of a late-fusion ensemble of separately trained branches.

    ``product``: argmax of sum_m log p_m(y|x_m) - (M - 1) log p(y) (the product rule, exact when the
    modalities are conditionally independent given the label; the prior is the training label
    frequency). ``mean``: argmax of the mean of the probabilities.
    """
    preds = [np.load(p / "predictions.npz") for p in paths]
    labels = preds[0]["test_labels"]
    logp = [_log_softmax(p["test_logits"].astype(np.float64)) for p in preds]
    if rule == "product":
        counts = preds[0]["train_label_counts"].astype(np.float64)
        prior = np.log(np.maximum(counts, 1) / counts.sum())
        score = sum(logp) - (len(logp) - 1) * prior
    elif rule == "mean":
        score = sum(np.exp(lp) for lp in logp) / len(logp)
    else:
        raise ValueError(f"Unknown ensemble rule {rule!r}; expected 'product' or 'mean'.")
    return float((score.argmax(1) == labels).mean())


def bootstrap_ci(values: np.ndarray, stat: Any, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``stat`` over rows of ``values`` (resampling seeds)."""
    rng = np.random.default_rng(seed)
    k = values.shape[0]
    if k < 2:
        return (float("nan"), float("nan"))
    stats = [stat(values[rng.integers(0, k, k)]) for _ in range(n)]
    return float(np.nanpercentile(stats, 2.5)), float(np.nanpercentile(stats, 97.5))


def gap_closed(method: np.ndarray, joint: np.ndarray, ensemble: np.ndarray) -> tuple[float, float, float]:
    """Fraction of the (ensemble - joint) gap a method closes, paired by seed, with a 95% CI.

    The point estimate is mean(method - joint) / mean(ensemble - joint) over seeds (a ratio of means,
    stable when single seeds have tiny gaps).
    """
    rows = np.stack([method, joint, ensemble], 1)

    def stat(r: np.ndarray) -> float:
        gap = (r[:, 2] - r[:, 1]).mean()
        return float((r[:, 0] - r[:, 1]).mean() / gap) if abs(gap) > 1e-12 else float("nan")

    lo, hi = bootstrap_ci(rows, stat)
    return stat(rows), lo, hi


def _mean_std(v: Sequence[float]) -> str:
    a = 100 * np.asarray(v, dtype=float)
    if a.size == 0 or np.all(np.isnan(a)):
        return "-"
    sd = float(np.nanstd(a, ddof=1)) if a.size > 1 else 0.0
    return f"{np.nanmean(a):.1f} ± {sd:.1f}"


def run_config(config: str | None, spec: RunSpec) -> dict[str, Any]:
    """The resolved config a run of ``spec`` is trained with (as stored in its ``summary.json``)."""
    from .config import config_to_dict, load_config

    return config_to_dict(load_config(config, [*spec.overrides, "train.progress=false"]))


def finished_summary(
    out: Path, spec: RunSpec, expected: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The run's summary if it finished (and, given ``expected``, was trained with that exact config)."""
    path = out / spec.label / f"seed{spec.seed}" / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if expected is not None and summary.get("config") != expected:
        return None
    return summary


def summarise(
    out: Path,
    specs: Sequence[RunSpec],
    modalities: Sequence[str],
    refs: bool,
    expected: dict[RunSpec, dict[str, Any]] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Collect finished runs into table rows (one per label) and write results.{md,csv,json}.

    With ``expected`` (spec -> resolved config), a run folder written with another config (an older
    comparison into the same folder) is left out instead of being mixed into the table.
    """
    by_label: dict[str, dict[int, dict[str, Any]]] = {}
    for s in specs:
        summary = finished_summary(out, s, None if expected is None else expected[s])
        if summary is not None:
            by_label.setdefault(s.label, {})[s.seed] = summary
    seeds = sorted({s.seed for s in specs})
    joint = by_label.get("none", {})
    base_time = np.median([r["time_per_epoch"] for r in joint.values()]) if joint else float("nan")
    ens: dict[str, dict[int, float]] = {"ensemble_product": {}, "ensemble_mean": {}}
    if refs:
        for seed in seeds:
            paths = [out / f"unimodal_{m}" / f"seed{seed}" for m in modalities]
            if all((p / "predictions.npz").exists() for p in paths):
                ens["ensemble_product"][seed] = ensemble_accuracy(paths, "product")
                ens["ensemble_mean"][seed] = ensemble_accuracy(paths, "mean")

    columns = ["method", "n", "test acc", "test macro-F1"]
    columns += [f"{m} unimodal" for m in modalities] + [f"{m} probe" for m in modalities]
    columns += ["imbalance", "time/epoch vs none", "gap closed [95% CI]", "Δacc vs none (pp)"]
    rows: list[dict[str, Any]] = []
    for label, runs in by_label.items():
        ss = sorted(runs)
        t = [runs[s]["test"] for s in ss]
        row: dict[str, Any] = {
            "method": label,
            "n": len(ss),
            "test acc": _mean_std([x["test_acc"] for x in t]),
        }
        row["test macro-F1"] = _mean_std([x["test_f1"] for x in t])
        for m in modalities:
            row[f"{m} unimodal"] = _mean_std([x.get(f"test_acc_{m}", math.nan) for x in t])
            row[f"{m} probe"] = _mean_std([x.get(f"test_probe_{m}", math.nan) for x in t])
        row["imbalance"] = _mean_std([x["test_imbalance"] for x in t])
        row["time/epoch vs none"] = f"{np.median([runs[s]['time_per_epoch'] for s in ss]) / base_time:.2f}"
        paired = [s for s in ss if s in joint]
        if paired and label != "none":
            d = 100 * np.array([runs[s]["test"]["test_acc"] - joint[s]["test"]["test_acc"] for s in paired])
            lo, hi = bootstrap_ci(d[:, None], lambda r: float(r.mean()))
            row["Δacc vs none (pp)"] = f"{d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}]"
        ep = ens["ensemble_product"]
        paired = [s for s in ss if s in joint and s in ep]
        if len(paired) >= 2 and label != "none" and not label.startswith("unimodal_"):
            j = np.array([joint[s]["test"]["test_acc"] for s in paired])
            e = np.array([ep[s] for s in paired])
            gap_lo, _ = bootstrap_ci((e - j)[:, None], lambda r: float(r.mean()))
            if gap_lo <= 0:
                # No significant gap between joint training and the ensemble: a fraction of it is noise.
                row["gap closed [95% CI]"] = "n/a (no gap)"
            else:
                f, lo, hi = gap_closed(np.array([runs[s]["test"]["test_acc"] for s in paired]), j, e)
                row["gap closed [95% CI]"] = f"{f:+.2f} [{lo:+.2f}, {hi:+.2f}]"
        rows.append(row)
    for label, accs in ens.items():
        if accs:
            ss = sorted(accs)
            row = {"method": label, "n": len(ss), "test acc": _mean_std([accs[s] for s in ss])}
            paired = [s for s in ss if s in joint]
            if paired:
                d = 100 * np.array([accs[s] - joint[s]["test"]["test_acc"] for s in paired])
                lo, hi = bootstrap_ci(d[:, None], lambda r: float(r.mean()))
                row["Δacc vs none (pp)"] = f"{d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}]"
            rows.append(row)
    for r in rows:
        for c in columns:
            r.setdefault(c, "")
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    raw = {lab: {str(s): r["test"] for s, r in runs.items()} for lab, runs in by_label.items()}
    raw.update({lab: {str(s): {"test_acc": a} for s, a in accs.items()} for lab, accs in ens.items() if accs})
    atomic_write_text(out / "results.json", json.dumps(raw, indent=2))
    _plot(out, raw)
    return columns, rows


def _plot(out: Path, raw: dict[str, dict[str, dict[str, float]]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping results.png (pip install 'equimodal[plots]')")
        return
    labels = list(raw)
    means = [100 * np.mean([v["test_acc"] for v in raw[k].values()]) for k in labels]
    stds = [
        100 * np.std([v["test_acc"] for v in raw[k].values()], ddof=1) if len(raw[k]) > 1 else 0
        for k in labels
    ]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels)), 3.5))
    ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color="#4477aa")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    if "none" in labels:
        ax.axhline(means[labels.index("none")], color="0.4", ls="--", lw=1, label="joint training (none)")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    lo = min(m - s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(max(0, lo - 5), min(100, max(m + s for m, s in zip(means, stds, strict=True)) + 2))
    fig.tight_layout()
    tmp = out / ".results.png.tmp"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(out / "results.png")


def run_compare(args: argparse.Namespace) -> int:
    """CLI entry: run missing runs (in parallel with ``--jobs``), then print and write the tables."""
    from .config import load_config
    from .data import load_dataset

    base = list(args.set or [])
    if args.dataset:
        base.insert(0, f"data.name={args.dataset}")
    cfg = load_config(args.config, base)
    from .balancers import list_balancers

    balancers = [b.strip() for b in args.balancers.split(",") if b.strip()]
    valid = list_balancers()
    for b in balancers:
        if b not in valid:
            from .registry import unknown_name_error

            raise unknown_name_error("balancer", b, valid)
    modalities = load_dataset(cfg.data.name, seed=0, **cfg.data.options).modalities
    refs = not args.no_references
    variants = [parse_variant(v) for v in args.variant or []]
    specs = run_specs(base, balancers, modalities, args.seeds, refs, variants)
    out = Path(args.out)
    expected = {s: run_config(args.config, s) for s in specs}
    todo = [s for s in specs if finished_summary(out, s, expected[s]) is None]
    stale = [s for s in todo if (out / s.label / f"seed{s.seed}" / "summary.json").exists()]
    if stale:
        log.warning("%d run folder(s) hold results of another config and will be retrained", len(stale))
    console = Console()
    console.print(
        f"{len(specs)} runs, {len(specs) - len(todo)} already finished, {len(todo)} to run in {out}"
    )
    jobs = [(args.config, s.overrides, str(out / s.label / f"seed{s.seed}"), args.threads) for s in todo]
    failures: list[tuple[str, str]] = []

    def report(i: int, done: str, error: str | None) -> None:
        console.print(f"[{i}/{len(jobs)}] {done}" + (f" [red]FAILED[/]: {error}" if error else ""))
        if error:
            failures.append((done, error))

    if args.jobs > 1 and jobs:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for i, (done, error) in enumerate(pool.imap_unordered(_run_one, jobs), 1):
                report(i, done, error)
    else:
        for i, job in enumerate(jobs, 1):
            report(i, *_run_one(job))
    columns, rows = summarise(out, specs, modalities, refs, expected)
    table = Table(title=f"{cfg.data.name}: test metrics, mean ± std over seeds (epoch chosen on val)")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(r[c]) for c in columns])
    console.print(table)
    console.print(f"Tables: {out / 'results.md'}, {out / 'results.csv'}")
    if failures:
        console.print(f"[bold red]{len(failures)} run(s) failed[/] (rerun the same command to retry them):")
        for done, error in failures:
            console.print(f"  {done}: {error}")
        return 1
    return 0
