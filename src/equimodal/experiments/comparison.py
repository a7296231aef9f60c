"""Balancers x seeds on one dataset, with reference rows and paired statistics (``equimodal compare``).

Each run lives in ``OUT/<label>/seed<k>/`` and is skipped when it finished with the config this
comparison asks for, so an interrupted comparison resumes where it stopped. A run folder that holds a
run of *another* config (an older comparison into the same ``out``) is never retrained silently:
before any training the whole comparison is refused, naming the folders and the differing keys, unless
``overwrite`` asks to retrain those runs from scratch (:mod:`equimodal.experiments.execution`).
Reference rows computed in the same run: each modality trained alone (``unimodal``), the late-fusion
ensembles of those branches (product rule and mean of probabilities), and joint training with SGD
(``none``) and with Adam (``none_adam``). For every method the fraction of the joint-to-ensemble gap it
closes is estimated, paired by seed, with a bootstrap confidence interval over seeds; it is reported as
"n/a" when the gap itself is not significantly above zero (then any fraction of it would be noise). With
a single seed a value is shown without a spread and its interval reads "n/a (1 seed)".

The full table (macro-F1, per-modality unimodal and probe accuracy, imbalance, time per epoch) is
written to ``results.md`` and ``results.csv``, the raw figures to ``results.json`` and a bar chart
(accuracy axis from 0 to 100) to ``results.png`` (:class:`~equimodal.reporting.folders.ComparisonFiles`);
the command line prints a compact table that fits 80 columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ..engine.config import Config
from ..reporting.figures import results_figure, save_figure
from ..reporting.folders import ComparisonFiles
from ..reporting.tables import table_notes
from .execution import RunFailure, RunPlan, RunsPending, execute_runs
from .executors import Execution
from .specs import (
    RunSpec,
    Variant,
    check_seeds,
    fill_unimodal_runs,
    parse_variant,
    run_config,
    run_dir,
    run_dirs,
    run_specs,
    unimodal_run_dir,
)
from .tables import ComparisonTable, comparison_table

DEFAULT_BALANCERS = ("none", "amss", "amss_plus")


@dataclass(frozen=True)
class ComparisonResult:
    """What :func:`compare` returns.

    Attributes:
        title: the table's title (dataset, seeds, how the epoch was chosen).
        seeds: the number of seeds.
        columns: the full table's columns (see :func:`~equimodal.experiments.tables.comparison_columns`).
        rows: one dict per method, with every column as a key and text cells (``"84.5 ± 0.7"``, ``""``
            where a cell does not apply): methods, variants, references, then the ensembles.
        raw: ``{method: {seed: {"test_acc": fraction, ...}}}``, each finished run's test figures.
        runs: every run's folder, ``{label: {seed: path}}`` (failed runs' too).
        failures: the runs that failed (the table holds the others; rerun to retry them).
        out: the comparison's folder.
        files: where the tables went: ``markdown``, ``csv``, ``json`` and, when matplotlib drew it,
            ``figure``.
    """

    title: str
    seeds: int
    columns: list[str]
    rows: list[dict[str, Any]]
    raw: dict[str, dict[str, dict[str, float]]]
    runs: dict[str, dict[int, Path]]
    failures: list[RunFailure]
    out: Path
    files: dict[str, Path]


def summarise(
    out: Path,
    specs: Sequence[RunSpec],
    modalities: Sequence[str],
    refs: bool,
    expected: dict[RunSpec, dict[str, Any]] | None = None,
) -> ComparisonTable:
    """Collect the finished runs into the table (:func:`~equimodal.experiments.tables.comparison_table`)
    and write ``results.md`` (with its notes), ``.csv``, ``.json`` and the bar chart, each atomically.

    Without matplotlib there is no chart (an earlier one is removed: it would not match the tables).
    """
    table = comparison_table(out, specs, modalities, refs, expected)
    files = ComparisonFiles(out)
    files.write(table.columns, table.rows, table_notes(table.rows), table.raw)
    save_figure(files.figure, lambda: results_figure(table.raw), dpi=120)
    return table


def _balancer_names(balancers: Sequence[str]) -> list[str]:
    """The balancers as a list of registered names (an unknown one: an error with close matches)."""
    from ..balancers import list_balancers
    from ..registry import unknown_name_error

    if isinstance(balancers, str):
        raise TypeError(
            f"balancers: expected a sequence of names, e.g. ('none', 'amss'), found the string {balancers!r}; "
            f"pass {tuple(b.strip() for b in balancers.split(',') if b.strip())!r}."
        )
    valid = list_balancers()
    for b in balancers:
        if b not in valid:
            raise unknown_name_error("balancer", b, valid)
    return list(balancers)


def _variant(value: str | tuple[str, Sequence[str]]) -> Variant:
    """A variant given as ``"LABEL:key=value,..."`` or as ``(label, overrides)``."""
    if isinstance(value, str):
        return parse_variant(value)
    label, overrides = value
    if not str(label).strip() or not overrides or any("=" not in str(o) for o in overrides):
        raise ValueError(
            f"variant {value!r}: expected (label, [section.key=value, ...]), e.g. "
            "('amss_T1', ['balancer.name=amss', 'balancer.options.temperature=1.0'])."
        )
    return str(label).strip(), tuple(str(o) for o in overrides)


def _plan(
    config: str | None,
    dataset: str | None,
    rows: tuple[Sequence[str], Sequence[str | tuple[str, Sequence[str]]], bool],
    seeds: int,
    overrides: Sequence[str],
) -> tuple[str | None, Config, list[str], list[RunSpec]]:
    """The recipe's source, its config, the modalities and every run (``rows``: balancers, variants and
    whether to add the references); every name is checked here, before anything is written."""
    from ..data import load_dataset
    from ..engine.config import load_config, resolve_recipe

    balancers, variants, references = rows
    source, base = resolve_recipe(config, dataset)
    base += list(overrides)
    cfg = load_config(source, base)
    names = _balancer_names(balancers)
    modalities = load_dataset(cfg.data.name, seed=0, **cfg.data.options).modalities
    return (
        source,
        cfg,
        modalities,
        run_specs(base, names, modalities, seeds, references, [_variant(v) for v in variants]),
    )


def compare(
    *,
    config: str | None = None,
    dataset: str | None = None,
    balancers: Sequence[str] = DEFAULT_BALANCERS,
    seeds: int = 3,
    out: str | Path = "runs/compare",
    jobs: int = 1,
    threads: int | str = 1,
    overwrite: bool = False,
    references: bool = True,
    variants: Sequence[str | tuple[str, Sequence[str]]] = (),
    overrides: Sequence[str] = (),
    console: Console | None = None,
    execution: Execution | None = None,
) -> ComparisonResult | RunPlan:
    """Train every balancer x seed that has not finished, then tabulate them (see the module docstring).

    Args:
        config: a YAML file or a shipped preset; None: the default config (or ``dataset``'s preset).
        dataset: a dataset name: alone, its shipped preset when there is one (the recipe ``equimodal
            train NAME`` runs), else the default config with ``data.name=NAME``; with ``config``, that
            config on this dataset.
        balancers: the registered balancers to compare.
        seeds: seeds per method, run as ``0..seeds-1``.
        out: the folder of the runs and the tables. Several calls may share it at once (each run is
            trained by one of them, the others wait for it and write the same tables).
        jobs: runs in parallel (processes). threads: torch threads per run (``"auto"``: the cores divided
            among the runs). Both are shorthands for ``execution``.
        overwrite: retrain run folders that hold a run of another config (their old files are deleted).
        references: add the reference rows (each modality alone, the ensembles, joint training with Adam).
        variants: extra rows with overrides of their own, ``"LABEL:key=value,..."`` or ``(label, overrides)``.
        overrides: ``section.key=value`` overrides for every run.
        console: where to print the recipe and each run's progress; None prints nothing.
        execution: where the runs are trained (:class:`~equimodal.experiments.executors.Execution`:
            the executor, placement, a dry run, ...); default: ``jobs`` processes on this machine.

    Returns:
        The table, the run folders, the failed runs and the files written (:class:`ComparisonResult`);
        with ``execution.dry_run``, or ``execution.wait=False`` and runs still in flight, where the runs
        stand (:class:`~equimodal.experiments.execution.RunPlan`) and no tables.

    Raises:
        ValueError: a count below 1, an unknown balancer or a malformed variant (before anything is
            written). RunFolderError: ``out`` is taken by another command, or holds runs of another config
            (without ``overwrite``). PreflightError: a run cannot start. Interrupted: SIGINT / SIGTERM
            stopped the runs (rerun to resume).
    """
    from ..engine.config import describe_recipe

    seeds = check_seeds(seeds)
    execution = (execution or Execution(jobs=jobs, threads=threads)).checked()
    source, cfg, modalities, specs = _plan(
        config, dataset, (balancers, variants, references), seeds, overrides
    )
    out, console = Path(out), console or Console(quiet=True)
    waves = fill_unimodal_runs(out, specs, source, modalities, references)
    position = {s.name: i for i, s in enumerate(specs)}
    specs = sorted([*waves[0], *waves[1]], key=lambda s: position[s.name])  # the table's row order
    console.print(f"Recipe: {describe_recipe(source, cfg)}", highlight=False, markup=False)
    try:
        expected, failures = _execute(out, waves, source, modalities, (execution, overwrite, console))
    except RunsPending as pending:
        return pending.plan
    table = summarise(out, specs, modalities, references, expected)
    spread = "1 seed" if seeds == 1 else f"mean ± std over {seeds} seeds"
    title = f"{cfg.data.name}: test metrics, {spread} (epoch chosen on val)"
    return _result(title, seeds, table, (out, specs, failures))


def _execute(
    out: Path,
    waves: tuple[list[RunSpec], list[RunSpec]],
    source: str | None,
    modalities: Sequence[str],
    how: tuple[Execution, bool, Console],
) -> tuple[dict[RunSpec, dict[str, Any]], list[RunFailure]]:
    """Train the first wave, then the runs that read the unimodal runs of their seed (``how``: the
    execution, ``overwrite`` and the console); a dry run plans both waves at once.

    Raises:
        RunsPending: a dry run, or runs left in flight.
    """
    execution, overwrite, console = how
    if execution.dry_run:
        execute_runs(
            out, [*waves[0], *waves[1]], source, execution=execution, overwrite=overwrite, console=console
        )
    expected, failures = execute_runs(
        out, waves[0], source, execution=execution, overwrite=overwrite, console=console
    )
    if waves[1]:  # the runs that read the unimodal runs of their seed, once those have finished
        ready, missing = _teachers_ready(out, waves[1], failures, modalities)
        console.print(
            f"Then the runs that read the unimodal runs of their seed ({_labels(waves[1])}):",
            highlight=False, markup=False,
        )  # fmt: skip
        failures += missing
        more, failed = execute_runs(
            out, ready, source, execution=execution, overwrite=overwrite, console=console
        )
        expected, failures = {**expected, **more}, failures + failed
        expected.update({s: run_config(source, s) for s in waves[1] if s not in expected})  # not started
    return expected, failures


def _labels(specs: Sequence[RunSpec]) -> str:
    """The distinct row labels of ``specs``, in order, comma-separated."""
    return ", ".join(dict.fromkeys(s.label for s in specs))


def _teachers_ready(
    out: Path, specs: Sequence[RunSpec], failures: Sequence[RunFailure], modalities: Sequence[str]
) -> tuple[list[RunSpec], list[RunFailure]]:
    """The runs of ``specs`` whose unimodal runs of the same seed did not fail, and a failure for each of
    the others (naming the unimodal run that failed: rerun to retry both)."""
    failed = {Path(f.folder) for f in failures}
    ready, missing = [], []
    for spec in specs:
        lost = [d for d in (unimodal_run_dir(out, m, spec.seed) for m in modalities) if d in failed]
        if lost:
            why = f"not started: its unimodal run {lost[0]} failed (rerun to retry both)"
            missing.append(RunFailure(run_dir(out, spec), why))
        else:
            ready.append(spec)
    return ready, missing


def _result(
    title: str, seeds: int, table: ComparisonTable, where: tuple[Path, Sequence[RunSpec], list[RunFailure]]
) -> ComparisonResult:
    """The :class:`ComparisonResult` of a finished call (``where``: the folder, the runs, the failures)."""
    out, specs, failures = where
    files = ComparisonFiles(out)
    written = {"markdown": files.markdown, "csv": files.csv, "json": files.json, "figure": files.figure}
    return ComparisonResult(
        title=title, seeds=seeds, columns=table.columns, rows=table.rows, raw=table.raw, runs=run_dirs(out, specs),
        failures=failures, out=out, files={k: p for k, p in written.items() if p.is_file()},
    )  # fmt: skip
