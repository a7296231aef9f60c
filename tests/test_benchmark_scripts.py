"""The cost benchmarks (balancer_cost, masking_scale, before_step, epoch_cost) run with ``--smoke`` and print
their tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def step_level_balancers() -> list[str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from balancer_cost import step_level_balancers as names
    finally:
        sys.path.pop(0)
    return names()


def run_script(name: str, *args: str, timeout: int = 600) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--smoke", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown rows whose first cell is ``first_cell``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()]
    return [r for r in rows if r[0] == first_cell]


@pytest.mark.slow
def test_balancer_cost_smoke() -> None:
    out = run_script("balancer_cost.py", "--threads", "1", timeout=1800)  # 27 names: 4.5 min on 2 idle cores
    assert out.count("### ") == 2  # both workloads
    names = step_level_balancers()
    assert "remix" not in names and "greedy" not in names and "reconboost" in names
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


def test_paired_table_merges_folders_and_pairs_by_seed(tmp_path: Path) -> None:
    """Two compare folders; the variant's seed 2 never finished (a non-finite run leaves no summary)."""
    import json

    def write(folder: str, label: str, seed: int, test: float, val: float) -> None:
        run = tmp_path / folder / label / f"seed{seed}"
        run.mkdir(parents=True)
        summary = {"modalities": ["a", "b"], "test": {"test_acc": test, "test_probe_a": 0.5, "test_probe_b": 0.7},
                   "val": {"val_acc": val}}  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))

    for seed, (t, v) in enumerate([(0.80, 0.70), (0.82, 0.72)]):
        write("first", "none", seed, t, v)
        write("second", "own", seed, t + 0.01 * (seed + 1), v + 0.02)  # +1 and +2 pp on test, +2 on val
    (tmp_path / "second" / "own" / "seed2").mkdir()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "paired_table.py"), str(tmp_path / "first"),
         str(tmp_path / "second"), "--labels", "none,own,gone"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    own = table_rows(proc.stdout, "own (1 seed(s) unfinished)")[0]
    assert own[1] == "82.5 ± 2.1" and own[2].startswith("+1.50 [+1.00, +2.00]") and own[3] == "+2.00"
    assert own[4:] == ["50.0", "70.0"] and table_rows(proc.stdout, "none")[0][1] == "81.0 ± 1.4"
    assert table_rows(proc.stdout, "gone")[0][1] == "no finished run"


def test_paired_table_across_tasks_weights_each_task_alike(tmp_path: Path) -> None:
    """Two tasks (folders), 2 and 4 seeds: the mean over tasks is the mean of the two task means."""
    import json

    def write(task: str, label: str, seed: int, acc: float) -> None:
        run = tmp_path / task / label / f"seed{seed}"
        run.mkdir(parents=True)
        summary = {"modalities": ["a", "b"], "test": {"test_acc": acc}, "val": {"val_acc": acc - 0.01}}
        (run / "summary.json").write_text(json.dumps(summary))

    for task, seeds, gain in (("t1", 2, 0.01), ("t2", 4, -0.03)):
        for seed in range(seeds):
            write(task, "ref", seed, 0.80 + 0.01 * seed)
            write(task, "alt", seed, 0.80 + 0.01 * seed + gain)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "paired_table.py"), "--across", str(tmp_path / "t1"),
         str(tmp_path / "t2"), "--labels", "alt", "--reference", "ref"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| alt")]
    cells = [[c.strip() for c in r] for r in rows]
    assert [c[1:3] for c in cells[:2]] == [["t1", "2"], ["t2", "4"]]
    assert cells[0][3].startswith("+1.00") and cells[1][3].startswith("-3.00")
    assert (
        cells[2][1] == "mean of the 2 tasks" and cells[2][3] == "-1.00 [-1.00, -1.00]"
    )  # not -1.67 (pooled)


@pytest.mark.slow
def test_parallel_efficiency_smoke() -> None:
    out = run_script("parallel_efficiency.py")
    assert table_rows(out, "1")[0][2] == "1.00"  # T1 / (1 x T1)
    assert 0 < float(table_rows(out, "2")[0][2]) <= 2.0
    assert "driver overhead per run" in out and "starting 2 worker processes" in out


@pytest.mark.slow
def test_epoch_cost_measures_active_epochs_side_by_side() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "epoch_cost.py"), "--task", "avdigits_hard", "--epochs", "2",
         "--rounds", "1", "--methods", "sample_valuation,greedy"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {
        r[0]: r for r in table_rows(proc.stdout, "`sample_valuation`") + table_rows(proc.stdout, "`greedy`")
    }
    assert rows["`greedy`"][1] == "`none_mmtm`" and rows["`sample_valuation`"][1] == "`none`"
    assert float(rows["`sample_valuation`"][4]) > 1.0  # its plan added copies
    assert table_rows(proc.stdout, "`none`")[0][2].startswith("1.00")


def test_balancer_stats_averages_while_acting_at_the_end_and_at_given_epochs(tmp_path: Path) -> None:
    """``nonzero/`` skips the epochs where a figure is 0 (a warm-up), ``last/`` is the final epoch and
    ``epoch<e>/`` one epoch, each averaged over seeds; a blank cell (no figure that epoch) is skipped."""
    for seed, values in ((0, ["", "0", "2", "4"]), (1, ["", "0", "6", "8"])):
        run = tmp_path / "row" / f"seed{seed}"
        run.mkdir(parents=True)
        lines = ["epoch,train_loss,bal_x"] + [f"{e},1.0,{v}" for e, v in enumerate(values)]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from balancer_stats import label_stats
    finally:
        sys.path.pop(0)
    stats = label_stats(tmp_path / "row", early=2, at_epochs=(2,))
    assert stats["x"] == pytest.approx(10 / 3)  # (2 + 4) / 3 and (6 + 8) / 3 over the filled epochs
    assert stats["nonzero/x"] == pytest.approx(5.0) and stats["last/x"] == pytest.approx(6.0)
    assert stats["epoch2/x"] == pytest.approx(4.0) and stats["early/x"] == pytest.approx(0.0)
