"""``equimodal report``: a self-contained HTML page of run, comparison, study or diagnosis folders.

Every figure is a PNG embedded in the page (``data:`` URIs): the page needs no network and no other
file, so it can be mailed or attached to a paper's supplement. What it shows:

- for each **run folder** (written by ``equimodal train --out``): the selected epoch's figures (val and
  test: fused accuracy and macro-F1, each modality's unimodal accuracy, linear probe and the fused
  accuracy without it); fused and per-modality accuracy over epochs, training (running) and validation;
  the imbalance (spread of the per-modality accuracies) and the training loss over epochs; the
  balancer's own statistics over optimizer steps (``steps.csv``: one panel per statistic, a line per
  modality; AMSS's kept fraction per layer as a heat map); the confusion matrix of the selected epoch on
  test, with class names; the per-modality unimodal, probe and removal accuracies;
- for a **comparison folder** (written by ``equimodal compare --out``): the method table
  (``results.md``), the test accuracy per method with its spread over seeds, the paired difference to
  joint training with its bootstrap 95 % interval, and each method's mean validation curves;
- for a **study folder** (``equimodal study``): its claim, setting, tables per part and figure;
- for a **diagnosis folder** (``equimodal diagnose``): the verdict, what to try, the per-modality table
  and the per-modality curves.

Every folder is read through its files' module (:class:`~equimodal.engine.run_folder.RunFolder`,
:mod:`equimodal.reporting.folders`) and drawn from the data alone (a diagnosis from its JSON): the page
knows nothing of the commands that wrote the folders. Several folders give one page, a section each. The page carries a one-line script that, once loaded,
counts the figures that decoded (``<body data-figures="loaded/total">``); the tests open it in headless
Chromium and check that count.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.run_folder import REPORT, STEPS, SUMMARY, RunFolder
from ..utils.io import DAMAGED, atomic_write_text
from .figures import diagnosis_figure, pyplot, results_figure
from .folders import TABLES_FIX, ComparisonFiles, DiagnosisFiles, StudyFiles, folder_kind
from .statistics import paired_differences
from .tables import DIAGNOSIS_HEADER, diagnosis_cells, t_interval_text

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#f4f4f4}figure{margin:1em 0}img{max-width:100%}figcaption{font-size:.85em;color:#555}
.path{font-family:monospace;font-size:.85em;color:#555}.note{font-size:.85em;color:#555}
"""
CHECK = (
    "<script>window.addEventListener('load',function(){var i=Array.prototype.slice.call(document.images);"
    "var ok=i.filter(function(x){return x.complete&&x.naturalWidth>0}).length;"
    "document.body.setAttribute('data-figures',ok+'/'+i.length);});</script>"
)


# ------------------------------------------------------------------------------------------- figures
def figure_html(fig: Any, caption: str) -> str:
    """The figure as an embedded PNG with its caption (the figure is closed)."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    alt = html.escape(caption, quote=True)
    return (
        f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table (cells escaped)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else ""


def _series(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    return [scale * r[key] if isinstance(r.get(key), float) else math.nan for r in rows]


def accuracy_figure(rows: list[dict[str, Any]], modalities: list[str], chosen: int | None) -> Any:
    """Fused and per-modality accuracy over epochs: validation solid, running training accuracy dashed."""
    plt = pyplot()
    names = ["fused", *modalities]
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 2.8), squeeze=False, sharey=True)
    epochs = _series(rows, "epoch")
    for ax, name in zip(axes[0], names, strict=True):
        suffix = "" if name == "fused" else f"_{name}"
        ax.plot(epochs, _series(rows, f"val_acc{suffix}", 100), label="val")
        ax.plot(epochs, _series(rows, f"train_acc{suffix}", 100), ls="--", label="train (running)")
        if chosen is not None:
            ax.axvline(chosen, color="0.5", ls=":", lw=1)
        ax.set(title=name, xlabel="epoch", ylim=(0, 100))
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def imbalance_figure(rows: list[dict[str, Any]], modalities: list[str]) -> Any:
    """The spread of the per-modality accuracies (max - min) over epochs, and the training loss."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 2.8))
    epochs = _series(rows, "epoch")
    for split in ("val", "train"):
        per = np.array([_series(rows, f"{split}_acc_{m}", 100) for m in modalities])
        spread = np.nanmax(per, 0) - np.nanmin(per, 0) if per.size and not np.all(np.isnan(per)) else []
        if len(spread):
            left.plot(epochs, spread, ls="-" if split == "val" else "--", label=split)
    left.set(title="imbalance: max - min of the modalities' accuracies", xlabel="epoch", ylabel="pp")
    left.title.set_fontsize(9)
    left.legend(fontsize=7)
    right.plot(epochs, _series(rows, "train_loss"), color="k")
    right.set(title="training loss", xlabel="epoch")
    fig.tight_layout()
    return fig


def _smooth(values: list[float], width: int) -> np.ndarray:
    """A centred running mean (NaNs ignored), so that per-step noise does not hide the trend."""
    a = np.asarray(values, dtype=float)
    if width <= 1 or a.size < 3:
        return a
    kernel = np.ones(width)
    ok = np.isfinite(a)
    num = np.convolve(np.where(ok, a, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(float), kernel, mode="same")
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def stat_groups(keys: Sequence[str], modalities: Sequence[str]) -> dict[str, list[str]]:
    """Per-modality statistics grouped by name: ``{"k": ["k/audio", "k/visual"], ...}`` (layers apart)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        name, _, rest = key.partition("/")
        if name == "layer_kept" or rest not in modalities:
            continue
        groups.setdefault(name, []).append(key)
    return groups


def steps_figure(steps: list[dict[str, Any]], modalities: list[str]) -> Any | None:
    """The balancer's per-modality statistics over optimizer steps (one panel each), or ``None``."""
    keys = list(dict.fromkeys(k for r in steps for k in r))
    groups = stat_groups(keys, modalities)
    if not groups:
        return None
    plt = pyplot()
    cols = min(4, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 2.5 * nrows), squeeze=False)
    x = _series(steps, "step")
    width = max(1, len(steps) // 50)
    for ax, (name, members) in zip(axes.flat, groups.items(), strict=False):
        for key in members:
            ax.plot(x, _smooth(_series(steps, key), width), lw=1, label=key.split("/", 1)[1])
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_axis_off()
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("optimizer step", fontsize=8)
    fig.tight_layout()
    return fig


def layers_figure(steps: list[dict[str, Any]]) -> Any | None:
    """AMSS's kept fraction per masked layer over steps, as a heat map (``layer_kept/...``), or ``None``."""
    keys = [k for k in dict.fromkeys(k for r in steps for k in r) if k.startswith("layer_kept/")]
    if not keys:
        return None
    plt = pyplot()
    grid = np.array([_series(steps, k) for k in keys])
    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.22 * len(keys)))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(range(len(keys)), [k[len("layer_kept/") :] for k in keys], fontsize=6)
    ax.set_xlabel(f"recorded step ({STEPS} row)", fontsize=8)
    fig.colorbar(image, ax=ax, label="kept fraction")
    fig.tight_layout()
    return fig


def confusion_figure(labels: np.ndarray, logits: np.ndarray, names: Sequence[str]) -> Any:
    """Row-normalised confusion matrix (true class by row) with the counts written in each cell."""
    plt = pyplot()
    k = len(names)
    counts = np.zeros((k, k), dtype=int)
    np.add.at(counts, (labels.astype(int), logits.argmax(1)), 1)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = min(12, 2 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true")
    if k <= 25:
        for i in range(k):
            for j in range(k):
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6, color=color)
    fig.tight_layout()
    return fig


def modalities_figure(test: dict[str, Any], modalities: list[str]) -> Any:
    """Per modality on test: its unimodal accuracy, its linear probe, and the fused accuracy without it."""
    plt = pyplot()
    kinds = [("unimodal head", "test_acc_{}"), ("linear probe", "test_probe_{}"),
             ("fused without it", "test_removed_{}")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(modalities) + 1.5), 2.8))
    width = 0.8 / len(kinds)
    for i, (label, key) in enumerate(kinds):
        values = [100 * test.get(key.format(m), math.nan) for m in modalities]
        ax.bar(np.arange(len(modalities)) + (i - 1) * width, values, width, label=label)
    if isinstance(test.get("test_acc"), float):
        ax.axhline(100 * test["test_acc"], color="k", ls="--", lw=1, label="fused")
    ax.set_xticks(range(len(modalities)), modalities)
    ax.set(ylim=(0, 100), ylabel="test accuracy (%)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, frameon=False)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ sections
def summary_table(summary: dict[str, Any], modalities: list[str]) -> str:
    """The selected epoch's val and test figures (the CLI's table, as HTML)."""
    val, test = summary.get("val", {}), summary.get("test", {})
    rows = [
        ["fused accuracy", _pct(val.get("val_acc")), _pct(test.get("test_acc"))],
        ["fused macro-F1", _pct(val.get("val_f1")), _pct(test.get("test_f1"))],
    ]
    for m in modalities:
        rows.append(
            [f"{m}: unimodal accuracy", _pct(val.get(f"val_acc_{m}")), _pct(test.get(f"test_acc_{m}"))]
        )
        rows.append(
            [f"{m}: linear probe", _pct(val.get(f"val_probe_{m}")), _pct(test.get(f"test_probe_{m}"))]
        )
        rows.append([f"fused without {m}", "", _pct(test.get(f"test_removed_{m}"))])
    rows.append(["imbalance (spread)", _pct(val.get("val_imbalance")), _pct(test.get("test_imbalance"))])
    return table_html(["metric (%)", "val", "test"], [r for r in rows if r[1] or r[2]])


def run_section(run: Path) -> str:
    """The HTML of one run folder (see the module docstring)."""
    folder = RunFolder(run)
    rows = folder.read_metrics()
    if not rows:
        raise ValueError(f"{folder.metrics} has no epoch rows yet: let the run finish an epoch first.")
    summary = folder.read_summary(keys=()) if folder.summary.is_file() else {}
    config = summary.get("config", {})
    modalities = summary.get("modalities") or sorted(
        {k[len("val_acc_") :] for k in rows[0] if k.startswith("val_acc_")}
    )
    chosen = summary.get("selected_epoch")
    title = (
        f"{summary.get('dataset', '?')} / {summary.get('balancer', '?')} / seed {summary.get('seed', '?')}"
    )
    parts = [f"<h2>{html.escape(title)}</h2><p class=path>{html.escape(str(run))}</p>"]
    if summary:
        parts.append(f"<p>Epoch {chosen} selected on validation accuracy, then evaluated once on test.</p>")
        parts.append(summary_table(summary, modalities))
    else:
        parts.append(f"<p class=note>No {SUMMARY}: the run has not finished; curves so far.</p>")
    parts.append(
        figure_html(
            accuracy_figure(rows, modalities, chosen),
            "Accuracy over epochs, fused and per modality: validation (solid) and running training accuracy (dashed); dotted: the selected epoch.",
        )
    )  # noqa: E501
    parts.append(
        figure_html(
            imbalance_figure(rows, modalities),
            "Imbalance over epochs (spread of the per-modality accuracies) and the training loss.",
        )
    )  # noqa: E501
    steps = folder.read_steps()
    name = config.get("balancer", {}).get("name", summary.get("balancer", "the balancer"))
    for fig, caption in (
        (
            steps_figure(steps, modalities),
            f"The statistics {name} reports at each optimizer step ({STEPS}; running mean).",
        ),  # noqa: E501
        (layers_figure(steps), "Kept fraction of each masked layer over the recorded steps (AMSS)."),
    ):
        if fig is not None:
            parts.append(figure_html(fig, caption))
    if not steps:
        parts.append(f"<p class=note>No per-step statistics ({name} reports none, or {STEPS} is off).</p>")
    parts += _test_figures(folder, summary, modalities)
    return "\n".join(parts)


def _test_figures(folder: RunFolder, summary: dict[str, Any], modalities: list[str]) -> list[str]:
    """The confusion matrix and the per-modality bars of a finished run."""
    parts = []
    if folder.predictions.is_file():
        data = folder.read_predictions(keys=("test_labels", "test_logits"))
        labels, logits = data["test_labels"], data["test_logits"]
        names = [str(c) for c in data["class_names"]] if "class_names" in data else None
        names = names or [str(i) for i in range(logits.shape[1])]
        parts.append(
            figure_html(
                confusion_figure(labels, logits, names),
                "Confusion matrix of the selected epoch on test (counts; colour: the row's share).",
            )
        )  # noqa: E501
    if summary.get("test"):
        parts.append(
            figure_html(
                modalities_figure(summary["test"], modalities),
                "Per modality on test: the model's unimodal head, a linear probe on the frozen encoder (encoder quality), and the fused accuracy with the modality removed.",
            )
        )  # noqa: E501
    return parts


def differences_figure(diffs: list[tuple[str, float, float, float]]) -> Any:
    """Paired differences to joint training with their intervals (horizontal bars)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.3 * len(diffs)))
    y = np.arange(len(diffs))
    means = [d[1] for d in diffs]
    lows = [d[1] - d[2] if math.isfinite(d[2]) else 0 for d in diffs]
    highs = [d[3] - d[1] if math.isfinite(d[3]) else 0 for d in diffs]
    colors = ["#4477aa" if d[2] > 0 else "#cc6677" if d[3] < 0 else "0.6" for d in diffs]
    ax.barh(y, means, xerr=[lows, highs], color=colors, capsize=3)
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(y, [d[0] for d in diffs], fontsize=8)
    ax.set_xlabel("test accuracy minus joint training's, same seed (pp)")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def method_curves_figure(folder: Path, labels: Sequence[str]) -> Any | None:
    """Each method's validation accuracy over epochs, the mean over its seeds' run folders."""
    curves = {}
    for label in labels:
        runs = [RunFolder(p).read_metrics() for p in sorted((folder / label).glob("seed*")) if p.is_dir()]
        runs = [r for r in runs if r]
        if runs and not label.startswith(("unimodal_", "ensemble_")):
            length = min(len(r) for r in runs)
            curves[label] = np.nanmean([_series(r[:length], "val_acc", 100) for r in runs], 0)
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for label, curve in curves.items():
        ax.plot(range(len(curve)), curve, lw=1.5 if label == "none" else 1, ls="--" if label == "none" else "-",
                label=label)  # fmt: skip
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", ylim=(0, 100))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def compare_section(folder: Path) -> str:
    """The HTML of a comparison folder: its table, accuracy per method, paired differences, curves."""
    files = ComparisonFiles(folder)
    raw = files.read_raw()
    parts = [f"<h2>Comparison</h2><p class=path>{html.escape(str(folder))}</p>"]
    table = files.read_table()
    if table is not None:
        parts.append(table_html(*table))
    parts += [f"<p class=note>{html.escape(n.strip())}</p>" for n in files.read_notes() if n.strip()]
    parts.append(
        figure_html(
            results_figure(raw),
            "Test accuracy per method, mean and standard deviation over seeds; dashed: joint training.",
        )
    )  # noqa: E501
    diffs = paired_differences(raw)
    if diffs:
        parts.append(
            figure_html(
                differences_figure(diffs),
                "Paired difference to joint training (same seed), mean and bootstrap 95 % interval over seeds; blue: above zero, red: below, grey: the interval contains zero.",
            )
        )  # noqa: E501
    curves = method_curves_figure(folder, list(raw))
    if curves is not None:
        parts.append(figure_html(curves, "Validation accuracy over epochs, mean over each method's seeds."))
    return "\n".join(parts)


def diagnosis_section(folder: Path) -> str:
    """The HTML of a diagnosis folder: verdict, what to try, the per-modality table and the curves, all
    drawn from its JSON."""
    files = DiagnosisFiles(folder)
    raw = files.read()
    try:
        rows = [diagnosis_cells(m, f) for m, f in raw["modalities"].items()]
        headroom = t_interval_text(**raw["headroom"])
        figure = diagnosis_figure(raw.get("curves", {}), list(raw["modalities"]))
        head = [
            f"<h2>Diagnosis: {html.escape(str(raw['dataset']))} ({raw['seeds']} seeds)</h2>",
            f"<p class=path>{html.escape(str(folder))}</p>",
            f"<p><b>Verdict.</b> {html.escape(raw.get('verdict', ''))}</p>",
            f"<p><b>What to try.</b> {html.escape(raw.get('recommendation', ''))}</p>",
            f"<p>Joint training {raw['joint']:.1f} %, product-rule ensemble {raw['ensemble']:.1f} %, headroom "
            f"{html.escape(headroom)} pp.</p>",
        ]
    except (TypeError, KeyError, AttributeError, ValueError) as err:
        raise ValueError(
            f"{str(files.json)!r} is not a diagnosis ({type(err).__name__}: {err}): {DAMAGED}. {TABLES_FIX}"
        ) from None
    caption = (
        "Validation accuracy per modality: the branch trained alone and its head inside joint training; "
        "last panel: the joint model."
    )
    return "\n".join([*head, table_html(DIAGNOSIS_HEADER, rows), figure_html(figure, caption)])


def study_section(folder: Path) -> str:
    """The HTML of a study folder: its markdown (claim, setting, tables per part) and its figure."""
    files = StudyFiles(folder)
    raw = files.read()
    stem = StudyFiles.stem(raw["study"], raw.get("mode", "quick"))
    markdown, png = files.read_markdown(stem), files.tables(stem).figure
    out: list[str] = [f"<p class=path>{html.escape(str(folder))}</p>"]
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            out.append(table_html(table[0], table[2:] if len(table) > 1 else []))
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h3>{html.escape(line[3:])}</h3>")
        elif line.startswith("# "):
            out.insert(0, f"<h2>Study: {html.escape(line[2:])}</h2>")
        elif line.startswith("![") and png.is_file():
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(raw["study"], quote=True)}" '
                       f'src="data:image/png;base64,{data}"><figcaption>Test accuracy per cell, mean and '
                       "spread over seeds.</figcaption></figure>")  # fmt: skip
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ page
def build_page(folders: Sequence[Path]) -> str:
    """The whole HTML page for ``folders`` (run, comparison, study or diagnosis folders, checked first)."""
    kinds = [(Path(f), folder_kind(Path(f))) for f in folders]
    make = {
        "compare": compare_section,
        "run": run_section,
        "diagnosis": diagnosis_section,
        "study": study_section,
    }
    sections = [make[kind](p) for p, kind in kinds]
    title = "equimodal report: " + ", ".join(p.name or str(p) for p, _ in kinds)
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(sections)
        + f"\n{CHECK}</body></html>\n"
    )


def write_report(folders: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write the HTML report of ``folders`` and return its path.

    Without ``out``, a single folder's page is ``FOLDER/report.html``; several folders need ``out``.

    Raises:
        ValueError: no folder, several without ``out``, ``out`` a folder or not ``.html``, or a folder that
            is neither a run nor a comparison. FileNotFoundError: a missing folder. ImportError: no matplotlib.
    """
    paths = [Path(f) for f in folders]
    if not paths:
        raise ValueError("report needs at least one run, comparison, study or diagnosis folder.")
    if out is None:
        if len(paths) > 1:
            raise ValueError(
                f"{len(paths)} folders go into one page: pass --out PAGE.html (e.g. --out {REPORT})."
            )
        target = paths[0] / REPORT
    else:
        target = Path(out)
        if target.is_dir():
            raise ValueError(f"--out {str(target)!r} is a folder; pass a file path ending in .html.")
    if target.suffix.lower() not in (".html", ".htm"):
        raise ValueError(
            f"--out {str(target)!r}: expected a page ending in .html (or an image path .png/.pdf/.svg for "
            "the learning-curve figure alone)."
        )
    page = build_page(paths)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, page)
    return target
