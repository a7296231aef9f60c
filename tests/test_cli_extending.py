"""The examples of docs/extending.md (a balancer, a command) run and do what the page says; the command
modules have the shape the page describes."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from equimodal.cli import COMMANDS, build_parser, main
from equimodal.engine.run_folder import RunFolder

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _blocks(title: str) -> list[str]:
    """The Python blocks of one section of the page, in order."""
    section = DOC.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, title
    return blocks


def _run_section(title: str) -> dict[str, Any]:
    """Execute the Python blocks of one section of the page in one namespace."""
    namespace: dict[str, Any] = {"__name__": "extending"}
    for block in _blocks(title):
        exec(compile(block, f"{DOC} ({title})", "exec"), namespace)
    return namespace


def test_a_balancer_that_overrides_nothing_ties_joint_training(tmp_path: Path) -> None:
    """Run in a process of its own: the balancer it registers must not reach the other tests (the DDP
    test's workers, for one, know only the built-in balancers)."""
    report = "import json; print(json.dumps({'rows': result.rows, 'failures': result.failures}))"
    done = subprocess.run(
        [sys.executable, "-c", "\n".join([*_blocks("A balancer"), report])],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"none", "joint_again"} and result["failures"] == []
    assert rows["joint_again"]["Δacc vs none (pp)"] == "+0.00 [n/a (1 seed)]"  # the same run, exactly
    assert (tmp_path / "runs" / "extending" / "joint_again" / "seed0" / "summary.json").is_file()


def _finished(folder: Path) -> None:
    folder.mkdir(parents=True)
    RunFolder(folder).write_summary({"test": {"test_acc": 0.5}})


def test_the_command_example_parses_its_arguments_and_prints_its_result(tmp_path: Path, capsys) -> None:
    namespace = _run_section("A command")
    parser = argparse.ArgumentParser(prog="equimodal")
    namespace["add_parser"](parser.add_subparsers(dest="command", required=True))
    for label, seed in (("none", 0), ("none", 1), ("amss", 0), ("mfeat/concat/none", 0)):
        _finished(tmp_path / label / f"seed{seed}")
    (tmp_path / "amss" / "seed1").mkdir()  # a run that has not finished
    args = parser.parse_args(["finished", str(tmp_path)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["amss: seeds 0", "mfeat/concat/none: seeds 0", "none: seeds 0, 1"]
    assert namespace["HELP"] in parser.format_help()
    with pytest.raises(
        FileNotFoundError, match="does not exist; pass a folder written by `equimodal compare`"
    ):
        namespace["finished_runs"](tmp_path / "missing")


def test_every_command_module_has_the_shape_the_page_describes(capsys) -> None:
    """``HELP``, ``run`` and ``add_parser`` in each module of ``COMMANDS``, each listed by --help."""
    assert [m.__name__.rsplit(".", 1)[1] for m in COMMANDS] == [
        "train", "compare", "study", "diagnose", "report", "prepare", "units", "listing",
    ]  # fmt: skip
    overview = "".join(build_parser().format_help().split())  # argparse wraps lines, also at hyphens
    for module in COMMANDS:
        assert callable(module.run) and callable(module.add_parser)
        assert "".join(module.HELP.split()) in overview, module.__name__
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "usage: equimodal report" in capsys.readouterr().out
