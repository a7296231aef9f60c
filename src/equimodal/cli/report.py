"""``equimodal report``: an HTML page of folders (:func:`equimodal.reporting.html.write_report`), or
their learning curves alone (:func:`equimodal.reporting.curves.plot_runs`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..engine.run_folder import REPORT
from .common import command

IMAGE_SUFFIXES = (".png", ".pdf", ".svg")


HELP = "a self-contained HTML page of run, comparison, study or diagnosis folders"
DESCRIPTION = (
    "A self-contained HTML report (figures embedded) of run folders (equimodal train --out), comparison "
    "folders (equimodal compare --out), study folders (equimodal study) or diagnosis folders (equimodal "
    f"diagnose). One folder: FOLDER/{REPORT}; several: --out PAGE.html. --out CURVES.png (or .pdf/.svg) "
    "draws the learning curves of run folders alone, a row per run."
)


def run(args: argparse.Namespace) -> int:
    """An HTML page of the folders (default), or with ``--out X.png|.pdf|.svg`` the learning curves alone."""
    if args.out is not None and str(args.out).lower().endswith(IMAGE_SUFFIXES):
        from ..reporting.curves import plot_runs

        for path in plot_runs(args.runs, args.out):
            print(path)
        return 0
    from ..reporting.html import write_report

    print(write_report(args.runs, args.out))
    return 0


def add_parser(sub: Any) -> None:
    """Add ``report`` and its options."""
    r = command(sub, "report", run, HELP, DESCRIPTION)
    r.add_argument("runs", nargs="+", help="run, comparison, study or diagnosis folders")
    r.add_argument(
        "--out",
        help=f"the page (.html; default FOLDER/{REPORT}), or an image (.png, .pdf, .svg) of the curves",
    )
