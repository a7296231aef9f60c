"""The ``equimodal`` command line: ``train``, ``compare``, ``report``, ``prepare``, ``units`` and ``list``.

Distribution comes from the environment (``torchrun`` sets ``WORLD_SIZE``/``RANK``), never from a
config field.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import __version__


def _summary_table(summary: dict[str, Any]) -> Table:
    mods = summary["modalities"]
    table = Table(
        title=f"{summary['dataset']} / {summary['balancer']} (epoch {summary['selected_epoch']} chosen on val)"
    )
    table.add_column("metric")
    table.add_column("val", justify="right")
    table.add_column("test", justify="right")
    val, test = summary["val"], summary["test"]

    def pct(d: dict[str, float], key: str) -> str:
        v = d.get(key)
        return "-" if v is None else f"{100 * v:.1f}"

    table.add_row("fused accuracy", pct(val, "val_acc"), pct(test, "test_acc"))
    table.add_row("fused macro-F1", pct(val, "val_f1"), pct(test, "test_f1"))
    for m in mods:
        table.add_row(f"{m}: unimodal accuracy", pct(val, f"val_acc_{m}"), pct(test, f"test_acc_{m}"))
    for m in mods:
        if f"test_probe_{m}" in test:
            table.add_row(f"{m}: linear probe", pct(val, f"val_probe_{m}"), pct(test, f"test_probe_{m}"))
    for m in mods:
        if f"test_removed_{m}" in test:
            table.add_row(f"fused without {m}", "", pct(test, f"test_removed_{m}"))
    table.add_row("imbalance (spread)", pct(val, "val_imbalance"), pct(test, "test_imbalance"))
    return table


def default_run_folder(cfg: Any) -> Path:
    """``runs/train/<dataset>-<balancer>-<8 hex digits of the config>``: a config's own folder, so that
    rerunning the same command resumes it (every process of a torchrun agrees on it) and another config
    gets another folder."""
    import hashlib
    import json

    from ..engine.config import config_to_dict

    digest = hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / "train" / f"{cfg.data.name}-{cfg.balancer.name}-{digest}"


def cmd_train(args: argparse.Namespace) -> int:
    from ..engine.config import load_config
    from ..engine.trainer import train

    cfg = load_config(args.config, args.set or [])
    if args.no_save and args.out:
        raise ValueError("--no-save keeps nothing, --out names where to keep the run: pass one of them.")
    out = None if args.no_save else Path(args.out) if args.out else default_run_folder(cfg)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun only the first process reports
    console = Console(width=min(Console().width, 100))

    def announce() -> None:
        if main_process and out is not None and not args.out:
            console.print(f"Run folder: {out} (rerun the same command to resume it)", highlight=False)

    summary = train(cfg, out, resume=not args.no_resume, overwrite=args.overwrite, on_start=announce)
    if main_process:
        console.print(_summary_table(summary))
        if out is not None:
            console.print(f"Run folder: {out}", highlight=False)
        else:
            console.print(
                "--no-save: nothing was kept. Pass --out DIR (or leave it out) to keep the run folder."
            )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ..balancers import list_balancers
    from ..data import list_datasets
    from ..engine.config import list_presets
    from ..experiments.study import list_studies
    from ..models import list_fusions
    from ..models.encoders import list_encoders

    what = {
        "balancers": list_balancers,
        "datasets": list_datasets,
        "models": list_encoders,
        "fusions": list_fusions,
        "presets": list_presets,
        "studies": list_studies,
    }
    for name in what[args.what]():
        print(name)
    return 0


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}`` with YAML-parsed values (numbers, booleans, lists)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"Option {item!r} must look like key=value (e.g. workers=4).")
        key, raw = item.split("=", 1)
        try:
            options[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ValueError(f"Option {item!r}: the value {raw!r} is not valid YAML; quote it.") from None
    return options


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..prepare import prepare

    info = prepare(args.dataset, args.raw, args.out, workers=args.workers, **parse_options(args.set))
    counts = ", ".join(f"{n} {s}" for s, n in info["counts"].items())
    print(f"Prepared {args.dataset} into {args.out}: {counts} ({len(info['classes'])} classes).")
    skipped = info.get("skipped") or []
    if skipped:
        print(f"{len(skipped)} unusable input(s) were skipped (all listed in {args.out}/prepare.json):")
        for s in skipped[:10]:
            print(f"  {s['clip']}: {s['reason']}")
        if len(skipped) > 10:
            print(f"  ... and {len(skipped) - 10} more")
    print(f"Train on it: equimodal train {args.dataset} --set data.options.root={args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..experiments.compare import run_compare

    return run_compare(args)


def cmd_study(args: argparse.Namespace) -> int:
    from ..experiments.study import run_study

    return run_study(args)


def cmd_diagnose(args: argparse.Namespace) -> int:
    from ..experiments.diagnose import run_diagnose

    return run_diagnose(args)


IMAGE_SUFFIXES = (".png", ".pdf", ".svg")


def cmd_report(args: argparse.Namespace) -> int:
    """An HTML page of the folders (default), or with ``--out X.png|.pdf|.svg`` the learning curves alone."""
    if args.out is not None and str(args.out).lower().endswith(IMAGE_SUFFIXES):
        from ..reporting.curves import plot_runs

        for path in plot_runs(args.runs, args.out):
            print(path)
        return 0
    from ..reporting.html import write_report

    print(write_report(args.runs, args.out))
    return 0


def cmd_units(args: argparse.Namespace) -> int:
    """Print what AMSS masks in the model ``equimodal train`` would build for CONFIG, and why not the rest."""
    from ..amss.explain import amss_balancers, describe_units
    from ..data import load_dataset
    from ..engine.config import load_config
    from ..engine.trainer import build_model, seed_everything
    from ..reporting.units import rich_tables

    cfg = load_config(args.config, args.set or [])
    seed_everything(cfg.train.seed)
    model = build_model(cfg, load_dataset(cfg.data.name, seed=cfg.train.seed, **cfg.data.options))
    name, options = cfg.balancer.name, cfg.balancer.options
    console = Console(width=min(Console().width, 80))
    if name not in amss_balancers():
        console.print(f"Balancer {name!r} masks no units; showing what 'amss' would mask with its defaults.")
        name, options = "amss", {}
    report = describe_units(model, balancer=name, **options)
    shown = ", ".join(f"{k}={v!r}" for k, v in report.selection.summary().items())
    console.print(f"{cfg.data.name} / {name} / {cfg.model.fusion} fusion: {shown}", highlight=False)
    for table in rich_tables(report):
        console.print(table)
    if report.frozen:
        console.print(f"{report.frozen} frozen parameter(s) (requires_grad=False) not listed.")
    return 0


_SET_HELP = "override, e.g. optim.lr=0.01 (repeatable)"
_CONFIG_HELP = "a YAML file or a shipped preset name (see `equimodal list presets`)"


def _add_execution(p: argparse.ArgumentParser, jobs: int) -> None:
    """The options shared by the commands that train many runs (compare, study, diagnose)."""
    p.add_argument("--jobs", type=int, default=jobs, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--overwrite", action="store_true", help="retrain runs in OUT that hold another config")


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", help="train one run (default: the built-in mfeat dataset)")
    t.add_argument("config", nargs="?", help=_CONFIG_HELP)
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help=_SET_HELP)
    t.add_argument(
        "--out",
        help="run folder for config.yaml, metrics.csv, best.pt, summary.json (default: "
        "runs/train/DATASET-BALANCER-HASH, one per config, so a rerun resumes)",
    )
    t.add_argument("--no-save", action="store_true", help="keep nothing on disk (no run folder, no resume)")
    t.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/last.pt exists")
    t.add_argument("--overwrite", action="store_true", help="replace a run of another config in OUT")
    t.set_defaults(func=cmd_train)


def _add_list(sub: Any) -> None:
    ls = sub.add_parser("list", help="list registered names")
    ls.add_argument("what", choices=["balancers", "datasets", "models", "fusions", "presets", "studies"])
    ls.set_defaults(func=cmd_list)


def _add_compare(sub: Any) -> None:
    c = sub.add_parser("compare", help="run several balancers x seeds and tabulate mean +/- std")
    c.add_argument("config", nargs="?", help="base YAML file or preset")
    c.add_argument(
        "--dataset",
        help="dataset name: alone, its shipped preset (the recipe `equimodal train NAME` runs) when there is "
        "one, else the default config with data.name=NAME; with CONFIG, CONFIG with data.name=NAME",
    )
    c.add_argument("--balancers", default="none,amss,amss_plus", help="comma-separated balancer names")
    c.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every run (repeatable)")
    c.add_argument("--out", default="runs/compare", help="folder for the runs and the tables")
    c.add_argument("--no-references", action="store_true", help="skip unimodal/ensemble/Adam reference rows")
    c.add_argument(
        "--variant",
        action="append",
        metavar="LABEL:KEY=VALUE,...",
        help="an extra row with its own overrides, e.g. amss_T1:balancer.name=amss,balancer.options.temperature=1",
    )
    _add_execution(c, jobs=1)
    c.set_defaults(func=cmd_compare)


def _add_study(sub: Any) -> None:
    st = sub.add_parser(
        "study",
        help="run a documented grid that checks one claim (see `equimodal list studies`)",
        description="Run a study preset: its parts' rows x columns x seeds (resumable, paired by seed), then "
        "write NAME.md, NAME.csv, NAME.png and study.json. Quick by default (minutes on 2 cores); --full runs "
        "the full grid.",
    )
    st.add_argument(
        "name",
        help="a shipped study (fusions, backbones, update_ratio, mask_units, modalities) or a YAML file",
    )
    st.add_argument("--full", action="store_true", help="the full grid (more seeds and epochs)")
    st.add_argument("--out", help="folder of the runs and tables (default runs/studies/NAME[_full])")
    st.add_argument("--docs", help="also copy NAME.md, .png and .csv into this folder (e.g. docs/studies)")
    _add_execution(st, jobs=2)
    st.set_defaults(func=cmd_study)


def _add_diagnose(sub: Any) -> None:
    dg = sub.add_parser(
        "diagnose",
        help="is there modality imbalance, which encoder is under-trained, how much is at stake",
        description="Train the joint model and each modality's branch alone under the same budget (or read "
        "them from a compare folder with --runs), then report per modality the accuracy alone, the head and "
        "probe inside joint training, the probe deficit, the learning speed and the gradient share, the "
        "headroom (product-rule ensemble minus joint) and a verdict with what to try.",
    )
    dg.add_argument("config", nargs="?", help="a YAML file or preset (default: the built-in mfeat)")
    dg.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)"
    )
    dg.add_argument("--seeds", type=int, default=3, help="seeds per run (the headroom's interval needs >= 2)")
    dg.add_argument(
        "--out", default="runs/diagnose", help="folder of the runs and of diagnosis.md/.json/.png"
    )
    dg.add_argument("--runs", help="read a compare folder (none/, unimodal_<m>/) instead of training")
    _add_execution(dg, jobs=1)
    dg.set_defaults(func=cmd_diagnose)


def _add_prepare(sub: Any) -> None:
    pr = sub.add_parser("prepare", help="turn a dataset's raw download into the layout its loader reads")
    pr.add_argument("dataset", help="cremad, kinetics_sounds, sarcasm, twitter15 or nvgesture")
    pr.add_argument("--raw", required=True, help="the folder holding the raw download (see README)")
    pr.add_argument("--out", required=True, help="the prepared folder to write (resumable)")
    pr.add_argument("--workers", type=int, help="worker processes (default: the CPUs available)")
    pr.add_argument("--set", action="append", metavar="KEY=VALUE", help="a preparer option (repeatable)")
    pr.set_defaults(func=cmd_prepare)


def _add_units(sub: Any) -> None:
    u = sub.add_parser(
        "units", help="list what AMSS masks in a config's model (units per parameter) and why not"
    )
    u.add_argument("config", nargs="?", help=_CONFIG_HELP)
    u.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override, e.g. balancer.options.linear_rows=auto"
    )
    u.set_defaults(func=cmd_units)


def _add_report(sub: Any) -> None:
    r = sub.add_parser(
        "report",
        help="a self-contained HTML page of run, comparison, study or diagnosis folders",
        description="A self-contained HTML report (figures embedded) of run folders (equimodal train --out), "
        "comparison folders (equimodal compare --out), study folders (equimodal study) or diagnosis "
        "folders (equimodal diagnose). One folder: FOLDER/report.html; several: --out PAGE.html. --out "
        "CURVES.png (or .pdf/.svg) draws the learning curves of run folders alone, a row per run.",
    )
    r.add_argument("runs", nargs="+", help="run, comparison, study or diagnosis folders")
    r.add_argument(
        "--out",
        help="the page (.html; default FOLDER/report.html), or an image (.png, .pdf, .svg) of the curves",
    )
    r.set_defaults(func=cmd_report)


_COMMANDS = (
    _add_train,
    _add_compare,
    _add_study,
    _add_diagnose,
    _add_report,
    _add_prepare,
    _add_units,
    _add_list,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs); each command adds its own sub-parser."""
    p = argparse.ArgumentParser(
        prog="equimodal",
        description="Balanced multimodal learning: train, compare, study, diagnose, report, prepare, units, "
        "list.",
    )
    p.add_argument("--version", action="version", version=f"equimodal {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return p


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Plain INFO lines to whatever ``sys.stdout`` is when a record comes (tests swap it per test)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.addFilter(lambda record: record.levelno == logging.INFO)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _configure_logging(verbose: bool) -> None:
    """Warnings to stderr; off a terminal, the progress lines (train's per-epoch lines, prepare's counts)
    to stdout without a level prefix (a terminal gets a bar); with ``-v`` everything at INFO to stderr."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    if verbose or sys.stdout.isatty():
        return
    for name in ("equimodal.engine.trainer", "equimodal.prepare"):
        progress = logging.getLogger(name)
        if not any(isinstance(h, _StdoutHandler) for h in progress.handlers):
            progress.addHandler(_StdoutHandler())
        progress.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``equimodal`` console script.

    Exit codes: 0 success; 1 some compared runs failed; 2 bad input (config, data, files); 3 a non-finite
    loss or gradient stopped training; 128 + N when signal N (SIGINT 2, SIGTERM 15) stopped it, with the
    command that resumes it.
    """
    from ..engine.fitting import NonFiniteError
    from ..experiments.compare import RunsFailed
    from ..utils.interrupt import Interrupted, Terminated, terminate_raises

    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    err = Console(stderr=True)
    try:
        with terminate_raises():
            return int(args.func(args) or 0)
    except Interrupted as exc:
        err.print(_labelled("stopped: ", "bold yellow", str(exc)))
        return _resume(err, args, argv, int(exc.signum))
    except (KeyboardInterrupt, Terminated) as exc:
        signum = Terminated.signum if isinstance(exc, Terminated) else int(signal.SIGINT)
        name = signal.Signals(signum).name
        err.print(_labelled("stopped: ", "bold yellow", f"{name} stopped it at once; what had finished is kept "
                            "(a run resumes from its last checkpoint)."))  # fmt: skip
        return _resume(err, args, argv, signum)
    except NonFiniteError as exc:
        err.print(_labelled("error: ", "bold red", str(exc)))
        return 3
    except RunsFailed as exc:
        err.print(_labelled("error: ", "bold red", str(exc)))
        return 1
    except (ValueError, TypeError, OSError, ImportError) as exc:
        if args.verbose:
            raise
        err.print(_labelled("error: ", "bold red", _describe(exc)))
        return 2


def _labelled(label: str, style: str, message: str) -> Text:
    """A styled label and a message printed literally: ``[plots]`` in an install hint is text, not markup."""
    return Text.assemble((label, style), message)


def _resume(err: Console, args: argparse.Namespace, argv: Sequence[str] | None, signum: int) -> int:
    """Print the command that resumes a stopped one (none for ``train --no-save``); returns
    ``128 + signum``."""
    if args.command != "train" or not args.no_save:
        words = list(sys.argv[1:] if argv is None else argv)
        err.print(f"Resume: equimodal {shlex.join(words)}", highlight=False, markup=False, soft_wrap=True)
    return 128 + signum


def _describe(exc: BaseException) -> str:
    """A message for an error; OS errors without one of ours name the path and what happened."""
    if (
        isinstance(exc, OSError)
        and not isinstance(exc, (FileNotFoundError, FileExistsError))
        and exc.filename
    ):
        return f"{exc.strerror or type(exc).__name__}: {exc.filename!r}. Check the path and its permissions."
    return str(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
