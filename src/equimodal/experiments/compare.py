"""``equimodal compare``: balancers x seeds on one dataset, with reference rows and paired statistics.

Each run lives in ``OUT/<label>/seed<k>/`` and is skipped when it finished with the config this
comparison asks for, so an interrupted comparison resumes where it stopped. A run folder that holds a
run of *another* config (an older comparison into the same ``--out``) is never retrained silently:
before any training the whole comparison is refused, naming the folders and the differing keys, unless
``--overwrite`` asks to retrain those runs from scratch. Reference rows computed in the same run: each
modality trained alone (``unimodal``), the late-fusion ensembles of those branches (product rule
and mean of probabilities), and joint training with SGD (``none``) and with Adam (``none_adam``).
For every method the fraction of the joint-to-ensemble gap it closes is estimated, paired by seed,
with a bootstrap confidence interval over seeds; it is reported as "n/a" when the gap itself is not
significantly above zero (then any fraction of it would be noise). With a single seed a value is shown
without a spread and its interval reads "n/a (1 seed)".

The terminal shows a compact table (method, seeds, fused test accuracy, paired Δ, gap closed) that
fits 80 columns; the full table (macro-F1, per-modality unimodal and probe accuracy, imbalance, time
per epoch) is written to ``results.md`` and ``results.csv``, the raw figures to ``results.json`` and a
bar chart (accuracy axis from 0 to 100) to ``results.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import signal
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..engine.preflight import PLOTS_INSTALL, check_runs, figures_missing
from ..engine.run_folder import RunFolderError, check_writable_folder, config_differences, has_outputs
from ..utils.claim import claim_folder
from ..utils.interrupt import Interrupted, stop_signals
from ..utils.io import atomic_write_text, read_json, read_summary, read_text
from ..utils.workers import Hooks, Outcome, run_tasks

log = logging.getLogger(__name__)

ADAM_OVERRIDES = ("optim.name=adam", "optim.lr=0.001", "optim.weight_decay=0")


class RunsFailed(RuntimeError):
    """Runs of a command did not finish and its result needs them (the CLI exits 1)."""


@dataclass(frozen=True)
class RunSpec:
    """One run of the comparison: a row label, the overrides that define it, and a seed."""

    label: str
    overrides: tuple[str, ...]
    seed: int
    config: str | None = None  # a preset or YAML file of its own (a study's part); None: the comparison's


def _run_one(args: tuple[Any, ...]) -> tuple[str, str | None]:
    """Run one training; returns ``(run folder, error message or None)`` so one failure stops nothing.

    :class:`~equimodal.utils.interrupt.Interrupted` (SIGINT / SIGTERM, after the run's checkpoint) is raised.

    ``args`` is ``(config, overrides, out, threads)`` or ``(config, overrides, out, threads, fresh)``;
    with ``fresh`` (a run of another config, retrained under ``--overwrite``) ``train`` replaces the old
    run's files once it holds the folder's claim, so the run starts from scratch; other files there are
    kept.
    """
    config, overrides, out, threads = args[:4]
    fresh = bool(args[4]) if len(args) > 4 else False
    import torch

    from ..engine.config import load_config
    from ..engine.trainer import train

    torch.set_num_threads(threads)
    try:
        cfg = load_config(config, list(overrides) + ["train.progress=false"])
        train(cfg, out, overwrite=fresh)  # train claims the folder before it clears the old run
    except Interrupted:
        raise  # a signal stops every run, it is no failure of this one
    except Exception as exc:  # noqa: BLE001 - reported per run, the comparison goes on
        log.debug("run %s failed", out, exc_info=True)  # the traceback with -v; the driver prints the error
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
    """All runs of a comparison (methods, then variants, then the reference runs).

    Raises:
        ValueError: ``seeds`` is not a whole number >= 1.
    """
    check_count(seeds, "seeds", "the number of seeds, run as 0..N-1", "3")
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


def check_count(value: Any, name: str, meaning: str, example: str) -> int:
    """``value`` as an int >= 1, else a ValueError naming ``--name``, what it means and an example."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"--{name} must be a whole number >= 1 ({meaning}), found {value!r}. Pass e.g. --{name} {example}."
        )
    return int(value)


def run_dir(out: Path, spec: RunSpec) -> Path:
    """The folder of one run: ``OUT/<label>/seed<k>``."""
    return Path(out) / spec.label / f"seed{spec.seed}"


def _recorded_config(folder: Path) -> dict[str, Any] | None:
    """The config a run folder was trained with (``config.yaml``, else ``summary.json``), or None if it
    holds no run (:func:`~equimodal.engine.run_folder.has_outputs`); a run whose config cannot be read reads as a
    one-key placeholder naming the file and why (a difference, which the caller reports with the folder)."""
    saved, summary = folder / "config.yaml", folder / "summary.json"
    if not has_outputs(folder):
        return None  # a run that failed before writing anything holds nothing to keep
    if saved.is_file():
        try:
            loaded = yaml.safe_load(read_text(saved))
        except (yaml.YAMLError, ValueError) as err:
            problem = getattr(err, "problem", None) or "not UTF-8 text"
            return {f"(config.yaml is damaged: {problem})": True}
        return loaded if isinstance(loaded, dict) else {"(config.yaml holds no mapping)": True}
    if summary.is_file():
        try:
            recorded = read_json(summary).get("config")
        except ValueError:
            return {"(summary.json is damaged: truncated or not JSON)": True}
        return recorded if isinstance(recorded, dict) else {"(no config recorded in summary.json)": True}
    return None


def other_config_runs(
    out: Path, specs: Sequence[RunSpec], expected: dict[RunSpec, dict[str, Any]]
) -> dict[RunSpec, dict[str, tuple[Any, Any]]]:
    """The runs whose folder holds a run of another config: ``{spec: {key: (there, now)}}``.

    Raises:
        RunFolderError: a run's folder path is an existing file.
    """
    found: dict[RunSpec, dict[str, tuple[Any, Any]]] = {}
    for s in specs:
        folder = run_dir(out, s)
        if folder.exists() and not folder.is_dir():
            raise RunFolderError(
                f"{str(folder)!r} is a file, but compare keeps the run {s.label} seed {s.seed} there. Move "
                "the file away, or pass another --out."
            )
        recorded = _recorded_config(folder) if folder.is_dir() else None
        if recorded is None:
            continue
        diffs = config_differences(recorded, expected[s])
        if not diffs:  # config.yaml matches: the summary (if any) must too, or it is another run's
            summary = folder / "summary.json"
            if summary.is_file():
                try:
                    recorded = json.loads(summary.read_text()).get("config")
                except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                    recorded = {"(unreadable summary.json)": True}
                if isinstance(recorded, dict):
                    diffs = config_differences(recorded, expected[s])
        if diffs:
            found[s] = diffs
    return found


def other_config_error(out: Path, found: dict[RunSpec, dict[str, tuple[Any, Any]]]) -> RunFolderError:
    """One error naming every run folder of another config, its differing keys, and the two ways out."""
    lines = []
    for s, diffs in list(found.items())[:10]:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in list(diffs.items())[:4])
        more = f" (and {len(diffs) - 4} more keys)" if len(diffs) > 4 else ""
        lines.append(f"  {s.label}/seed{s.seed}: {shown}{more}")
    if len(found) > 10:
        lines.append(f"  ... and {len(found) - 10} more run folders")
    listing = "\n".join(lines)
    return RunFolderError(
        f"--out {str(out)!r} holds {len(found)} run folder(s) trained with another config than this "
        f"comparison asks for:\n{listing}\nNothing was trained or changed. Pass another --out to keep "
        "those runs and start a new comparison, or add --overwrite to retrain them from scratch (their "
        "old run files are deleted)."
    )


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


ONE_SEED = "n/a (1 seed)"


def _mean_std(v: Sequence[float]) -> str:
    """``mean ± std`` in percent over the finite values; a single value is shown alone (no spread)."""
    a = 100 * np.asarray(v, dtype=float)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return "-"
    if a.size == 1:
        return f"{a[0]:.1f}"
    return f"{a.mean():.1f} ± {float(np.std(a, ddof=1)):.1f}"


def _train_share(fractions: Sequence[float | None]) -> str:
    """The share of the training split a method trained on (the rest held out for its own weights)."""
    known = [f for f in fractions if f is not None]
    return f"{100 * float(np.mean(known)):.0f} %" if known else "?"


def _mean_ci(d: np.ndarray) -> str:
    """``mean [lo, hi]`` of paired differences with a bootstrap 95% interval; one seed: no interval."""
    if d.size == 1:
        return f"{d[0]:+.2f} [{ONE_SEED}]"
    lo, hi = bootstrap_ci(d[:, None], lambda r: float(r.mean()))
    return f"{d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}]"


def run_config(config: str | None, spec: RunSpec) -> dict[str, Any]:
    """The resolved config a run of ``spec`` is trained with (as stored in its ``summary.json``)."""
    from ..engine.config import config_to_dict, load_config

    source = spec.config if spec.config is not None else config
    return config_to_dict(load_config(source, [*spec.overrides, "train.progress=false"]))


def finished_summary(
    out: Path, spec: RunSpec, expected: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The run's summary if it finished (and, given ``expected``, was trained with that exact config).

    Raises:
        ValueError: the summary is truncated or damaged (naming it and the fix).
    """
    path = out / spec.label / f"seed{spec.seed}" / "summary.json"
    if not path.exists():
        return None
    summary = read_summary(path)
    if expected is not None and summary.get("config") != expected:
        return None
    return summary


def _ensembles(out: Path, seeds: Sequence[int], modalities: Sequence[str]) -> dict[str, dict[int, float]]:
    """Per seed, the product-rule and mean-rule ensembles of the unimodal runs (where all finished)."""
    ens: dict[str, dict[int, float]] = {"ensemble_product": {}, "ensemble_mean": {}}
    for seed in seeds:
        paths = [out / f"unimodal_{m}" / f"seed{seed}" for m in modalities]
        if all((p / "predictions.npz").exists() for p in paths):
            ens["ensemble_product"][seed] = ensemble_accuracy(paths, "product")
            ens["ensemble_mean"][seed] = ensemble_accuracy(paths, "mean")
    return ens


def _gap_cell(runs: dict[int, dict[str, Any]], joint: dict[int, dict[str, Any]], ep: dict[int, float]) -> str:
    """The fraction of the joint-to-ensemble gap a method closes, with its interval ('' when unpaired)."""
    paired = [s for s in sorted(runs) if s in joint and s in ep]
    if len(paired) == 1:
        return ONE_SEED  # whether there is a gap at all needs seeds to tell
    if len(paired) < 2:
        return ""
    j = np.array([joint[s]["test"]["test_acc"] for s in paired])
    e = np.array([ep[s] for s in paired])
    gap_lo, _ = bootstrap_ci((e - j)[:, None], lambda r: float(r.mean()))
    if gap_lo <= 0:
        # No significant gap between joint training and the ensemble: a fraction of it is noise.
        return "n/a (no gap)"
    f, lo, hi = gap_closed(np.array([runs[s]["test"]["test_acc"] for s in paired]), j, e)
    return f"{f:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _method_row(
    label: str,
    runs: dict[int, dict[str, Any]],
    joint: dict[int, dict[str, Any]],
    ep: dict[int, float],
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
        "test acc": _mean_std([x["test_acc"] for x in t]),
        "test macro-F1": _mean_std([x["test_f1"] for x in t]),
    }
    for m in modalities:
        row[f"{m} unimodal"] = _mean_std([x.get(f"test_acc_{m}", math.nan) for x in t])
        row[f"{m} probe"] = _mean_std([x.get(f"test_probe_{m}", math.nan) for x in t])
    row["imbalance"] = _mean_std([x["test_imbalance"] for x in t])
    row["time/epoch vs none"] = f"{np.median([runs[s]['time_per_epoch'] for s in ss]) / base_time:.2f}"
    if label == "none":
        return row
    paired = [s for s in ss if s in joint]
    if paired:
        d = 100 * np.array([runs[s]["test"]["test_acc"] - joint[s]["test"]["test_acc"] for s in paired])
        row["Δacc vs none (pp)"] = _mean_ci(d)
    if not label.startswith("unimodal_"):
        row["gap closed [95% CI]"] = _gap_cell(runs, joint, ep)
    return row


def _write_tables(out: Path, columns: list[str], rows: list[dict[str, Any]], raw: dict[str, Any]) -> None:
    """results.md (with its notes), results.csv, results.json and the accuracy plot, each written atomically."""
    for r in rows:
        for c in columns:
            r.setdefault(c, "")
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    md += ["", *table_notes(rows)]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.json", json.dumps(raw, indent=2))
    _plot(out, raw)


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
    joint = by_label.get("none", {})
    base_time = np.median([r["time_per_epoch"] for r in joint.values()]) if joint else float("nan")
    seeds = sorted({s.seed for s in specs})
    ens = _ensembles(out, seeds, modalities) if refs else {"ensemble_product": {}, "ensemble_mean": {}}

    columns = ["method", "n", "train data", "test acc", "test macro-F1"]
    columns += [f"{m} unimodal" for m in modalities] + [f"{m} probe" for m in modalities]
    columns += ["imbalance", "time/epoch vs none", "gap closed [95% CI]", "Δacc vs none (pp)"]
    rows = [
        _method_row(label, runs, joint, ens["ensemble_product"], modalities, base_time)
        for label, runs in by_label.items()
    ]
    for label, accs in ens.items():
        if accs:
            ss = sorted(accs)
            row = {"method": label, "n": len(ss), "test acc": _mean_std([accs[s] for s in ss])}
            paired = [s for s in ss if s in joint]
            if paired:
                d = 100 * np.array([accs[s] - joint[s]["test"]["test_acc"] for s in paired])
                row["Δacc vs none (pp)"] = _mean_ci(d)
            rows.append(row)
    raw = {lab: {str(s): r["test"] for s, r in runs.items()} for lab, runs in by_label.items()}
    raw.update({lab: {str(s): {"test_acc": a} for s, a in accs.items()} for lab, accs in ens.items() if accs})
    _write_tables(out, columns, rows, raw)
    return columns, rows


COMPACT_COLUMNS = ("method", "n", "test acc", "Δacc vs none (pp)", "gap closed [95% CI]")


def table_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The notes printed under the tables (how to read the cells)."""
    notes = [
        "test acc: fused test accuracy (%), mean ± std over seeds. Δacc vs none: paired (same seed) "
        "difference to joint training, with a 95% bootstrap interval over seeds. gap closed: fraction of "
        "the joint-to-ensemble gap closed (n/a when that gap is not significantly above zero).",
    ]
    partial = [str(r["method"]) for r in rows if r.get("train data") not in ("100 %", "?", None, "")]
    if partial:
        notes.append(
            f"train data: the share of the training split a method trains on; {', '.join(partial)} hold "
            "the rest out of training to fit their own weights (never val or test)."
        )
    if any(r.get("n") == 1 for r in rows):
        notes.append(f'With a single seed a value has no ± spread and its interval reads "{ONE_SEED}".')
    return notes


def results_table(rows: Sequence[dict[str, Any]], title: str, seeds: int | None = None) -> Table:
    """The compact terminal table (it fits 80 columns; no cell is cut, a too long word folds).

    Columns: ``COMPACT_COLUMNS`` less those empty in every row, and less ``n`` when every row has
    ``seeds`` runs (the title says how many); the full table is in results.md/csv.
    """
    columns = [c for c in COMPACT_COLUMNS if any(str(r.get(c, "")) for r in rows)]
    if seeds is not None and all(r.get("n") == seeds for r in rows):
        columns.remove("n")
    table = Table(
        title=Text(title), box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
    for c in columns:
        table.add_column(Text(c), overflow="fold", justify="left" if c == "method" else "right")
    for r in rows:  # Text, not markup: "[n/a (1 seed)]" would read as a style tag
        table.add_row(*[Text(str(r.get(c, ""))) for c in columns])
    return table


def print_results(
    console: Console, title: str, rows: Sequence[dict[str, Any]], out: Path, seeds: int | None = None
) -> None:
    """Print the compact table, its notes, and where the full tables are."""
    console.print(results_table(rows, title, seeds))
    for note in table_notes(rows):
        console.print(note, highlight=False, markup=False)
    plot = out / "results.png"
    console.print(
        "Full table (macro-F1, per-modality unimodal and probe accuracy, imbalance, time/epoch): "
        f"{out / 'results.md'}, {out / 'results.csv'}"
        + (f"; plot: {plot}" if plot.is_file() else f"; no plot ({PLOTS_INSTALL} to draw it)"),
        highlight=False,
        markup=False,
    )


def results_figure(raw: dict[str, dict[str, dict[str, float]]]) -> Any:
    """The bar chart of test accuracy per method (mean ± std over seeds), accuracy axis 0 to 100.

    Returns the matplotlib figure (the caller saves and closes it). Raises ImportError without
    matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(raw)
    values = [[100 * v["test_acc"] for v in raw[k].values()] for k in labels]
    means = [float(np.mean(v)) for v in values]
    stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
    single = all(len(v) == 1 for v in values)
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels)), 3.5))
    ax.bar(range(len(labels)), means, yerr=None if single else stds, capsize=3, color="#4477aa")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    title = "1 seed (no error bars)" if single else "mean ± std over seeds"
    if "none" in labels:
        ax.axhline(means[labels.index("none")], color="0.4", ls="--", lw=1)
        title += "; dashed: joint training (none)"
    ax.set_title(title, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    return fig


def _plot(out: Path, raw: dict[str, dict[str, dict[str, float]]]) -> None:
    """``results.png``; without matplotlib none (an earlier one is removed: it would not match the tables)."""
    try:
        fig = results_figure(raw)
    except ImportError:
        (out / "results.png").unlink(missing_ok=True)
        return
    import matplotlib.pyplot as plt

    tmp = out / ".results.png.tmp"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(out / "results.png")


def execute_runs(
    out: Path,
    specs: Sequence[RunSpec],
    config: str | None,
    *,
    jobs: int,
    threads: int,
    overwrite: bool,
    console: Console,
) -> tuple[dict[RunSpec, dict[str, Any]], list[tuple[str, str]]]:
    """Train every run of ``specs`` that has not finished (in parallel with ``jobs``), resumably.

    Before any training every run folder is checked against the config its run asks for; one holding a
    run of another config stops everything (a :class:`RunFolderError` naming the folders and keys)
    unless ``overwrite``, which retrains those runs from scratch. Before the first run it prints how
    many runs are to train and an estimate of the time (:func:`time_estimate`), then names each run
    when it starts and when it ends. Returns each spec's resolved config and the ``(folder, error)`` of
    the runs that failed (the others go on).

    Raises:
        Interrupted: SIGINT / SIGTERM stopped the runs (see :mod:`equimodal.utils.workers`): the runs in
            flight stopped with a checkpoint at their next optimizer step, the rest did not start.
    """
    expected = {s: run_config(config, s) for s in specs}
    check_writable_folder(out)
    other = other_config_runs(out, specs, expected)
    if other and not overwrite:
        raise other_config_error(out, other)
    todo = [s for s in specs if s in other or finished_summary(out, s, expected[s]) is None]
    check_runs({f"{s.label}/seed{s.seed}": expected[s] for s in todo})
    missing = figures_missing()
    if missing:
        console.print(missing, highlight=False, markup=False)
    again = f" ({len(other)} of another config, retrained from scratch: --overwrite)" if other else ""
    console.print(
        f"{len(specs)} runs, {len(specs) - len(todo)} already finished, {len(todo)} to run{again} in {out}",
        highlight=False,
        markup=False,
    )
    work = [(s.config or config, s.overrides, str(run_dir(out, s)), threads, s in other) for s in todo]
    names = [f"{s.label}/seed{s.seed}" for s in todo]
    failures: list[tuple[str, str]] = []
    with stop_signals() as stop:
        if todo:
            console.print(
                time_estimate(out, specs, todo, expected, (jobs, threads)), highlight=False, markup=False
            )
        outcome = run_tasks(_run_one, work, jobs, _run_hooks(console, names, work, failures), stop)
    if outcome.signum is not None:
        raise stopped_error(outcome, names, failures)
    return expected, failures


def _run_hooks(
    console: Console, names: Sequence[str], work: Sequence[tuple[Any, ...]], failures: list[tuple[str, str]]
) -> Hooks:
    """Print ``[k/N] start NAME`` when a run starts and ``[k/N] done NAME (time)`` or FAILED when it ends."""
    started: dict[int, tuple[int, float]] = {}

    def start(i: int) -> None:
        started[i] = (len(started) + 1, time.perf_counter())
        console.print(f"[{started[i][0]}/{len(names)}] start {names[i]}", highlight=False, markup=False)

    def done(i: int, value: Any, error: str | None) -> None:
        k, tic = started[i]
        error = error or (value[1] if value else None)
        if error:
            console.print(
                f"[{k}/{len(names)}] {escape(names[i])} [red]FAILED[/]: {escape(error)}", highlight=False
            )
            failures.append((str(work[i][2]), error))
        else:
            took = duration(time.perf_counter() - tic)
            console.print(f"[{k}/{len(names)}] done {names[i]} ({took})", highlight=False, markup=False)

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False)

    return Hooks(start, done, say, names.__getitem__)


def _listed(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def stopped_error(outcome: Outcome, names: Sequence[str], failures: Sequence[tuple[str, str]]) -> Interrupted:
    """The :class:`Interrupted` of stopped runs: what stopped, what was killed, what did not start."""
    signum = int(outcome.signum or signal.SIGTERM)
    parts = [
        f"{signal.Signals(signum).name} stopped the runs; no results table was written (it needs every run)."
    ]
    if outcome.stopped:
        stopped = _listed([names[i] for i in outcome.stopped])
        parts.append(
            f"Stopped (a run in training wrote its checkpoint at its next optimizer step): {stopped}."
        )
    if outcome.killed:
        killed = _listed([names[i] for i in outcome.killed])
        parts.append(f"Killed before they stopped (they resume from their last checkpoint): {killed}.")
    if outcome.not_started:
        parts.append(f"{len(outcome.not_started)} run(s) not started.")
    if failures:
        parts.append(f"{len(failures)} run(s) failed (named above).")
    parts.append("Rerun the same command to resume: finished runs are kept, stopped ones go on.")
    return Interrupted(signum, " ".join(parts))


def duration(seconds: float) -> str:
    """``42 s``, ``12.5 min`` or ``3.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def time_estimate(
    out: Path,
    specs: Sequence[RunSpec],
    todo: Sequence[RunSpec],
    expected: dict[RunSpec, dict[str, Any]],
    execution: tuple[int, int],
) -> str:
    """One line: how many runs are to train and about how long that takes; it never raises.

    From the finished runs in ``out`` when there are any (their median ``time_per_epoch`` x each
    missing run's epochs), else from a few timed optimizer steps of the first missing run's config
    (:func:`timed_step`); divided by the runs in parallel. ``execution`` is ``(jobs, threads)``.
    """
    jobs, threads = execution
    head = f"To train: {len(todo)} run(s) with --jobs {jobs}"
    epochs = sum(int(expected[s]["train"]["epochs"]) for s in todo)
    try:
        finished = [finished_summary(out, s, expected[s]) for s in specs if s not in todo]
        per_epoch = [float(f["time_per_epoch"]) for f in finished if f is not None]
        per_epoch = [t for t in per_epoch if math.isfinite(t)]
        fixed = 0.0
        if per_epoch:
            per = statistics.median(per_epoch)
            basis = (
                f"the {len(per_epoch)} finished run(s) in {out}: {per:.2f} s per training epoch (median) x "
                "epochs; validation and start-up add to it"
            )
        else:
            cost = timed_step(expected[todo[0]], threads)
            per = cost.per_epoch
            basis = (
                f"timed steps of {todo[0].label}/seed{todo[0].seed}: {1e3 * cost.step:.0f} ms x {cost.steps} "
                f"steps and {cost.evaluation:.1f} s of validation per epoch, {cost.start:.1f} s to start, the "
                "same for every run"
            )
            fixed = (cost.start + 2 * cost.evaluation) * len(todo)  # start-up; the final val and test pass
    except Exception as exc:  # noqa: BLE001 - an estimate never fails the command
        return f"{head}; no time estimate ({type(exc).__name__}: {exc})."
    total = (per * epochs + fixed) / max(1, min(jobs, len(todo)))
    return f"{head}: about {duration(total)} (an estimate from {basis})."


@dataclass(frozen=True)
class RunCost:
    """What one run of a config costs, timed in the driver: seconds per optimizer step, steps per
    epoch, seconds of one validation pass, and seconds to load the data and build the run."""

    step: float
    steps: int
    evaluation: float
    start: float

    @property
    def per_epoch(self) -> float:
        return self.step * self.steps + self.evaluation


def timed_step(resolved: dict[str, Any], threads: int, steps: int = 3) -> RunCost:
    """What one run of a resolved config costs (see :class:`RunCost`), built as ``train`` builds it on
    its device: the median of up to ``steps`` optimizer steps after a warm-up one, within about 5 s, and
    one forward pass over a validation batch scaled to the split."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time_steps(resolved, steps)
    finally:
        torch.set_num_threads(previous)
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the runs, not this estimate, should hold the GPU's memory


def _time_steps(resolved: dict[str, Any], steps: int) -> RunCost:
    """Build a run's parts as ``train`` does and time its steps and its validation (see :func:`timed_step`)."""
    import torch

    from ..balancers import EpochData
    from ..data import load_dataset
    from ..data.base import make_loader
    from ..engine.config import config_from_dict
    from ..engine.trainer import build_optimizer, build_parts, seed_everything, select_device
    from ..testing import drive_step, start_epoch

    begin = time.perf_counter()
    cfg = config_from_dict(resolved)
    seed_everything(cfg.train.seed)
    ds = load_dataset(cfg.data.name, seed=cfg.train.seed, **cfg.data.options)
    device = select_device(cfg.train.device)
    model, balancer, _ = build_parts(cfg, ds, device)
    optimizer = build_optimizer(cfg, [*model.parameters(), *balancer.parameters()])
    loader = make_loader(ds.train, cfg.data.batch_size, train=True, seed=0)
    batch, y = next(iter(loader))
    batch, y = {k: v.to(device) for k, v in batch.items()}, y.to(device)
    one = [(batch, y)]
    start_epoch(balancer, 0, EpochData(train=lambda: iter(one), heldout=lambda: iter(one), device=device))
    start = time.perf_counter() - begin
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) <= steps and (not times or time.perf_counter() - begin < 5.0):
        tic = time.perf_counter()
        drive_step(balancer, model, batch, y, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tic)
    val = make_loader(ds.val, cfg.data.eval_batch_size)
    inputs, _ = next(iter(val))
    tic = time.perf_counter()
    with torch.no_grad():
        model.eval()
        model({k: v.to(device) for k, v in inputs.items()})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    evaluation = (time.perf_counter() - tic) * len(val)
    step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return RunCost(step, len(loader), evaluation, start)


def print_failures(console: Console, failures: Sequence[tuple[str, str]]) -> int:
    """Print the failed runs (and how to retry them); returns the exit code (1 if any failed)."""
    if not failures:
        return 0
    console.print(f"[bold red]{len(failures)} run(s) failed[/] (rerun the same command to retry them):")
    for done, error in failures:
        console.print(f"  {done}: {error}")
    return 1


def run_compare(args: argparse.Namespace) -> int:
    """CLI entry: run missing runs (in parallel with ``--jobs``), then print and write the tables.

    Before any training every run folder is checked against the config its run asks for; one holding
    a run of another config stops the comparison (a :class:`RunFolderError` naming the folders and
    keys) unless ``args.overwrite``, which retrains those runs from scratch.
    """
    from ..data import load_dataset
    from ..engine.config import describe_recipe, load_config, resolve_recipe

    seeds = check_count(args.seeds, "seeds", "the number of seeds, run as 0..N-1", "3")
    n_jobs = check_count(getattr(args, "jobs", 1), "jobs", "runs in parallel", "1")
    threads = check_count(getattr(args, "threads", 1), "threads", "torch threads per run", "1")
    overwrite = bool(getattr(args, "overwrite", False))
    config, base = resolve_recipe(args.config, args.dataset)
    base += list(args.set or [])
    cfg = load_config(config, base)
    from ..balancers import list_balancers

    balancers = [b.strip() for b in args.balancers.split(",") if b.strip()]
    valid = list_balancers()
    for b in balancers:
        if b not in valid:
            from ..registry import unknown_name_error

            raise unknown_name_error("balancer", b, valid)
    modalities = load_dataset(cfg.data.name, seed=0, **cfg.data.options).modalities
    refs = not args.no_references
    variants = [parse_variant(v) for v in args.variant or []]
    specs = run_specs(base, balancers, modalities, seeds, refs, variants)
    out = Path(args.out)
    console = Console()
    console.print(f"Recipe: {describe_recipe(config, cfg)}", highlight=False, markup=False)
    with claim_folder(out):  # one comparison per folder: a second is refused, naming this one
        expected, failures = execute_runs(
            out, specs, config, jobs=n_jobs, threads=threads, overwrite=overwrite, console=console
        )
        _, rows = summarise(out, specs, modalities, refs, expected)
    spread = "1 seed" if seeds == 1 else f"mean ± std over {seeds} seeds"
    title = f"{cfg.data.name}: test metrics, {spread} (epoch chosen on val)"
    print_results(console, title, rows, out, seeds)
    return print_failures(console, failures)
