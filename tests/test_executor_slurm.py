"""``--executor slurm`` through submitit's local backend (``--slurm cluster=local``: the jobs are processes
on this machine): the same tables as the local executor, ``--no-wait`` then a rerun that collects the
runs without training them again, failed runs and jobs named with their logs, a stop, and the mapping of
the ``--slurm`` keys onto submitit's parameters."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import submitit
from rich.console import Console

import equimodal
from equimodal.cli import main
from equimodal.experiments import compare
from equimodal.experiments.execution import RunPlan, read_marker
from equimodal.experiments.executors import SLURM_INSTALL, Execution, RunTask
from equimodal.experiments.executors.base import queued_marker
from equimodal.experiments.executors.slurm import SlurmExecutor, submitit_parameters
from equimodal.utils.interrupt import StopRequest
from equimodal.utils.workers import Hooks

FAST = ["data.options.views=fac,mor", "train.epochs=1", "train.probe=false", "train.num_threads=1"]
BOOM = ("boom", ["optim.lr=1e20", "train.on_nonfinite=stop"])  # fails on a non-finite loss
SOURCE = str(Path(equimodal.__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def _jobs_import_this_equimodal(monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's local jobs are new interpreters started in the test's working folder: they import the
    equimodal these tests import."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (SOURCE, os.environ.get("PYTHONPATH")) if p))


def _slurm(**slurm: object) -> Execution:
    return Execution(executor="slurm", slurm={"cluster": "local", **slurm}, threads=1)


def test_a_job_array_gives_the_local_executors_tables_and_names_a_failed_run_with_its_log(tmp_path) -> None:
    kw = {"balancers": ("none",), "seeds": 2, "overrides": FAST, "references": False, "variants": [BOOM]}
    console = Console(record=True, width=300)
    result = compare(out=tmp_path / "slurm", execution=_slurm(), console=console, **kw)
    local = compare(out=tmp_path / "local", **kw)
    assert result.rows == local.rows and result.raw == local.raw
    text = console.export_text()
    assert "Submitted 4 run(s) to submitit's local executor" in text and "[4/4] " in text
    # the failed run: its error and the job's log, which holds the job's output
    assert sorted(f.folder for f in result.failures) == [
        tmp_path / "slurm" / "boom" / f"seed{k}" for k in (0, 1)
    ]
    error = result.failures[0].error
    assert error.startswith("NonFiniteError:") and "; log: " in error
    logs = [Path(p) for p in error.split("; log: ")[1].split(", ")]  # the job's stdout and stderr
    assert [p.suffix for p in logs] == [".out", ".err"]
    assert all(p.is_file() and p.is_relative_to(tmp_path / "slurm" / ".submitit") for p in logs)
    run = result.failures[0].folder  # the same logs, linked next to the run folder
    assert [run.with_name(f"{run.name}.slurm.{s}").resolve() for s in ("out", "err")] == [
        p.resolve() for p in logs
    ]
    assert not list((tmp_path / "slurm").glob("*/*.queued.json"))  # every job started: no marker left


def test_no_wait_returns_the_queued_runs_and_a_rerun_collects_them_without_training(tmp_path) -> None:
    out, gate = tmp_path / "out", tmp_path / "go"
    kw = {"balancers": ("none",), "seeds": 1, "overrides": FAST, "references": False, "out": out}
    # the job waits for the gate before it starts: the markers are looked at while it is queued
    held = _slurm(setup=[f"while [ ! -e {gate} ]; do sleep 0.1; done"])
    plan = compare(execution=dataclasses.replace(held, wait=False), **kw)
    assert isinstance(plan, RunPlan) and plan.to_train == ["none/seed0"] and not plan.dry_run
    marker = read_marker(queued_marker(out / "none" / "seed0"))
    assert marker is not None and marker["executor"] == "slurm" and marker["cluster"] == "local"
    assert {"job", "folder", "submitted", "log"} <= set(marker)
    assert SlurmExecutor(held).still_queued(marker)
    gate.touch()
    console = Console(record=True, width=300)
    result = compare(execution=held, console=console, **kw)
    assert [r["method"] for r in result.rows] == ["none"] and result.failures == []
    text = console.export_text()
    assert "1 queued" in text and "Submitted" not in text and "start none" not in text
    # trained once, by the first job: its metrics were not written after that job's result
    results = list((out / ".submitit").glob("local-*/*/*_result.pkl"))
    assert len(results) == 1
    assert (out / "none" / "seed0" / "metrics.csv").stat().st_mtime_ns <= results[0].stat().st_mtime_ns
    assert not SlurmExecutor(held).still_queued(marker)  # its job has ended


def test_a_job_that_ends_without_a_result_is_a_failure_naming_its_logs(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 0)  # no result will come
    result = compare(balancers=("none",), seeds=1, overrides=FAST, references=False, out=tmp_path,
                     execution=_slurm(setup="exit 3"))  # fmt: skip
    assert result.rows == []
    [failure] = result.failures
    assert failure.folder == tmp_path / "none" / "seed0"
    assert "ended without a result" in failure.error and "; log: " in failure.error


def test_a_stop_cancels_the_jobs_and_the_running_run_writes_its_checkpoint(tmp_path) -> None:
    folder = tmp_path / "none" / "seed0"
    overrides = ("data.options.views=fac,mor", "train.epochs=500", "train.probe=false", "train.num_threads=1",
                 "train.seed=0")  # fmt: skip
    task = RunTask("none/seed0", None, overrides, str(folder), out=str(tmp_path))
    stop, said, done = StopRequest(), [], []

    def stop_once_training() -> None:
        while not (folder / "metrics.csv").exists():
            time.sleep(0.1)
        stop.signum = int(signal.SIGTERM)

    threading.Thread(target=stop_once_training, daemon=True).start()
    hooks = Hooks(lambda i: None, lambda i, value, error: done.append((value, error)), said.append)
    outcome = SlurmExecutor(_slurm()).run([task], hooks, stop)
    assert outcome.signum == signal.SIGTERM and outcome.stopped == [0] and not outcome.killed
    assert done == [] and any(line.startswith("Stopping: cancelled the jobs") for line in said)
    assert (folder / "last.pt").is_file() and not (folder / "summary.json").exists()


def test_an_unknown_slurm_key_exits_2_naming_the_close_one(tmp_path, capsys) -> None:
    code = main(["compare", "--out", str(tmp_path), "--balancers", "none", "--seeds", "1", "--no-references",
                 "--executor", "slurm", "--slurm", "partiton=gpu"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "'partiton'" in err and "partition" in err.replace("'partiton'", "")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_the_slurm_keys_map_onto_submitits_parameters() -> None:
    options = {"partition": "gpu", "time": 90, "mem_gb": 16, "account": "lab", "array_parallelism": 4,
               "setup": "module load cuda; source .venv/bin/activate"}  # fmt: skip
    params = submitit_parameters(options, Execution(executor="slurm", gpus_per_run=2), 3, False)
    assert params == {
        "name": "equimodal", "timeout_min": 90, "mem_gb": 16, "cpus_per_task": 6, "gpus_per_node": 2,
        "slurm_partition": "gpu", "slurm_account": "lab", "slurm_array_parallelism": 4,
        "slurm_setup": ["module load cuda", "source .venv/bin/activate"],
    }  # fmt: skip
    # one GPU only on a config that names one; off SLURM the SLURM-only keys are dropped
    one = Execution(executor="slurm")
    assert "gpus_per_node" not in submitit_parameters({}, one, 1, False)
    assert submitit_parameters({}, one, 1, True)["gpus_per_node"] == 1
    local = submitit_parameters({**options, "cluster": "local"}, one, 1, False)
    assert not any(k.startswith("slurm_") for k in local) and local["local_setup"][0] == "module load cuda"
    with pytest.raises(ValueError, match=r"--slurm time='2h'.*minutes.*--slurm time=120"):
        SlurmExecutor(Execution(executor="slurm", slurm={"time": "2h"}))
    with pytest.raises(ValueError, match="--slurm cluster='lokal': expected one of slurm, local, debug"):
        SlurmExecutor(Execution(executor="slurm", slurm={"cluster": "lokal"}))
    # a marker of a job that cannot be found again is not queued
    dead = {"cluster": "local", "job": "999999999", "folder": "/nonexistent/%j", "submitted": "2020-01-01"}
    assert not SlurmExecutor(one).still_queued(dead)
    assert not SlurmExecutor(one).still_queued(json.loads('{"cluster": "debug", "job": "1", "folder": "x"}'))


def test_the_debug_cluster_trains_in_this_process(tmp_path) -> None:
    result = compare(balancers=("none",), seeds=1, overrides=FAST, references=False, out=tmp_path,
                     execution=_slurm(cluster="debug"))  # fmt: skip
    assert [r["method"] for r in result.rows] == ["none"] and result.failures == []
    assert not (tmp_path / ".submitit").exists() and not list(tmp_path.glob("*/*.queued.json"))
    with pytest.raises(ValueError, match="cluster=debug trains the runs in this command's process"):
        SlurmExecutor(dataclasses.replace(_slurm(cluster="debug"), wait=False))


def test_the_cli_without_submitit_names_its_install_command(tmp_path, monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a)
    )
    out = tmp_path / "c"
    argv = ["compare", "--out", str(out), "--balancers", "none", "--seeds", "1", "--no-references"]
    assert main([*argv, "--executor", "slurm"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert SLURM_INSTALL in err and "--executor slurm needs the 'submitit' package" in err
    assert not out.exists()  # refused before anything was written
