"""Does a multimodal model suffer from modality imbalance, where, and how much? (``equimodal diagnose``)

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
``diagnosis.json`` (everything above, the curves too: what ``equimodal report`` draws the folder's page
from) and ``diagnosis.png`` (per-modality learning curves) into the output folder
(:class:`~equimodal.reporting.folders.DiagnosisFiles`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ..engine.preflight import figures_missing
from ..engine.run_folder import SUMMARY, RunFolder
from ..reporting.figures import diagnosis_figure, save_figure
from ..reporting.folders import DiagnosisFiles
from ..reporting.statistics import ensemble_accuracy, t_interval
from ..reporting.tables import DIAGNOSIS_HEADER, diagnosis_cells, markdown_table, t_interval_text
from .execution import RunPlan, RunsFailed, RunsPending, execute_runs
from .executors import Execution
from .specs import RunSpec, check_seeds, finished_summary

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
        return t_interval_text(self.mean, self.low, self.high)


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
    """A diagnosis (also ``diagnosis.json``): the headroom, the figures per modality, the verdict, the
    mean validation curves (``{modality or "fused": {label: values}}``)."""

    dataset: str
    seeds: int
    joint: float
    ensemble: float
    headroom: Interval
    modalities: dict[str, ModalityFigures] = field(default_factory=dict)
    verdict: str = ""
    recommendation: str = ""
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class DiagnosisResult:
    """What :func:`diagnose` returns.

    Attributes:
        diagnosis: the verdict, the headroom and the per-modality figures (the table's rows:
            ``diagnosis.modalities``, one :class:`ModalityFigures` per modality).
        runs: the run folders it read, ``{label: {seed: path}}`` (``joint`` or ``none``, ``unimodal_<m>``).
        out: the folder the diagnosis was written to.
        files: ``markdown``, ``json`` and, when drawn, ``figure``.
    """

    diagnosis: Diagnosis
    runs: dict[str, dict[int, Path]]
    out: Path
    files: dict[str, Path]


def paired_interval(a: Mapping[int, float], b: Mapping[int, float]) -> Interval:
    """Mean of ``a - b`` over the seeds both have (in pp), with a Student-t 95 % interval.

    A t interval rather than the bootstrap of ``compare``: with the few seeds a diagnosis usually has,
    a bootstrap interval is too narrow (two seeds give the range of two numbers); the t interval widens
    honestly (two seeds: 12.7 standard errors).
    """
    seeds = sorted(set(a) & set(b))
    return Interval(*t_interval(100 * np.array([a[s] - b[s] for s in seeds], dtype=float)))


def _finite_mean(values: Sequence[float]) -> float:
    """The mean of the finite values (NaN when there are none, e.g. gradient shares not logged)."""
    finite = [float(v) for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def epochs_to(curve: Sequence[float], fraction: float = SPEED_FRACTION) -> float:
    """The first epoch (counted from 1) at which ``curve`` reaches ``fraction`` of its maximum."""
    values = np.asarray(curve, dtype=float)
    if values.size == 0 or not np.isfinite(values).any():
        return float("nan")
    target = fraction * np.nanmax(values)
    return float(np.argmax(values >= target) + 1)


def _curve(folder: Path, key: str) -> list[float]:
    """One run's ``key`` per epoch (NaN where it was not logged)."""
    return [r.get(key, np.nan) for r in RunFolder(folder).read_metrics()]


def _mean_curve(folders: Sequence[Path], key: str) -> list[float]:
    curves = [c for c in (_curve(f, key) for f in folders) if c]
    if not curves:
        return []
    length = min(len(c) for c in curves)
    return [float(v) for v in np.nanmean([c[:length] for c in curves], 0)]


# ------------------------------------------------------------------------------------------- analysis
def _seed_folders(root: Path, label: str) -> dict[int, Path]:
    found = {}
    for folder in sorted((root / label).glob("seed*")):
        if folder.is_dir() and folder.name[4:].isdigit() and RunFolder(folder).finished:  # not seed0.*.log
            found[int(folder.name[4:])] = folder
    return found


def _test_accuracy(folder: Path) -> float:
    return float(RunFolder(folder).read_summary()["test"]["test_acc"])


def _product_ensemble(folders: Sequence[Path]) -> float:
    """The product-rule ensemble's test accuracy of one seed's branches."""
    keys = ("test_logits", "test_labels", "train_label_counts")
    preds = [RunFolder(f).read_predictions(keys=keys) for f in folders]
    logits = [p["test_logits"] for p in preds]
    return ensemble_accuracy(logits, preds[0]["test_labels"], preds[0]["train_label_counts"], "product")


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
            f"{root} lacks finished runs of {missing}: expected run folders <label>/seed<k> with {SUMMARY} "
            "(as `equimodal compare` or `equimodal diagnose` write them)."
        )
    summaries = {s: RunFolder(f).read_summary() for s, f in joint.items()}
    joint_acc = {s: float(v["test"]["test_acc"]) for s, v in summaries.items()}
    seeds = sorted(set(joint).intersection(*(set(a) for a in alone.values())))
    ensemble = {s: _product_ensemble([alone[m][s] for m in modalities]) for s in seeds}
    diag = Diagnosis(
        dataset=str(next(iter(summaries.values())).get("dataset", "?")), seeds=len(seeds),
        joint=100 * float(np.mean(list(joint_acc.values()))), ensemble=100 * float(np.mean(list(ensemble.values()))),
        headroom=paired_interval(ensemble, joint_acc),
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
    m: str, alone: Mapping[int, Path], joint: Mapping[int, Path], summaries: Mapping[int, dict[str, Any]]
) -> ModalityFigures:
    """Alone / head / probe accuracy, probe deficit, learning speeds and gradient shares of one modality."""
    alone_acc = {s: _test_accuracy(f) for s, f in alone.items()}
    probe = {s: float(v["test"].get(f"test_probe_{m}", np.nan)) for s, v in summaries.items()}
    head = [float(v["test"].get(f"test_acc_{m}", np.nan)) for v in summaries.values()]
    shares = [_curve(f, f"bal_grad_share/{m}") for f in joint.values()]
    return ModalityFigures(
        alone=100 * float(np.mean(list(alone_acc.values()))),
        head=100 * float(np.nanmean(head)),
        probe=100 * float(np.nanmean(list(probe.values()))),
        probe_deficit=paired_interval(alone_acc, probe),
        speed_alone=float(np.nanmean([epochs_to(_curve(f, "val_acc")) for f in alone.values()])),
        speed_joint=float(np.nanmean([epochs_to(_curve(f, f"val_acc_{m}")) for f in joint.values()])),
        grad_share_early=_finite_mean([_finite_mean(s[:EARLY_EPOCHS]) for s in shares]),
        grad_share=_finite_mean([_finite_mean(s) for s in shares]),
    )


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
    return _imbalance_verdict(diag)


def _imbalance_verdict(diag: Diagnosis) -> tuple[str, str]:
    """The verdict when the headroom is above zero: which encoder is under-trained, if any."""
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
    "Give every encoder a training signal of its own: try the multitask baseline, balancer `multitask` (a "
    "unimodal loss per encoder through a head of its own; about the cost of joint training; `own_signal` "
    "is it with weight 2), then `mmpareto` (the same "
    "losses with a Pareto step, about twice the cost) or `mla` (alternating unimodal steps). "
    "Confidence-based methods (`ogm_ge`, `amss`) slow the modality they judge dominant, which does not "
    "train the under-trained encoder and, when that is the stronger modality, slows it further. Compare "
    "them on validation data: `equimodal compare CONFIG --balancers none,multitask,mmpareto,mla`."
)


# --------------------------------------------------------------------------------------------- output
def diagnosis_markdown(diag: Diagnosis, figure: str | None) -> str:
    """The diagnosis as markdown: the verdict, the per-modality table and the headroom, and the figure
    (its file name; None: none)."""
    rows = [diagnosis_cells(m, f) for m, f in asdict(diag)["modalities"].items()]
    return "\n".join([
        f"# Diagnosis: {diag.dataset} ({diag.seeds} seed{'s' if diag.seeds != 1 else ''})", "",
        f"**Verdict.** {diag.verdict}", "", f"**What to try.** {diag.recommendation}", "",
        f"Joint training {diag.joint:.1f} %, product-rule ensemble of the branches trained alone "
        f"{diag.ensemble:.1f} %, headroom {diag.headroom} pp (paired by seed, Student-t 95 % interval). "
        "Test accuracies in %, means over seeds.", "", markdown_table(DIAGNOSIS_HEADER, rows), "",
        *([f"![curves]({figure})", ""] if figure else [""]),
    ])  # fmt: skip


def write_diagnosis(diag: Diagnosis, out: Path) -> str:
    """Write ``diagnosis.md``, ``diagnosis.json`` and ``diagnosis.png`` into ``out``; returns the markdown."""
    files = DiagnosisFiles(out)
    text = diagnosis_markdown(diag, files.figure.name if figures_missing() is None else None)
    raw = asdict(diag)
    files.write(text, raw)
    save_figure(files.figure, lambda: diagnosis_figure(raw["curves"], list(raw["modalities"])), dpi=110)
    return text


# ------------------------------------------------------------------------------------------------ run
def diagnose(
    *,
    config: str | None = None,
    overrides: Sequence[str] = (),
    seeds: int = 3,
    out: str | Path = "runs/diagnose",
    runs: str | Path | None = None,
    jobs: int = 1,
    threads: int | str = 1,
    overwrite: bool = False,
    console: Console | None = None,
    execution: Execution | None = None,
) -> DiagnosisResult | RunPlan:
    """Train (or read, with ``runs=`` a ``compare`` folder) and diagnose; see the module docstring.

    Args:
        config: a YAML file or a shipped preset; None: the default config.
        overrides: ``section.key=value`` overrides for every run.
        seeds: seeds per run (the headroom's interval needs >= 2).
        out: the folder of the runs and of the diagnosis.
        runs: a ``compare`` folder to read instead of training: its ``none/seed*`` and
            ``unimodal_<m>/seed*`` runs (no gradient shares then, unless they were logged); the
            diagnosis is written there.
        jobs: runs in parallel (processes). threads: torch threads per run (or ``"auto"``); both are
            shorthands for ``execution``.
        overwrite: retrain run folders that hold a run of another config.
        console: where to print each run's progress; None prints nothing.
        execution: where the runs are trained (see :func:`~equimodal.experiments.compare`); a dry run,
            or runs left in flight, return a :class:`~equimodal.experiments.execution.RunPlan`.

    Raises:
        RunsFailed: a run did not finish (the diagnosis needs every one; ``.failures`` names them).
        FileNotFoundError: ``runs`` lacks a finished joint run or branch.
        ValueError, RunFolderError, PreflightError, Interrupted: as :func:`~equimodal.experiments.compare`.
    """
    from ..data import load_dataset
    from ..engine.config import load_config

    console = console or Console(quiet=True)
    base = list(overrides)
    cfg = load_config(config, base)
    modalities = load_dataset(cfg.data.name, seed=0, **cfg.data.options).modalities
    root = Path(runs if runs is not None else out)
    joint_label = "none" if runs is not None else "joint"
    if runs is None:
        execution = (execution or Execution(jobs=jobs, threads=threads)).checked()
        try:
            train_runs(root, (config, base), modalities, check_seeds(seeds), (execution, overwrite), console)
        except RunsPending as pending:
            return pending.plan
    diag = analyse(root, modalities, joint_label=joint_label)
    write_diagnosis(diag, root)
    files = DiagnosisFiles(root)
    written = {"markdown": files.markdown, "json": files.json, "figure": files.figure}
    labels = [joint_label, *(f"unimodal_{m}" for m in modalities)]
    return DiagnosisResult(
        diag, {label: _seed_folders(root, label) for label in labels}, root,
        {k: p for k, p in written.items() if p.is_file()},
    )  # fmt: skip


def train_runs(
    root: Path, recipe: tuple[str | None, list[str]], modalities: list[str], seeds: int,
    how: tuple[Execution, bool], console: Console,
) -> None:  # fmt: skip
    """Train the joint run and each modality's branch for every seed into ``root``.

    Raises:
        RunsFailed: a run did not finish (the diagnosis needs every one).
    """
    (config, base), (execution, overwrite) = recipe, how
    labels = [("joint", ("balancer.name=none", "balancer.options.monitor=true"))]
    labels += [
        (f"unimodal_{m}", ("balancer.name=unimodal", f"balancer.options.modality={m}")) for m in modalities
    ]
    specs = [RunSpec(label, (*base, *ov, f"train.seed={s}"), s) for s in range(seeds) for label, ov in labels]
    expected, failures = execute_runs(
        root, specs, config, execution=execution, overwrite=overwrite, console=console
    )
    unfinished = [s for s in specs if finished_summary(root, s, expected[s]) is None]
    if unfinished:
        raise RunsFailed(
            f"{len(unfinished)} run(s) did not finish (see above), and the diagnosis needs every one. "
            "Rerun the same command to retry them (finished runs are kept).",
            failures,
        )
