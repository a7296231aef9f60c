"""``equimodal diagnose``: does a multimodal model suffer from modality imbalance, where, and how much?

It trains, under the same budget and seeds, the joint model (``none`` with ``monitor=True``, which logs
each encoder's share of the gradient norm) and each modality's branch alone (``unimodal``), or reads
such runs from a ``compare`` folder (``runs=``). Then, per modality:

- **alone**: test accuracy of the branch trained alone;
- **head** and **probe** inside joint training: the joint model's unimodal head and a linear probe on its
  frozen encoder (encoder quality, independent of the head's scaling);
- **probe deficit**: alone minus the probe inside joint training, paired by seed, with a Student-t 95 %
  interval: how far joint training leaves the encoder below what it learns alone (under-training);
- **learning speed**: epochs until the branch alone first reaches 90 % of its best validation accuracy;
- **gradient share**: the modality's share of the encoders' squared gradient norm during joint training
  (first 5 epochs, and all);

and the **headroom**: the product-rule ensemble of the separately trained branches minus joint training,
paired by seed, with its interval. The verdict says whether there is imbalance worth fixing (the
headroom's interval above zero), which encoder is under-trained (the largest probe deficit whose interval
is above zero) and what to try, from the evidence in ``docs/diagnose.md``. It writes ``diagnosis.md``,
``diagnosis.json`` and ``diagnosis.png`` (per-modality learning curves) into the output folder;
``equimodal report`` renders a diagnosis folder too.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..engine.preflight import figures_missing
from ..utils.claim import claim_folder
from ..utils.io import atomic_write_text, read_summary
from .compare import (
    RunsFailed,
    RunSpec,
    check_count,
    ensemble_accuracy,
    execute_runs,
    finished_summary,
    print_failures,
)

SPEED_FRACTION = 0.9
EARLY_EPOCHS = 5


@dataclass
class Interval:
    """A mean (pp or %) with its Student-t 95 % interval over seeds (NaN bounds with one seed)."""

    mean: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The interval lies above zero."""
        return bool(np.isfinite(self.low) and self.low > 0)

    def __str__(self) -> str:
        if not np.isfinite(self.low):
            return f"{self.mean:+.2f} (1 seed: no interval)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


@dataclass
class ModalityFigures:
    """What ``diagnose`` measures for one modality (accuracies in %, speed in epochs)."""

    alone: float
    head: float
    probe: float
    probe_deficit: Interval
    speed_alone: float
    speed_joint: float
    grad_share_early: float
    grad_share: float


@dataclass
class Diagnosis:
    """The result of :func:`diagnose` (also ``diagnosis.json``)."""

    dataset: str
    seeds: int
    joint: float
    ensemble: float
    headroom: Interval
    modalities: dict[str, ModalityFigures] = field(default_factory=dict)
    verdict: str = ""
    recommendation: str = ""
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)


# Student's t 0.975 quantiles for 1..30 degrees of freedom (beyond: the normal 1.96).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)  # fmt: skip


def _paired(a: dict[int, float], b: dict[int, float]) -> Interval:
    """Mean of ``a - b`` over the seeds both have (in pp), with a Student-t 95 % interval.

    A t interval rather than the bootstrap of ``compare``: with the few seeds a diagnosis usually has,
    a bootstrap interval is too narrow (two seeds give the range of two numbers); the t interval widens
    honestly (two seeds: 12.7 standard errors).
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return Interval(float("nan"), float("nan"), float("nan"))
    d = 100 * np.array([a[s] - b[s] for s in seeds])
    if d.size < 2:
        return Interval(float(d.mean()), float("nan"), float("nan"))
    t = T975[d.size - 2] if d.size - 1 <= len(T975) else 1.96
    half = t * float(d.std(ddof=1)) / np.sqrt(d.size)
    return Interval(float(d.mean()), float(d.mean() - half), float(d.mean() + half))


def _metrics(folder: Path) -> list[dict[str, float]]:
    from ..reporting.html import read_csv_rows

    return read_csv_rows(folder / "metrics.csv")


def _finite_mean(values: list[float]) -> float:
    """The mean of the finite values (NaN when there are none, e.g. gradient shares not logged)."""
    finite = [float(v) for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def epochs_to(curve: list[float], fraction: float = SPEED_FRACTION) -> float:
    """The first epoch (counted from 1) at which ``curve`` reaches ``fraction`` of its maximum."""
    values = np.asarray(curve, dtype=float)
    if values.size == 0 or not np.isfinite(values).any():
        return float("nan")
    target = fraction * np.nanmax(values)
    return float(np.argmax(values >= target) + 1)


def _mean_curve(folders: list[Path], key: str) -> list[float]:
    curves = [[r.get(key, np.nan) for r in _metrics(f)] for f in folders]
    curves = [c for c in curves if c]
    if not curves:
        return []
    length = min(len(c) for c in curves)
    return [float(v) for v in np.nanmean([c[:length] for c in curves], 0)]


# ------------------------------------------------------------------------------------------- analysis
def _seed_folders(root: Path, label: str) -> dict[int, Path]:
    found = {}
    for folder in sorted((root / label).glob("seed*")):
        if (folder / "summary.json").is_file() and folder.name[4:].isdigit():
            found[int(folder.name[4:])] = folder
    return found


def analyse(root: Path, modalities: list[str], joint_label: str = "joint") -> Diagnosis:
    """The diagnosis from finished runs in ``root``: ``<joint_label>/seed*`` and ``unimodal_<m>/seed*``.

    Raises:
        FileNotFoundError: no finished joint run, or a modality without a finished branch alone.
    """
    joint = _seed_folders(root, joint_label)
    alone = {m: _seed_folders(root, f"unimodal_{m}") for m in modalities}
    missing = [f"unimodal_{m}" for m, f in alone.items() if not f] + ([joint_label] if not joint else [])
    if missing:
        raise FileNotFoundError(
            f"{root} lacks finished runs of {missing}: expected run folders <label>/seed<k> with summary.json "
            "(as `equimodal compare` or `equimodal diagnose` write them)."
        )
    summaries = {s: read_summary(f / "summary.json") for s, f in joint.items()}
    joint_acc = {s: float(v["test"]["test_acc"]) for s, v in summaries.items()}
    seeds = sorted(set(joint).intersection(*(set(a) for a in alone.values())))
    ensemble = {s: ensemble_accuracy([alone[m][s] for m in modalities], "product") for s in seeds}
    diag = Diagnosis(
        dataset=str(next(iter(summaries.values())).get("dataset", "?")), seeds=len(seeds),
        joint=100 * float(np.mean(list(joint_acc.values()))), ensemble=100 * float(np.mean(list(ensemble.values()))),
        headroom=_paired(ensemble, joint_acc),
    )  # fmt: skip
    for m in modalities:
        diag.modalities[m] = modality_figures(m, alone[m], joint, summaries)
        diag.curves[m] = {
            "alone": _mean_curve(list(alone[m].values()), "val_acc"),
            "joint head": _mean_curve(list(joint.values()), f"val_acc_{m}"),
        }
    diag.curves["fused"] = {"joint": _mean_curve(list(joint.values()), "val_acc")}
    diag.verdict, diag.recommendation = verdict(diag)
    return diag


def modality_figures(
    m: str, alone: dict[int, Path], joint: dict[int, Path], summaries: dict[int, dict[str, Any]]
) -> ModalityFigures:
    """Alone / head / probe accuracy, probe deficit, learning speeds and gradient shares of one modality."""
    alone_acc = {s: float(read_summary(f / "summary.json")["test"]["test_acc"]) for s, f in alone.items()}
    probe = {s: float(v["test"].get(f"test_probe_{m}", np.nan)) for s, v in summaries.items()}
    head = [float(v["test"].get(f"test_acc_{m}", np.nan)) for v in summaries.values()]
    shares = [[r.get(f"bal_grad_share/{m}", np.nan) for r in _metrics(f)] for f in joint.values()]
    early = [_finite_mean(s[:EARLY_EPOCHS]) for s in shares]
    overall = [_finite_mean(s) for s in shares]
    return ModalityFigures(
        alone=100 * float(np.mean(list(alone_acc.values()))),
        head=100 * float(np.nanmean(head)),
        probe=100 * float(np.nanmean(list(probe.values()))),
        probe_deficit=_paired(alone_acc, probe),
        speed_alone=float(np.nanmean([epochs_to([r.get("val_acc", np.nan) for r in _metrics(f)]) for f in alone.values()])),
        speed_joint=float(np.nanmean([epochs_to([r.get(f"val_acc_{m}", np.nan) for r in _metrics(f)]) for f in joint.values()])),
        grad_share_early=_finite_mean(early),
        grad_share=_finite_mean(overall),
    )  # fmt: skip


def verdict(diag: Diagnosis) -> tuple[str, str]:
    """A plain-language verdict and what to try (see ``docs/diagnose.md`` for the evidence behind it)."""
    if not np.isfinite(diag.headroom.low):
        return (
            f"Cannot tell from one seed: the ensemble of separately trained branches is {diag.headroom.mean:+.2f} "
            "pp from joint training, with no interval to judge it by.",
            "Run again with --seeds 3 or more (finished runs are reused).",
        )
    if diag.headroom.high < 0:
        return (
            f"No imbalance to fix: joint training beats the ensemble of separately trained branches by "
            f"{-diag.headroom.mean:.2f} pp (ensemble minus joint {diag.headroom} pp, an interval below zero): "
            "the modalities gain from being trained together.",
            "Keep joint training (balancer none); the branches trained alone do worse than the joint model.",
        )
    if not diag.headroom.significant:
        few = f" ({diag.seeds} seeds: more seeds narrow the interval)" if diag.seeds < 5 else ""
        return (
            f"No imbalance worth fixing: the ensemble of separately trained branches is {diag.headroom} pp "
            f"from joint training, an interval that includes zero{few}.",
            "Keep joint training (balancer none); rebalancing has nothing measurable to win back here.",
        )
    under = {m: f for m, f in diag.modalities.items() if f.probe_deficit.significant}
    strongest = max(diag.modalities, key=lambda m: diag.modalities[m].alone)
    if not under:
        return (
            f"The ensemble of separately trained branches beats joint training by {diag.headroom} pp, but no "
            "encoder's probe is significantly below its branch alone: the loss is in how the head combines them.",
            "Try a late-fusion ensemble of separately trained branches, or a fusion head trained on frozen "
            "encoders; balancers that act on encoders have little to fix.",
        )
    worst = max(under, key=lambda m: under[m].probe_deficit.mean)
    f = under[worst]
    if worst == strongest:
        role = "the stronger modality alone"
    else:
        role = (
            "the weaker modality alone" if len(diag.modalities) == 2 else "not the strongest modality alone"
        )
    slower = (
        " and learns slower alone"
        if f.speed_alone > min(x.speed_alone for x in diag.modalities.values())
        else ""
    )
    return (
        f"Imbalance: the ensemble of separately trained branches beats joint training by {diag.headroom} pp. "
        f"The {worst!r} encoder is under-trained inside joint training (probe {f.probe:.1f} % against "
        f"{f.alone:.1f} % alone, deficit {f.probe_deficit} pp); it is {role}{slower}.",
        RECOMMENDATION,
    )


RECOMMENDATION = (
    "Give every encoder a training signal of its own: try balancer `own_signal` (a unimodal loss per "
    "encoder through a head of its own; about the cost of joint training), then `mmpareto` (the same "
    "losses with a Pareto step, about twice the cost) or `mla` (alternating unimodal steps). "
    "Confidence-based methods (`ogm_ge`, `amss`) slow the modality they judge dominant, which does not "
    "train the under-trained encoder and, when that is the stronger modality, slows it further. Compare "
    "them on validation data: `equimodal compare CONFIG --balancers none,own_signal,mmpareto,mla`."
)


# --------------------------------------------------------------------------------------------- output
def diagnosis_markdown(diag: Diagnosis) -> str:
    """The diagnosis as markdown: the verdict, the per-modality table and the headroom."""
    rows = [
        "| modality | alone | head in joint | probe in joint | probe deficit (pp) | epochs to 90 % alone | "
        "in joint | grad share, first 5 epochs | grad share, all |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, f in diag.modalities.items():
        rows.append(
            f"| {m} | {f.alone:.1f} | {f.head:.1f} | {f.probe:.1f} | {f.probe_deficit} | {f.speed_alone:.1f} | "
            f"{f.speed_joint:.1f} | {f.grad_share_early:.2f} | {f.grad_share:.2f} |"
        )
    return "\n".join([
        f"# Diagnosis: {diag.dataset} ({diag.seeds} seed{'s' if diag.seeds != 1 else ''})", "",
        f"**Verdict.** {diag.verdict}", "", f"**What to try.** {diag.recommendation}", "",
        f"Joint training {diag.joint:.1f} %, product-rule ensemble of the branches trained alone "
        f"{diag.ensemble:.1f} %, headroom {diag.headroom} pp (paired by seed, Student-t 95 % interval). "
        "Test accuracies in %, means over seeds.", "", *rows, "", "![curves](diagnosis.png)", "",
    ])  # fmt: skip


TERMINAL_COLUMNS = (
    "modality", "alone", "head", "probe", "probe deficit\n(pp)", "speed\nalone", "speed\njoint", "grad\nearly",
    "grad\nall",
)  # fmt: skip
TERMINAL_LEGEND = (
    "alone: test accuracy (%) of the branch trained alone; head, probe: the joint model's unimodal head and "
    "a linear probe on its frozen encoder; probe deficit: alone minus probe, paired by seed (95 % "
    "interval); speed: epochs to 90 % of the best validation accuracy; grad: the encoder's share of the "
    "gradient norm in joint training, first 5 epochs and all."
)


def diagnosis_table(diag: Diagnosis) -> Table:
    """The per-modality figures as a rich table that fits 80 columns (long cells wrap, none is cut)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for name in TERMINAL_COLUMNS:
        table.add_column(
            Text(name),
            justify="left" if name == "modality" else "right",
            overflow="fold",
            min_width=15 if name.startswith("probe deficit") else None,  # "+11.50 [+9.00," on one line
        )
    for m, f in diag.modalities.items():
        cells = [
            m, f"{f.alone:.1f}", f"{f.head:.1f}", f"{f.probe:.1f}", str(f.probe_deficit), f"{f.speed_alone:.1f}",
            f"{f.speed_joint:.1f}", f"{f.grad_share_early:.2f}", f"{f.grad_share:.2f}",
        ]  # fmt: skip
        table.add_row(*[Text(c) for c in cells])  # Text, not markup: "[+1.00, +2.00]" is no style tag
    return table


def print_diagnosis(console: Console, diag: Diagnosis, folder: Path) -> None:
    """The diagnosis on the terminal: wrapped paragraphs and a table within the console's width.

    ``diagnosis.md`` holds the same as Markdown, with its wide table on one line per modality.
    """
    seeds = f"{diag.seeds} seed{'s' if diag.seeds != 1 else ''}"
    paragraphs = [
        Text(f"Diagnosis: {diag.dataset} ({seeds})", style="bold"),
        Text.assemble(("Verdict. ", "bold"), diag.verdict),
        Text.assemble(("What to try. ", "bold"), diag.recommendation),
        Text(
            f"Joint training {diag.joint:.1f} %, product-rule ensemble of the branches trained alone "
            f"{diag.ensemble:.1f} %, headroom {diag.headroom} pp (paired by seed, Student-t 95 % interval)."
        ),
    ]
    for text in paragraphs:
        console.print(text, overflow="fold")
        console.print()
    console.print(diagnosis_table(diag))
    console.print(Text(TERMINAL_LEGEND), overflow="fold")
    console.print(Text(f"Written: {folder / 'diagnosis.md'}, .json and .png"), overflow="fold")


def diagnosis_figure(diag: Diagnosis) -> Any:
    """Per modality: validation accuracy of the branch alone and of its head inside joint training."""
    from ..reporting.curves import _pyplot

    plt = _pyplot()
    names = [m for m in diag.modalities]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.4 * (len(names) + 1), 2.8), squeeze=False)
    for ax, name in zip(axes[0], [*names, "fused"], strict=True):
        for label, curve in diag.curves.get(name, {}).items():
            ax.plot(range(len(curve)), [100 * v for v in curve], label=label)  # epochs from 0, as metrics.csv
        ax.set(title=name, xlabel="epoch", ylim=(0, 100))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation accuracy (%)")
    fig.tight_layout()
    return fig


def write_diagnosis(diag: Diagnosis, out: Path) -> str:
    """Write ``diagnosis.md``, ``diagnosis.json`` and ``diagnosis.png`` into ``out``; returns the markdown."""
    from ..reporting.curves import _pyplot

    drawn = figures_missing() is None
    text = diagnosis_markdown(diag)
    if not drawn:
        text = text.replace("![curves](diagnosis.png)\n", "")
    atomic_write_text(out / "diagnosis.md", text)
    atomic_write_text(out / "diagnosis.json", json.dumps(asdict(diag), indent=2, default=float))
    if not drawn:
        (out / "diagnosis.png").unlink(missing_ok=True)  # an earlier figure would not match the tables
        return text
    fig = diagnosis_figure(diag)
    tmp = out / ".diagnosis.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    tmp.replace(out / "diagnosis.png")
    return text


# ------------------------------------------------------------------------------------------------ run
def diagnose(
    config: str | None = None,
    overrides: list[str] | None = None,
    *,
    seeds: int = 3,
    out: str | Path = "runs/diagnose",
    runs: str | Path | None = None,
    jobs: int = 1,
    threads: int = 1,
    overwrite: bool = False,
    console: Console | None = None,
) -> Diagnosis:
    """Train (or read, with ``runs=`` a ``compare`` folder) and diagnose; see the module docstring.

    With ``runs`` nothing is trained: its ``none/seed*`` and ``unimodal_<m>/seed*`` folders are read (no
    gradient shares then, unless they were logged). Returns the :class:`Diagnosis`, also written to
    ``out`` (or ``runs``).
    """
    from ..data import load_dataset
    from ..engine.config import load_config

    console = console or Console()
    base = list(overrides or [])
    cfg = load_config(config, base)
    modalities = load_dataset(cfg.data.name, seed=0, **cfg.data.options).modalities
    root = Path(runs if runs is not None else out)
    with claim_folder(root):  # one diagnosis per folder: a second is refused, naming this one
        if runs is not None:
            diag = analyse(root, modalities, joint_label="none")
        else:
            check_count(seeds, "seeds", "the number of seeds, run as 0..N-1", "3")
            diag = train_and_analyse(
                root, (config, base), modalities, seeds, (jobs, threads, overwrite), console
            )
        write_diagnosis(diag, root)
    print_diagnosis(console, diag, root)
    return diag


def train_and_analyse(
    root: Path, recipe: tuple[str | None, list[str]], modalities: list[str], seeds: int,
    execution: tuple[int, int, bool], console: Console,
) -> Diagnosis:  # fmt: skip
    """Train the joint run and each modality's branch for every seed into ``root``, then analyse them.

    Raises:
        RunsFailed: a run did not finish (the diagnosis needs every one).
    """
    (config, base), (jobs, threads, overwrite) = recipe, execution
    labels = [("joint", ("balancer.name=none", "balancer.options.monitor=true"))]
    labels += [
        (f"unimodal_{m}", ("balancer.name=unimodal", f"balancer.options.modality={m}")) for m in modalities
    ]
    specs = [RunSpec(label, (*base, *ov, f"train.seed={s}"), s) for s in range(seeds) for label, ov in labels]
    expected, failures = execute_runs(
        root, specs, config, jobs=jobs, threads=threads, overwrite=overwrite, console=console
    )
    print_failures(console, failures)
    unfinished = [s for s in specs if finished_summary(root, s, expected[s]) is None]
    if unfinished:
        raise RunsFailed(
            f"{len(unfinished)} run(s) did not finish (see above), and the diagnosis needs every one. "
            "Rerun the same command to retry them (finished runs are kept)."
        )
    return analyse(root, modalities)


def run_diagnose(args: argparse.Namespace) -> int:
    """CLI entry of ``equimodal diagnose``."""
    diagnose(
        args.config, list(args.set or []), seeds=args.seeds, out=args.out, runs=args.runs, jobs=args.jobs,
        threads=args.threads, overwrite=args.overwrite,
    )  # fmt: skip
    return 0
