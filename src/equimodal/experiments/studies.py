"""A documented grid of runs that checks one claim, paired by seed, resumable (``equimodal study NAME``).

A study is a YAML preset (``configs/studies/NAME.yaml``, or a path) with one or more *parts*. A part is
a base config (a preset or YAML file and overrides), a set of ``columns`` (e.g. fusions, update ratios,
numbers of modalities) crossed with a set of ``rows`` (e.g. balancers), plus ``baselines`` that are not
crossed (e.g. joint training once). Each cell is trained for every seed with
:func:`equimodal.engine.trainer.train`; the runs live in ``OUT/<part>/<column>/<row>/seed<k>`` and, as
in ``compare``, finished runs are skipped and a folder of another config is refused unless
``overwrite``. Then, per part: the test accuracy of every cell (mean ± std over seeds), its paired
difference (same seed) to the part's ``reference`` row in the same column (or to a baseline) with a
bootstrap 95 % interval, and a figure. ``OUT/NAME.md``, ``NAME.csv``, ``NAME.png`` (``NAME_full.*`` for
the full setting) and ``study.json`` hold them (:class:`~equimodal.reporting.folders.StudyFiles`), with
how long the study took (a rerun that trains nothing keeps the earlier timing).

By default a study runs its ``quick`` setting (fewer seeds and epochs, minutes on 2 CPU cores);
``full=True`` runs its ``full`` setting. A part may also ask for a side-by-side ``step_cost``
measurement: each row's optimizer-step time relative to the reference on the part's model, per column
(interleaved rounds, so machine noise hits all rows alike; a rerun that trains nothing keeps the
stored timings).

Preset keys: ``title``, ``claim``, ``quick`` / ``full`` (``seeds``, ``set``: overrides of that mode),
``parts`` (each: ``name``, ``config``, ``set``, ``quick_set``, ``full_set``, ``columns``, ``rows``,
``baselines``, ``reference``, ``step_cost``). ``columns``, ``rows`` and ``baselines`` map a label to a
list of ``section.key=value`` overrides.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml
from rich.console import Console

from ..engine.config import PRESET_DIR
from ..engine.preflight import figures_missing
from ..reporting.figures import GridPanel, save_figure, study_figure
from ..reporting.folders import StudyFiles
from ..reporting.statistics import mean_ci
from ..reporting.tables import interval_text, markdown_table, mean_std
from .execution import RunFailure, RunPlan, RunsPending, execute_runs
from .executors import Execution
from .specs import RunSpec, check_count, finished_summary, run_dirs, run_folder

STUDY_DIR = PRESET_DIR / "studies"


@dataclass(frozen=True)
class Part:
    """One grid of a study: ``rows`` x ``columns`` (+ ``baselines``) on one base config."""

    name: str
    config: str | None
    base: tuple[str, ...]
    columns: dict[str, tuple[str, ...]]
    rows: dict[str, tuple[str, ...]]
    baselines: dict[str, tuple[str, ...]]
    reference: str | None
    step_cost: bool = False


@dataclass
class Study:
    """A parsed study preset, resolved for one mode (quick or full)."""

    name: str
    title: str
    claim: str
    seeds: int
    parts: list[Part] = field(default_factory=list)
    mode: str = "quick"


class PartTable(NamedTuple):
    """One part's tables: the header (``row`` and the columns), the accuracy rows (a row label, then
    ``mean ± std`` per column; baselines last) and the paired-difference rows (to the reference)."""

    header: list[str]
    accuracy: list[list[str]]
    delta: list[list[str]]


@dataclass(frozen=True)
class StudyResult:
    """What :func:`study` returns.

    Attributes:
        study: the study as run (its mode, seeds and parts).
        tables: each part's :class:`PartTable`, by part name.
        accuracy: ``{cell label: {seed: test accuracy}}`` of the finished runs (cells ``part/column/row``
            and ``part/baseline/name``).
        markdown: the study's Markdown (what ``NAME.md`` holds).
        runs: every run's folder, ``{cell label: {seed: path}}``.
        failures: the runs that failed (rerun to retry them).
        out: the study's folder.
        files: where its files went: ``markdown``, ``csv``, ``json`` and, when drawn, ``figure``.
    """

    study: Study
    tables: dict[str, PartTable]
    accuracy: dict[str, dict[int, float]]
    markdown: str
    runs: dict[str, dict[int, Path]]
    failures: list[RunFailure]
    out: Path
    files: dict[str, Path]


def list_studies() -> list[str]:
    """Names of the study presets shipped with the package."""
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ValueError(f"{where}: expected a list of section.key=value overrides, found {value!r}.")
    return tuple(value)


def _labels(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping of label to overrides, found {type(value).__name__}.")
    return {str(k): _overrides(v, f"{where}.{k}") for k, v in value.items()}


def _part(raw: dict[str, Any], where: str, mode: str, mode_set: tuple[str, ...], index: int) -> Part:
    """One part of a preset (``where`` names it in errors) for ``mode``, with the mode's overrides."""
    part_set = _overrides(raw.get("set"), f"{where}.set") + mode_set
    part_set += _overrides(raw.get(f"{mode}_set"), f"{where}.{mode}_set")
    columns = _labels(raw.get("columns"), f"{where}.columns") or {"-": ()}
    rows = _labels(raw.get("rows"), f"{where}.rows")
    baselines = _labels(raw.get("baselines"), f"{where}.baselines")
    reference = raw.get("reference")
    if not rows:
        raise ValueError(f"{where}: a part needs rows (a mapping of label to overrides).")
    if reference is not None and reference not in rows and reference not in baselines:
        raise ValueError(f"{where}.reference {reference!r} is neither a row nor a baseline.")
    name, config, step = (
        str(raw.get("name", f"part{index}")),
        raw.get("config"),
        bool(raw.get("step_cost", False)),
    )
    return Part(name, config, part_set, columns, rows, baselines, reference, step)


def load_study(name: str, *, full: bool = False) -> Study:
    """Read a study preset (a shipped name or a YAML path) for the quick (default) or full setting.

    Raises:
        FileNotFoundError: neither a file nor a shipped study (the message lists them).
        ValueError: a malformed preset (the message names the key).
    """
    path = Path(name)
    if not path.is_file():
        path = STUDY_DIR / f"{name}.yaml"
        if not path.is_file():
            raise FileNotFoundError(
                f"Study {name!r} is neither a YAML file nor a shipped study; shipped: {', '.join(list_studies())}."
            )
    data = yaml.safe_load(path.read_text()) or {}
    mode = "full" if full else "quick"
    setting = data.get(mode) or {}
    seeds = check_count(setting.get("seeds", 1), "seeds", f"the {mode} setting's seeds in {path}", "3")
    mode_set = _overrides(setting.get("set"), f"{path.name}: {mode}.set")
    parts = [
        _part(raw, f"{path.name}: parts[{i}]", mode, mode_set, i)
        for i, raw in enumerate(data.get("parts") or [])
    ]
    if not parts:
        raise ValueError(f"{path.name}: a study needs at least one part.")
    return Study(path.stem, str(data.get("title", path.stem)), str(data.get("claim", "")), seeds, parts, mode)


def study_specs(study: Study) -> list[RunSpec]:
    """Every run of the study: each part's rows x columns and its baselines, for every seed."""
    specs = []
    for part in study.parts:
        cells = [(f"{part.name}/{c}/{r}", (*part.base, *cov, *rov))
                 for c, cov in part.columns.items() for r, rov in part.rows.items()]  # fmt: skip
        cells += [(f"{part.name}/baseline/{b}", (*part.base, *bov)) for b, bov in part.baselines.items()]
        for seed in range(study.seeds):
            specs += [RunSpec(label, (*ov, f"train.seed={seed}"), seed, part.config) for label, ov in cells]
    return specs


# --------------------------------------------------------------------------------------------- results
def cell_accuracies(
    out: Path, specs: list[RunSpec], expected: Mapping[RunSpec, dict[str, Any]]
) -> dict[str, dict[int, float]]:
    """``{label: {seed: test accuracy}}`` of the finished runs that match their config."""
    acc: dict[str, dict[int, float]] = {}
    for s in specs:
        summary = finished_summary(out, s, expected[s])
        if summary is not None:
            acc.setdefault(s.label, {})[s.seed] = float(summary["test"]["test_acc"])
    return acc


def paired_delta(cell: Mapping[int, float], ref: Mapping[int, float]) -> str:
    """Mean paired (same seed) difference in pp with a bootstrap 95 % interval (none for one seed)."""
    seeds = sorted(set(cell) & set(ref))
    if not seeds:
        return "-"
    d = 100 * np.array([cell[s] - ref[s] for s in seeds])
    if d.size == 1:
        return f"{d[0]:+.2f}"
    return interval_text(float(d.mean()), *mean_ci(d))


def part_tables(part: Part, acc: Mapping[str, Mapping[int, float]]) -> PartTable:
    """The header and the accuracy and paired-difference rows of one part (a row per row label)."""
    columns = list(part.columns)
    accuracy, delta = [], []
    for r in part.rows:
        cells = [acc.get(f"{part.name}/{c}/{r}", {}) for c in columns]
        accuracy.append([r, *[mean_std(list(cell.values())) for cell in cells]])
        if part.reference is not None and r != part.reference:
            refs = [
                acc.get(f"{part.name}/baseline/{part.reference}", {})
                if part.reference in part.baselines
                else acc.get(f"{part.name}/{c}/{part.reference}", {})
                for c in columns
            ]
            delta.append([r, *[paired_delta(cell, ref) for cell, ref in zip(cells, refs, strict=True)]])
    for b in part.baselines:
        cell = acc.get(f"{part.name}/baseline/{b}", {})
        accuracy.append([f"{b} (baseline)", *[mean_std(list(cell.values()))] * len(columns)])
    return PartTable(["row", *columns], accuracy, delta)


# ------------------------------------------------------------------------------------------- step cost
def _step_runs(
    part: Part, column_overrides: tuple[str, ...]
) -> tuple[dict[str, tuple[Any, Any, Any]], Any, Any]:
    """Each row's model copy, balancer and optimizer on the part's model for one column, and one batch."""
    import copy

    import torch

    from ..balancers import EpochData, create_balancer
    from ..data import load_dataset
    from ..data.base import make_loader
    from ..engine.config import load_config
    from ..engine.trainer import balancer_kwargs, build_model
    from ..testing import start_epoch

    cfgs = {
        r: load_config(part.config, [*part.base, *column_overrides, *rov]) for r, rov in part.rows.items()
    }
    first = next(iter(cfgs.values()))
    ds = load_dataset(first.data.name, seed=0, **first.data.options)
    torch.manual_seed(0)
    model = build_model(first, ds)
    batch, y = next(iter(make_loader(ds.train, first.data.batch_size, train=True, seed=0)))
    one = [(batch, y)]
    data = EpochData(train=lambda one=one: one, heldout=lambda one=one: one, device=torch.device("cpu"))
    runs = {}
    for r, cfg in cfgs.items():
        twin = copy.deepcopy(model)
        bal = create_balancer(
            cfg.balancer.name, twin, **balancer_kwargs(cfg.balancer.name, cfg.balancer.options, 0)
        )
        start_epoch(bal, 0, data)
        opt = torch.optim.SGD([*twin.parameters(), *bal.parameters()], lr=1e-3, momentum=0.9)
        runs[r] = (twin, bal, opt)
    return runs, batch, y


def step_cost(part: Part, rounds: int = 10) -> dict[str, dict[str, float]]:
    """Per column, each row's median optimizer-step time (ms) on the part's model and a real batch,
    measured in interleaved rounds after two warm-up steps (``{column: {row: ms}}``)."""
    import statistics

    from ..testing import drive_step

    result: dict[str, dict[str, float]] = {}
    for column, cov in part.columns.items():
        runs, batch, y = _step_runs(part, cov)
        times: dict[str, list[float]] = {r: [] for r in runs}
        for i in range(rounds + 2):
            for r, (twin, bal, opt) in runs.items():
                tic = time.perf_counter()
                drive_step(bal, twin, batch, y, opt)
                if i >= 2:
                    times[r].append(1e3 * (time.perf_counter() - tic))
        result[column] = {r: statistics.median(t) for r, t in times.items()}
    return result


def cost_table(part: Part, costs: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[list[str]]]:
    """Rows x columns of step time relative to the reference row (and the reference's own ms)."""
    header = ["row", *costs]
    rows = []
    for r in part.rows:
        cells = []
        for by_row in costs.values():
            ref = by_row.get(part.reference or "", math.nan)
            cells.append(f"{by_row[r]:.1f} ms" if r == part.reference else f"{by_row[r] / ref:.2f} x")
        rows.append([r, *cells])
    return header, rows


# --------------------------------------------------------------------------------------------- writing
def file_stem(study: Study) -> str:
    """``NAME`` for the quick setting, ``NAME_full`` for the full grid (both can sit in docs/studies)."""
    return StudyFiles.stem(study.name, study.mode)


def _part_markdown(part: Part, table: PartTable, costs: Mapping[str, Any]) -> list[str]:
    """One part's Markdown lines: its base, its accuracy table, its differences and its step costs."""
    base = f"Base: `{part.config or 'default config'}` {' '.join(f'`{o}`' for o in part.base)}".rstrip()
    md = [f"## {part.name}", "", base, "", markdown_table(table.header, table.accuracy), ""]
    if table.delta:
        md += [f"Δ vs `{part.reference}`:", "", markdown_table(table.header, table.delta), ""]
    if part.name in costs:
        c_header, c_rows = cost_table(part, costs[part.name])
        md += [f"Optimizer-step time relative to `{part.reference}` (side by side, one batch, CPU):", "",
               markdown_table(c_header, c_rows), ""]  # fmt: skip
    return md


def write_study(
    study: Study, out: Path, acc: Mapping[str, Mapping[int, float]], extra: dict[str, Any]
) -> str:
    """Write ``NAME.md``, ``.csv``, ``.png`` (``NAME_full.*`` for the full grid) and ``study.json``; returns the md."""
    stem, files = file_stem(study), StudyFiles(out)
    md = [f"# {study.title}", ""]
    if study.claim:
        md += [study.claim, ""]
    md += [f"Setting: `{study.mode}` ({study.seeds} seed{'s' if study.seeds > 1 else ''}); {extra['took']}. "
           "Test accuracy (%), mean ± std over seeds, epoch chosen on validation; Δ: paired (same seed) "
           "difference in pp with a bootstrap 95 % interval over seeds.", ""]  # fmt: skip
    csv_rows: list[list[str]] = []
    for part in study.parts:
        table = part_tables(part, acc)
        md += _part_markdown(part, table, extra.get("costs", {}))
        csv_rows += [[part.name, *row] for row in table.accuracy]
    drawn = figures_missing() is None
    md += [f"![{study.title}]({files.tables(stem).figure.name})", ""] if drawn else []
    text = "\n".join(md)
    raw = {"study": study.name, "mode": study.mode, "seeds": study.seeds, **extra,
           "accuracy": {k: {str(s): a for s, a in v.items()} for k, v in acc.items()}}  # fmt: skip
    files.write(stem, text, csv_rows, raw)
    panels = [GridPanel(p.name, list(p.columns), list(p.rows), list(p.baselines)) for p in study.parts]
    save_figure(files.tables(stem).figure, lambda: study_figure(panels, acc), dpi=110)
    return text


def took(earlier: Mapping[str, Any], trained: int, total: int, minutes: float, how: str) -> str:
    """How long the study took: this call's wall time, or the earlier call's (``earlier``: the previous
    study.json) when this one trained nothing."""
    if trained == 0 and earlier.get("took"):
        return str(earlier["took"])
    part = "" if trained == total else f" ({trained} of its {total} runs; the rest had finished before)"
    return f"{minutes:.1f} min of wall time with {how}{part}"


def run_and_write(
    study: Study, out: Path, how: tuple[Execution, bool], console: Console
) -> tuple[str, list[RunFailure], dict[str, dict[int, float]]]:
    """Train the study's missing runs (``how``: the execution and ``overwrite``), measure its step costs,
    write its files; returns the Markdown, the failed runs and the cells' accuracies.

    Raises:
        RunsPending: a dry run, or runs left in flight (nothing is written).
    """
    execution, overwrite = how
    specs = study_specs(study)
    before = sum(run_folder(out, s).finished for s in specs)
    tic = time.perf_counter()
    expected, failures = execute_runs(
        out, specs, None, execution=execution, overwrite=overwrite, console=console
    )
    extra: dict[str, Any] = {}
    earlier = StudyFiles(out).read_earlier()
    costs = {
        # a rerun that trains nothing keeps the stored timings (a table redrawn on a busy machine would
        # otherwise change); a new or resumed study measures again
        p.name: earlier["costs"][p.name]
        if before == len(specs) and p.name in earlier.get("costs", {})
        else step_cost(p)
        for p in study.parts
        if p.step_cost
    }
    if costs:
        extra["costs"] = costs
    where = (
        f"--jobs {execution.jobs}" if execution.executor == "local" else f"--executor {execution.executor}"
    )
    extra["took"] = took(earlier, len(specs) - before, len(specs), (time.perf_counter() - tic) / 60, where)
    acc = cell_accuracies(out, specs, expected)
    return write_study(study, out, acc, extra), failures, acc


def copy_to_docs(study: Study, out: Path, docs: Path) -> None:
    """Copy the study's Markdown, figure and CSV into ``docs`` (e.g. docs/studies)."""
    stem, files = file_stem(study), StudyFiles(out)
    docs.mkdir(parents=True, exist_ok=True)
    for path in (files.tables(stem).markdown, files.tables(stem).figure, files.tables(stem).csv):
        if path.is_file():
            (docs / path.name).write_bytes(path.read_bytes())


def study(
    *,
    name: str,
    full: bool = False,
    out: str | Path | None = None,
    docs: str | Path | None = None,
    jobs: int = 2,
    threads: int | str = 1,
    overwrite: bool = False,
    console: Console | None = None,
    execution: Execution | None = None,
) -> StudyResult | RunPlan:
    """Run a study's missing runs, then write its tables and figure (see the module docstring).

    Args:
        name: a shipped study (:func:`list_studies`) or a YAML file.
        full: the full setting (more seeds and epochs) instead of the quick one.
        out: the folder of the runs and tables (default ``runs/studies/NAME``, ``NAME_full`` with
            ``full``).
        docs: also copy ``NAME.md``, ``.png`` and ``.csv`` into this folder (e.g. docs/studies).
        jobs: runs in parallel (processes). threads: torch threads per run (or ``"auto"``); both are
            shorthands for ``execution``.
        overwrite: retrain run folders that hold a run of another config.
        console: where to print the study's title and each run's progress; None prints nothing.
        execution: where the runs are trained (see :func:`~equimodal.experiments.compare`); a dry run,
            or runs left in flight, return a :class:`~equimodal.experiments.execution.RunPlan`.

    Raises:
        FileNotFoundError: no such study. ValueError: a malformed preset or a count below 1.
        RunFolderError, PreflightError, Interrupted: as :func:`~equimodal.experiments.compare`.
    """
    plan = load_study(name, full=full)
    execution = (execution or Execution(jobs=jobs, threads=threads)).checked()
    folder = Path(out or f"runs/studies/{file_stem(plan)}")
    console = console or Console(quiet=True)
    console.print(f"Study {plan.name} ({plan.mode}): {plan.title}", highlight=False, markup=False)
    try:
        text, failures, acc = run_and_write(plan, folder, (execution, overwrite), console)
    except RunsPending as pending:
        return pending.plan
    if docs:
        copy_to_docs(plan, folder, Path(docs))
    tables, files = StudyFiles(folder).tables(file_stem(plan)), StudyFiles(folder)
    written = {"markdown": tables.markdown, "csv": tables.csv, "json": files.json, "figure": tables.figure}
    return StudyResult(
        plan, {p.name: part_tables(p, acc) for p in plan.parts}, acc, text, run_dirs(folder, study_specs(plan)),
        failures, folder, {k: p for k, p in written.items() if p.is_file()},
    )  # fmt: skip
