"""The ``equimodal`` command line: ``train``, ``compare``, ``study``, ``diagnose``, ``report``, ``prepare``,
``units`` and ``list``.

One module per command (:mod:`equimodal.cli.train`, :mod:`~equimodal.cli.compare`, ...): each adds its
sub-parser (``add_parser``) and runs the command's Python function (``run``), printing its result; the
work is done by the library (:mod:`equimodal.engine`, :mod:`equimodal.experiments`,
:mod:`equimodal.reporting`). This module holds :func:`main` (exit codes, logging, the resume line) and
:func:`build_parser`. Distribution comes from the environment (``torchrun`` sets ``WORLD_SIZE``/``RANK``),
never from a config field.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

from .. import __version__
from . import compare, diagnose, listing, prepare, report, study, train, units

COMMANDS = (train, compare, study, diagnose, report, prepare, units, listing)
"""The command modules, in the order ``equimodal --help`` lists them."""


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
    for command in COMMANDS:
        command.add_parser(sub)
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
    from ..experiments import RunsFailed
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
