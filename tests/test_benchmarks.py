"""The benchmark scripts still run against the current API (tiny sizes, CPU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_cpu() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"recipe: every epoch's loss finite +True", proc.stdout), proc.stdout
    assert "overhead: amss_plus / none, batch 64" in proc.stdout
    assert re.search(r"bf16: every loss finite +True", proc.stdout), proc.stdout
