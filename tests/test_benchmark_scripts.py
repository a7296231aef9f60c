"""The cost benchmarks (balancer_cost, masking_scale, before_step) run with ``--smoke`` and print their tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import equimodal as em

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--smoke", *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown rows whose first cell is ``first_cell``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()]
    return [r for r in rows if r[0] == first_cell]


@pytest.mark.slow
def test_balancer_cost_smoke() -> None:
    out = run_script("balancer_cost.py", "--threads", "1")
    assert out.count("### ") == 2  # both workloads
    names = em.list_balancers()
    for name in names:
        rows = table_rows(out, name)
        assert len(rows) == 2, f"{name}: {rows}"
        for cells in rows:
            assert len(cells) == 6
            float(cells[1])  # step ms
            float(cells[2].split()[0])  # ratio median
    assert all(r[2].startswith("1.000") for r in table_rows(out, "none"))
    assert "epoch 0:" in table_rows(out, "gblending")[0][5]
    assert "process RSS" in out


@pytest.mark.slow
def test_masking_scale_smoke() -> None:
    out = run_script("masking_scale.py")
    for family, sizes in (("linear", 2), ("conv", 2)):
        rows = table_rows(out, family)
        assert len(rows) == 2 * sizes  # amss and amss_plus per size
        assert {r[6] for r in rows} == {"amss", "amss_plus"}
        for cells in rows:
            assert len(cells) == 12
            assert float(cells[7]) > 0 and float(cells[5]) > 0  # before_step and backward ms
    assert len(table_rows(out, "2")) == 2 and len(table_rows(out, "4")) == 2  # the modality sweep


@pytest.mark.slow
def test_before_step_smoke() -> None:
    out = run_script("before_step.py", "--threads", "1")
    assert "34 masked tensors" in out  # 16 convs per encoder + 2 fusion blocks
    verdicts = [line.rsplit("|", 2)[-2].strip() for line in out.splitlines() if "| <=" in line]
    assert len(verdicts) == 3 and set(verdicts) <= {"PASS", "FAIL"}
    assert "naive per-parameter loop" in out
    assert "GB/s" in out
