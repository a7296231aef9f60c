"""``equimodal study NAME``: a documented grid of runs that checks one claim, paired by seed, resumable.

A study is a YAML preset (``configs/studies/NAME.yaml``, or a path) with one or more *parts*. A part is
a base config (a preset or YAML file and overrides), a set of ``columns`` (e.g. fusions, update ratios,
numbers of modalities) crossed with a set of ``rows`` (e.g. balancers), plus ``baselines`` that are not
crossed (e.g. joint training once). Each cell is trained for every seed with :func:`equimodal.engine.trainer`;
the runs live in ``OUT/<part>/<column>/<row>/seed<k>`` and, as in ``compare``, finished runs are
skipped and a folder of another config is refused unless ``--overwrite``. Then, per part: the test
accuracy of every cell (mean ± std over seeds), its paired difference (same seed) to the part's
``reference`` row in the same column (or to a baseline) with a bootstrap 95 % interval, and a figure.
``OUT/NAME.md``, ``NAME.csv``, ``NAME.png`` (``NAME_full.*`` for ``--full``) and ``study.json`` hold them,
with how long the study took (a rerun that trains nothing keeps the earlier timing).

By default a study runs its ``quick`` setting (fewer seeds and epochs, minutes on 2 CPU cores);
``--full`` runs its ``full`` setting. A part may also ask for a side-by-side ``step_cost``
measurement: each row's optimizer-step time relative to the reference on the part's model, per column
(interleaved rounds, so machine noise hits all rows alike; a rerun that trains nothing keeps the
stored timings).

Preset keys: ``title``, ``claim``, ``quick`` / ``full`` (``seeds``, ``set``: overrides of that mode),
``parts`` (each: ``name``, ``config``, ``set``, ``quick_set``, ``full_set``, ``columns``, ``rows``,
``baselines``, ``reference``, ``step_cost``). ``columns``, ``rows`` and ``baselines`` map a label to a
list of ``section.key=value`` overrides.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console

from ..engine.config import PRESET_DIR
from ..engine.preflight import figures_missing
from ..utils.claim import claim_folder
from ..utils.io import atomic_write_text, read_json
from .compare import (
    RunSpec,
    bootstrap_ci,
    check_count,
    execute_runs,
    finished_summary,
    print_failures,
    run_dir,
)

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
    parts = []
    for i, raw in enumerate(data.get("parts") or []):
        where = f"{path.name}: parts[{i}]"
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
        parts.append(
            Part(
                str(raw.get("name", f"part{i}")),
                raw.get("config"),
                part_set,
                columns,
                rows,
                baselines,
                reference,
                bool(raw.get("step_cost", False)),
            )  # fmt: skip
        )
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
    out: Path, specs: list[RunSpec], expected: dict[RunSpec, dict[str, Any]]
) -> dict[str, dict[int, float]]:
    """``{label: {seed: test accuracy}}`` of the finished runs that match their config."""
    acc: dict[str, dict[int, float]] = {}
    for s in specs:
        summary = finished_summary(out, s, expected[s])
        if summary is not None:
            acc.setdefault(s.label, {})[s.seed] = float(summary["test"]["test_acc"])
    return acc


def _mean_std(values: list[float]) -> str:
    a = 100 * np.asarray(values, dtype=float)
    if a.size == 0:
        return "-"
    return f"{a[0]:.1f}" if a.size == 1 else f"{a.mean():.1f} ± {a.std(ddof=1):.1f}"


def paired_delta(cell: dict[int, float], ref: dict[int, float]) -> str:
    """Mean paired (same seed) difference in pp with a bootstrap 95 % interval (none for one seed)."""
    seeds = sorted(set(cell) & set(ref))
    if not seeds:
        return "-"
    d = 100 * np.array([cell[s] - ref[s] for s in seeds])
    if d.size == 1:
        return f"{d[0]:+.2f}"
    lo, hi = bootstrap_ci(d[:, None], lambda r: float(r.mean()))
    return f"{d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}]"


def part_tables(
    part: Part, acc: dict[str, dict[int, float]]
) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """The header and the accuracy and paired-difference rows of one part (a row per row label)."""
    columns = list(part.columns)
    header = ["row", *columns]
    accuracy, delta = [], []
    for r in part.rows:
        cells = [acc.get(f"{part.name}/{c}/{r}", {}) for c in columns]
        accuracy.append([r, *[_mean_std(list(cell.values())) for cell in cells]])
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
        accuracy.append([f"{b} (baseline)", *[_mean_std(list(cell.values()))] * len(columns)])
    return header, accuracy, delta


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _numeric(labels: list[str]) -> list[float] | None:
    try:
        return [float(label.lstrip("kMm=")) for label in labels]
    except ValueError:
        return None


def study_figure(study: Study, acc: dict[str, dict[int, float]]) -> Any:
    """One panel per part: test accuracy per column, a line (numeric columns) or bars per row."""
    from ..reporting.curves import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(study.parts), figsize=(5.5 * len(study.parts), 3.6), squeeze=False)
    for ax, part in zip(axes[0], study.parts, strict=True):
        columns = list(part.columns)
        xs = _numeric(columns)
        pos = np.arange(len(columns), dtype=float) if xs is None else np.asarray(xs)
        width = 0.8 / max(len(part.rows), 1)
        for i, r in enumerate(part.rows):
            vals = [list(acc.get(f"{part.name}/{c}/{r}", {}).values()) for c in columns]
            mean = [100 * np.mean(v) if v else np.nan for v in vals]
            err = [100 * np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
            if xs is None:
                ax.bar(
                    pos + (i - (len(part.rows) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=r
                )
            else:
                ax.errorbar(pos, mean, yerr=err, marker="o", capsize=2, label=r)
        styles = [("0.25", "--"), ("0.55", ":"), ("0.4", "-.")]  # baselines told apart in grey print too
        for j, b in enumerate(part.baselines):
            vals = list(acc.get(f"{part.name}/baseline/{b}", {}).values())
            if vals:
                color, ls = styles[j % len(styles)]
                ax.axhline(100 * np.mean(vals), color=color, ls=ls, lw=1.2, label=f"{b} (baseline)")
        if xs is None:
            ax.set_xticks(pos, columns, rotation=30, ha="right", fontsize=8)
        ax.set(title=part.name, ylabel="test accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------- step cost
def step_cost(part: Part, rounds: int = 10) -> dict[str, dict[str, float]]:
    """Per column, each row's median optimizer-step time (ms) on the part's model and a real batch,
    measured in interleaved rounds after two warm-up steps (``{column: {row: ms}}``)."""
    import copy
    import statistics

    import torch

    from ..balancers import EpochData, create_balancer
    from ..data import load_dataset
    from ..data.base import make_loader
    from ..engine.config import load_config
    from ..engine.trainer import _balancer_kwargs, build_model
    from ..testing import drive_step, start_epoch

    result: dict[str, dict[str, float]] = {}
    for column, cov in part.columns.items():
        cfgs = {r: load_config(part.config, [*part.base, *cov, *rov]) for r, rov in part.rows.items()}
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
                cfg.balancer.name, twin, **_balancer_kwargs(cfg.balancer.name, cfg.balancer.options, 0)
            )
            start_epoch(bal, 0, data)
            opt = torch.optim.SGD([*twin.parameters(), *bal.parameters()], lr=1e-3, momentum=0.9)
            runs[r] = (twin, bal, opt)
        times: dict[str, list[float]] = {r: [] for r in runs}
        for i in range(rounds + 2):
            for r, (twin, bal, opt) in runs.items():
                tic = time.perf_counter()
                drive_step(bal, twin, batch, y, opt)
                if i >= 2:
                    times[r].append(1e3 * (time.perf_counter() - tic))
        result[column] = {r: statistics.median(t) for r, t in times.items()}
    return result


def cost_table(part: Part, costs: dict[str, dict[str, float]]) -> tuple[list[str], list[list[str]]]:
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
    return study.name + ("_full" if study.mode == "full" else "")


def write_study(study: Study, out: Path, acc: dict[str, dict[int, float]], extra: dict[str, Any]) -> str:
    """Write ``NAME.md``, ``.csv``, ``.png`` (``NAME_full.*`` for the full grid) and ``study.json``; returns the md."""
    from ..reporting.curves import _pyplot

    stem = file_stem(study)
    md = [f"# {study.title}", ""]
    if study.claim:
        md += [study.claim, ""]
    md += [f"Setting: `{study.mode}` ({study.seeds} seed{'s' if study.seeds > 1 else ''}); {extra['took']}. "
           "Test accuracy (%), mean ± std over seeds, epoch chosen on validation; Δ: paired (same seed) "
           "difference in pp with a bootstrap 95 % interval over seeds.", ""]  # fmt: skip
    buf = io.StringIO()
    writer = csv.writer(buf)
    for part in study.parts:
        header, accuracy, delta = part_tables(part, acc)
        md += [f"## {part.name}", "", f"Base: `{part.config or 'default config'}` "
               f"{' '.join(f'`{o}`' for o in part.base)}".rstrip(), "", markdown_table(header, accuracy), ""]  # fmt: skip
        if delta:
            md += [f"Δ vs `{part.reference}`:", "", markdown_table(header, delta), ""]
        if part.name in extra.get("costs", {}):
            c_header, c_rows = cost_table(part, extra["costs"][part.name])
            md += [f"Optimizer-step time relative to `{part.reference}` (side by side, one batch, CPU):", "",
                   markdown_table(c_header, c_rows), ""]  # fmt: skip
        for row in accuracy:
            writer.writerow([part.name, *row])
    drawn = figures_missing() is None
    md += [f"![{study.title}]({stem}.png)", ""] if drawn else []
    text = "\n".join(md)
    atomic_write_text(out / f"{stem}.md", text)
    atomic_write_text(out / f"{stem}.csv", buf.getvalue())
    raw = {"study": study.name, "mode": study.mode, "seeds": study.seeds, **extra,
           "accuracy": {k: {str(s): a for s, a in v.items()} for k, v in acc.items()}}  # fmt: skip
    atomic_write_text(out / "study.json", json.dumps(raw, indent=2))
    if not drawn:
        (out / f"{stem}.png").unlink(missing_ok=True)  # an earlier figure would not match the tables
        return text
    fig = study_figure(study, acc)
    tmp = out / f".{stem}.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    tmp.replace(out / f"{stem}.png")
    return text


def took(earlier: dict[str, Any], trained: int, total: int, minutes: float, jobs: int) -> str:
    """How long the study took: this call's wall time, or the earlier call's (``earlier``: the previous
    study.json) when this one trained nothing."""
    if trained == 0 and earlier.get("took"):
        return str(earlier["took"])
    part = "" if trained == total else f" ({trained} of its {total} runs; the rest had finished before)"
    return f"{minutes:.1f} min of wall time with --jobs {jobs}{part}"


def run_study(args: argparse.Namespace) -> int:
    """CLI entry: run the study's missing runs, then write and print its tables (see the module docstring)."""
    study = load_study(args.name, full=args.full)
    jobs = check_count(args.jobs, "jobs", "runs in parallel", "2")
    threads = check_count(args.threads, "threads", "torch threads per run", "1")
    out = Path(args.out or f"runs/studies/{study.name}{'_full' if args.full else ''}")
    console = Console()
    console.print(f"Study {study.name} ({study.mode}): {study.title}", highlight=False, markup=False)
    with claim_folder(out):  # one study per folder: a second is refused, naming this one
        text, failures = run_and_write(study, out, (jobs, threads, bool(args.overwrite)), console)
        if args.docs:
            copy_to_docs(study, out, Path(args.docs))
    console.print(text, highlight=False, markup=False, soft_wrap=True)
    return print_failures(console, failures)


def run_and_write(
    study: Study, out: Path, execution: tuple[int, int, bool], console: Console
) -> tuple[str, list[tuple[str, str]]]:
    """Train the study's missing runs (``execution``: jobs, threads, overwrite), measure its step costs,
    write its files; returns the Markdown and the failed runs."""
    jobs, threads, overwrite = execution
    specs = study_specs(study)
    before = sum((run_dir(out, s) / "summary.json").is_file() for s in specs)
    tic = time.perf_counter()
    expected, failures = execute_runs(
        out, specs, None, jobs=jobs, threads=threads, overwrite=overwrite, console=console
    )
    extra: dict[str, Any] = {}
    earlier = read_json(out / "study.json") if (out / "study.json").is_file() else {}
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
    extra["took"] = took(earlier, len(specs) - before, len(specs), (time.perf_counter() - tic) / 60, jobs)
    return write_study(study, out, cell_accuracies(out, specs, expected), extra), failures


def copy_to_docs(study: Study, out: Path, docs: Path) -> None:
    """Copy the study's Markdown, figure and CSV into ``docs`` (e.g. docs/studies)."""
    docs.mkdir(parents=True, exist_ok=True)
    for name in (f"{file_stem(study)}.md", f"{file_stem(study)}.png", f"{file_stem(study)}.csv"):
        if (out / name).is_file():
            (docs / name).write_bytes((out / name).read_bytes())
