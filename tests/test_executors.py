"""The executors behind compare, study and diagnose, and a folder shared by several drivers.

- Two ``equimodal compare`` started at once on one folder train every run exactly once, and print the
  tables of one sequential process.
- The local executor with 2 jobs gives the sequential run's figures.
- A worker killed mid-run (SIGKILL: no checkpoint at the kill) fails that run only; the next invocation
  retrains it from its ``last.pt`` and nothing else.
- Placement (a worker slot per device), ``--threads auto``, ``--dry-run``, ``--gpus-per-run`` through
  torchrun, and the options' errors.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import equimodal
from equimodal.cli import main
from equimodal.experiments import compare
from equimodal.experiments.execution import RunPlan
from equimodal.experiments.executors import Execution, RunTask, run_task
from equimodal.experiments.executors.base import available_cores, torchrun_command
from equimodal.experiments.executors.local import device_slots
from equimodal.utils.claim import CLAIM_FILE, Owner
from equimodal.utils.interrupt import StopRequest
from equimodal.utils.workers import Hooks, run_tasks

EPOCHS = 2
RUN = ["train.probe=false", "data.batch_size=32", f"train.epochs={EPOCHS}", "train.num_threads=1"]
SETS = [x for o in RUN for x in ("--set", o)]
SOURCE = str(Path(equimodal.__file__).resolve().parents[1])
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
}
COMPARE = ["compare", "--balancers", "none,amss", "--seeds", "2", "--no-references", *SETS]


def _raw(out: Path) -> dict:
    """Every run's test figures, as the comparison recorded them (no timings)."""
    return json.loads((out / "results.json").read_text())


def _table(printed: str) -> str:
    """The compact table a compare printed (its lines from the title to the notes)."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if "test metrics" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("test acc:"))
    return "\n".join(lines[start:end])


def _trained(printed: str) -> set[str]:
    """The runs a driver trained itself (``done NAME (12 s)``), not those it found finished elsewhere."""
    text = " ".join(printed.split())
    return {m.group(1) for m in re.finditer(r"\] done (\S+) \((?!finished elsewhere)", text)}


# ------------------------------------------------------------------------------- one folder, two drivers
def test_two_compares_at_once_train_every_run_once_with_the_tables_of_one_process(tmp_path: Path) -> None:
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "equimodal", *COMPARE, "--out", str(shared), "--jobs", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
            cwd=tmp_path,
        )  # fmt: skip
        for _ in range(2)
    ]
    printed = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, printed, strict=True):
        assert p.returncode == 0, text
    first, second = (_trained(t) for t in printed)
    runs = {f"{b}/seed{s}" for b in ("none", "amss") for s in (0, 1)}
    assert first | second == runs and not first & second, (first, second)  # each run trained once
    for run in runs:  # and once only: one epoch row each, the claim released
        folder = shared / run
        assert len((folder / "metrics.csv").read_text().splitlines()) == EPOCHS + 1
        assert not (folder / CLAIM_FILE).exists()
    one = subprocess.run(
        [sys.executable, "-m", "equimodal", *COMPARE, "--out", str(alone)],
        capture_output=True, text=True, env=ENV, cwd=tmp_path,
    )  # fmt: skip
    assert one.returncode == 0, one.stdout + one.stderr
    assert _table(printed[0]) == _table(printed[1]) == _table(one.stdout)
    assert _raw(shared) == _raw(alone)


def test_the_local_executor_with_two_jobs_gives_the_sequential_figures(tmp_path: Path) -> None:
    kw = {"balancers": ("none", "amss"), "seeds": 2, "references": False, "overrides": RUN}
    sequential = compare(out=tmp_path / "one", **kw)
    parallel = compare(out=tmp_path / "two", execution=Execution(jobs=2), **kw)
    assert parallel.raw == sequential.raw
    timing = "time/epoch vs none"
    strip = [{k: v for k, v in row.items() if k != timing} for row in sequential.rows]
    assert [{k: v for k, v in row.items() if k != timing} for row in parallel.rows] == strip


# ------------------------------------------------------------------------------------ a killed worker
def test_a_worker_killed_mid_run_fails_that_run_only_and_the_next_call_resumes_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sets = [x for o in ["train.epochs=8", "train.checkpoint_every=0"] for x in ("--set", o)]
    args = [*COMPARE, *sets, "--out", str(out), "--jobs", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "equimodal", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True,
    )  # fmt: skip
    victim, deadline = None, time.monotonic() + 300
    try:
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            for metrics in out.glob("*/seed*/metrics.csv"):  # an epoch done, the run not finished
                folder = metrics.parent
                claim = folder / CLAIM_FILE
                if (
                    (folder / "summary.json").exists()
                    or not claim.exists()
                    or not (folder / "last.pt").exists()
                ):
                    continue
                owner = Owner.from_json(claim.read_text())
                if owner is not None and owner.pid != proc.pid:
                    os.kill(owner.pid, signal.SIGKILL)  # the worker process, mid-run: no checkpoint now
                    victim = folder
                    break
            time.sleep(0.01)
        printed, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert victim is not None, "no run could be caught mid-way"
    assert proc.returncode == 1, printed  # the other runs went on; the killed one is named
    text = " ".join(printed.split())
    name = f"{victim.parent.name}/{victim.name}"
    assert f"{name} FAILED" in text and "killed by SIGKILL" in text
    assert not (victim / "summary.json").exists() and (victim / "last.pt").exists()
    kept = victim / "metrics.csv"
    before = kept.read_text()
    others = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")}
    assert len(others) == 3
    again = subprocess.run(
        [sys.executable, "-m", "equimodal", *args], capture_output=True, text=True, env=ENV
    )
    assert again.returncode == 0, again.stdout + again.stderr
    rerun = " ".join(again.stdout.split())
    assert "3 already finished, 1 to run" in rerun and _trained(again.stdout) == {name}
    assert kept.read_text().startswith(before)  # resumed from last.pt: its finished epochs were kept
    assert len(kept.read_text().splitlines()) == 8 + 1
    assert {p: p.stat().st_mtime_ns for p in others} == others  # nothing else was touched


# ------------------------------------------------------------------------------------------ placement
def _visible_device(_: int) -> tuple[int, str | None]:
    time.sleep(0.3)  # long enough that every worker takes a task
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_each_worker_slot_sees_its_own_device(monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    slots = device_slots(["cuda:0", "cuda:1"], per_device=2)
    assert slots == [{"CUDA_VISIBLE_DEVICES": d} for d in "0011"]
    done: list = []
    hooks = Hooks(start=lambda i: None, done=lambda i, v, e: done.append((i, v, e)), say=print)
    outcome = run_tasks(_visible_device, list(range(8)), 1, hooks, StopRequest(), slots=slots)
    assert outcome.signum is None and len(done) == 8 and all(e is None for *_, e in done)
    seen: dict[int, set[str | None]] = {}
    for _, (pid, device), _ in done:
        seen.setdefault(pid, set()).add(device)
    assert all(len(d) == 1 for d in seen.values())  # a worker keeps its device
    per_device = [sum(d == {k} for d in seen.values()) for k in ("0", "1")]
    assert per_device == [2, 2]  # two slots on each device, each its own process
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # indices among the GPUs the driver sees
    assert device_slots(["cuda:1"], 1) == [{"CUDA_VISIBLE_DEVICES": "5"}]
    monkeypatch.delenv(
        "CUDA_VISIBLE_DEVICES"
    )  # --gpus-per-run 2: a slot sees its two GPUs (torchrun's ranks)
    four = ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert device_slots(four, 1, per_run=2) == [
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        {"CUDA_VISIBLE_DEVICES": "2,3"},
    ]
    assert Execution(devices=tuple(four), gpus_per_run=2, per_device=2).parallel() == 4
    with pytest.raises(ValueError, match="3 is not a multiple of 2: pass a multiple of 2 devices"):
        device_slots(four[:3], 1, per_run=2)


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        (["cpu"], "'cpu' is not a CUDA device; expected a list such as cuda:0,cuda:1"),
        (["cuda:2"], "cuda:2 does not exist here: CUDA_VISIBLE_DEVICES=0,1 shows 2 GPU(s)"),
    ],
)
def test_a_device_that_cannot_be_used_is_named(devices, message, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match=re.escape(message)):
        device_slots(devices, 1)


def test_threads_auto_divides_the_cores_among_the_runs_at_once() -> None:
    cores = available_cores()
    assert Execution(jobs=1, threads="auto").run_threads() == cores
    assert Execution(jobs=cores * 2, threads="auto").run_threads() == 1
    assert Execution(devices=("cuda:0", "cuda:1"), per_device=1, threads="auto").run_threads() == max(
        1, cores // 2
    )
    assert Execution(threads=3).run_threads() == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"executor": "slurn"}, "slurm"),
        ({"jobs": 0}, "--jobs must be a whole number >= 1"),
        ({"threads": "many"}, "--threads must be a whole number >= 1 (torch threads per run, or auto)"),
        ({"executor": "slurm", "devices": ("cuda:0",)}, "drop --devices and pass --gpus-per-run"),
        ({"wait": False}, "--no-wait leaves submitted runs to a scheduler"),
    ],
)
def test_an_execution_that_cannot_be_used_is_refused_by_name(options, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Execution(**options).checked()


def test_the_cli_names_a_wrong_execution_option_and_exits_2(tmp_path, capsys) -> None:
    out = tmp_path / "c"
    with pytest.raises(SystemExit) as exited:  # argparse: its usage and the error
        main([*COMPARE, "--out", str(out), "--threads", "lots"])
    assert exited.value.code == 2
    assert "expected a whole number >= 1 or auto, found 'lots'" in capsys.readouterr().err
    code = main([*COMPARE, "--out", str(out), "--no-wait"])
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--no-wait leaves submitted runs to a scheduler" in err and not out.exists()
    assert main([*COMPARE, "--out", str(out), "--devices", "cpu"]) == 2  # refused before any write
    assert "'cpu' is not a CUDA device" in " ".join(capsys.readouterr().err.split()) and not out.exists()


# ------------------------------------------------------------------------------------------- dry run
def test_a_dry_run_lists_the_runs_and_their_cost_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "c"
    plan = compare(balancers=("none",), seeds=2, references=False, overrides=RUN, out=out,
                   execution=Execution(dry_run=True))  # fmt: skip
    assert isinstance(plan, RunPlan) and plan.dry_run and not out.exists()
    assert plan.to_train == ["none/seed0", "none/seed1"] and plan.finished == []
    assert "To train: 2 run(s) with --jobs 1: about" in plan.estimate
    compare(balancers=("none",), seeds=1, references=False, overrides=RUN, out=out)  # seed 0 finished
    assert (
        main([*COMPARE[:2], "none", "--seeds", "2", "--no-references", *SETS, "--out", str(out), "--dry-run"])
        == 0
    )
    text = " ".join(capsys.readouterr().out.split())
    assert "1 run(s) finished, 1 would train" in text and "To train: none/seed1" in text
    assert "an estimate from the 1 finished run(s)" in text and "Dry run: nothing was trained" in text
    assert not (out / "none" / "seed1").exists()


# -------------------------------------------------------------------------------------------- torchrun
def test_a_run_on_several_processes_goes_through_torchrun(tmp_path) -> None:
    task = RunTask("none/seed0", None, ("balancer.name=none", *RUN), str(tmp_path / "none" / "seed0"),
                   threads=1, processes=2)  # fmt: skip
    command = torchrun_command(task)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[-3:] == ["--out", task.folder, "--skip-finished"]


@pytest.mark.slow
def test_torchrun_trains_a_run_on_two_processes_like_one(tmp_path, monkeypatch) -> None:
    """--gpus-per-run 2 on the CPU: two gloo ranks, the run's figures those of one process (DDP equals one
    process at the same global batch for encoders without batch norm: mfeat's MLP views)."""
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    overrides = ("balancer.name=none", *RUN, "train.device=cpu", "data.options.views=fac,mor")
    two = run_task(RunTask("r", None, overrides, str(tmp_path / "two"), threads=1, processes=2))
    assert two[1] == "done", two
    one = run_task(RunTask("r", None, overrides, str(tmp_path / "one"), threads=1))
    assert one[1] == "done", one
    summaries = [json.loads((tmp_path / f / "summary.json").read_text()) for f in ("one", "two")]
    assert summaries[0]["test"]["test_acc"] == pytest.approx(summaries[1]["test"]["test_acc"], abs=1e-6)
    assert (tmp_path / "two.torchrun.log").is_file()
    again = run_task(RunTask("r", None, overrides, str(tmp_path / "two"), threads=1, processes=2))
    assert again[1] == "finished"
