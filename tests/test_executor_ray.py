"""``--executor ray`` on a Ray cluster started the way a user starts one (``ray start --head``, a separate
process): a comparison trains the same runs as a local one, a failed run is named while the others
finish, a stop leaves the runs in flight checkpointed and resumable, and a missing Ray is named with its
install command. One cluster serves the whole module (Ray takes seconds to start)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from equimodal.cli import main
from equimodal.engine.run_folder import RunFolder
from equimodal.experiments import compare
from equimodal.experiments.executors import RAY_INSTALL, Execution, RunTask
from equimodal.experiments.executors.ray_cluster import RayExecutor, _task_error, package_root
from equimodal.utils.claim import CLAIM_FILE
from equimodal.utils.interrupt import StopRequest
from equimodal.utils.workers import Hooks

FAST = ("data.options.views=fac,mor", "train.probe=false", "train.progress=false", "train.num_threads=1")
BOOM = ("boom", ["balancer.name=none", "optim.lr=1e29"])  # a run that stops on a non-finite loss
TIMED = "time/epoch vs none"  # the one column that differs between two trainings of the same runs
START_SECONDS = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 2-CPU Ray head on this machine, in its own session (``ray start --head --block``): terminating
    that one process stops the cluster's processes and no other Ray of the machine (``ray stop`` would
    stop every one). Its workers import the equimodal these tests import (a real cluster has it installed
    on every node)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "head.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (package_root(), os.environ.get("PYTHONPATH")) if p),
        "RAY_AUTH_MODE": "disabled",  # whatever token an earlier local Ray left in the home folder
    }
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
        "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", "--block",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
    ]  # fmt: skip
    with log.open("wb") as sink:
        head = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_SECONDS
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not start (exit code {head.poll()}):\n{log.read_text()}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.terminate()  # its SIGTERM handler stops every process of the cluster
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # its own session: only this cluster's processes
            head.wait()


def _ray(address: str, **options: object) -> Execution:
    return Execution(executor="ray", ray_address=address, threads=1, **options)  # type: ignore[arg-type]


def _untimed(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in row.items() if k != TIMED} for row in rows]


def test_a_comparison_on_ray_trains_the_runs_of_a_local_one(tmp_path: Path, ray_address: str) -> None:
    options = {"balancers": ("none",), "seeds": 2, "overrides": (*FAST, "train.epochs=1")}
    on_ray = compare(out=tmp_path / "ray", execution=_ray(ray_address), **options)
    here = compare(out=tmp_path / "local", **options)
    assert on_ray.failures == [] and here.failures == []
    assert on_ray.raw == here.raw and _untimed(on_ray.rows) == _untimed(here.rows)
    assert {r["method"] for r in on_ray.rows} >= {"none", "unimodal_fac", "unimodal_mor"}
    assert not ray.is_initialized()  # the call left the cluster it joined


def test_a_failed_run_is_named_and_the_others_finish(tmp_path: Path, ray_address: str) -> None:
    result = compare(balancers=("none",), seeds=1, out=tmp_path, overrides=(*FAST, "train.epochs=1"),
                     references=False, variants=[BOOM], execution=_ray(ray_address))  # fmt: skip
    assert [f.folder for f in result.failures] == [tmp_path / "boom" / "seed0"]
    assert result.failures[0].error.startswith("NonFiniteError:")
    assert [r["method"] for r in result.rows] == ["none"]
    assert RunFolder(tmp_path / "none" / "seed0").finished


def test_a_run_larger_than_every_node_is_refused(tmp_path: Path, ray_address: str) -> None:
    execution = Execution(executor="ray", ray_address=ray_address, threads=3)
    with pytest.raises(ValueError, match=r"asks for 3 CPUs .* largest node of the Ray cluster has 2 CPUs"):
        compare(
            balancers=("none",), seeds=1, out=tmp_path, overrides=FAST, references=False, execution=execution
        )
    assert not ray.is_initialized()


def test_a_stop_cancels_the_runs_in_flight_at_a_checkpoint_and_the_queued_ones(
    tmp_path: Path, ray_address: str
) -> None:
    """Two runs train (2 CPUs), one waits; the stop reaches the trainers through Ray's cancellation
    (SIGINT's handler in the task, the trainer's stop request): each writes ``last.pt`` at its next step,
    releases its folder and ends; the queued run never starts."""
    overrides = (*FAST, "train.epochs=100000", "train.checkpoint_every=0")
    tasks = [
        RunTask(f"run{k}", None, (*overrides, f"train.seed={k}"), str(tmp_path / f"run{k}"), threads=1)
        for k in range(3)
    ]
    stop, started, lines = StopRequest(), [], []

    def stop_once_both_train() -> None:
        claims = [tmp_path / f"run{k}" / CLAIM_FILE for k in range(2)]
        deadline = time.monotonic() + START_SECONDS
        while not all(c.exists() for c in claims) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # inside the epoch loop
        stop.signum = int(signal.SIGINT)

    watcher = threading.Thread(target=stop_once_both_train, daemon=True)
    watcher.start()
    hooks = Hooks(
        started.append, lambda i, v, e: lines.append((i, v, e)), lines.append, lambda i: tasks[i].name
    )
    outcome = RayExecutor(_ray(ray_address)).run(tasks, hooks, stop)
    watcher.join()
    assert (outcome.signum, sorted(outcome.stopped), outcome.killed) == (signal.SIGINT, [0, 1], [])
    assert outcome.not_started == [2] and sorted(started) == [0, 1]
    assert [x for x in lines if not isinstance(x, str)] == []  # no run reported done or failed
    for k in range(2):
        folder = tmp_path / f"run{k}"
        assert not (folder / CLAIM_FILE).exists() and not RunFolder(folder).finished
        checkpoint = torch.load(folder / "last.pt", map_location="cpu", weights_only=False)
        assert checkpoint["partial"] is not None  # stopped inside an epoch: it resumes at that step
    assert not (tmp_path / "run2").exists()


def test_without_an_address_a_local_cluster_runs_the_drivers_equimodal(tmp_path: Path, monkeypatch) -> None:
    """``ray_address=None``: a cluster on this machine whose workers import the equimodal this process
    imported (its folder in the job's PYTHONPATH); a call that finds Ray connected leaves it connected."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token written to the home folder, none kept here
    executor = RayExecutor(Execution(executor="ray", threads=1))
    assert executor.parallelism(7) == 7  # not connected yet: no resources known
    assert executor._connect()
    try:

        def imported_from() -> str:
            import equimodal

            return str(Path(equimodal.__file__).resolve().parent.parent)

        assert ray.get(ray.remote(imported_from).remote()) == package_root()
        assert executor.parallelism(1000) == int(ray.cluster_resources()["CPU"])
        task = RunTask("one", None, (*FAST, "train.epochs=1", "train.seed=0"), str(tmp_path / "one"))
        reports = []
        hooks = Hooks(lambda i: None, lambda i, v, e: reports.append((v, e)), print)
        assert executor.run([task], hooks, StopRequest()).signum is None
        assert reports == [((task.folder, "done", None), None)] and ray.is_initialized()
    finally:
        ray.shutdown()


def test_an_address_where_no_cluster_answers_is_named_at_once(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    tic = time.monotonic()
    with pytest.raises(ConnectionError, match=f"--ray-address {address}: no Ray cluster could be joined"):
        compare(balancers=("none",), seeds=1, out=tmp_path, overrides=FAST, references=False,
                execution=_ray(address))  # fmt: skip
    assert time.monotonic() - tic < 30 and not ray.is_initialized()  # ray.init alone retries for minutes


def test_a_worker_that_cannot_import_equimodal_is_named_with_the_way_out() -> None:
    """Ray's error (its worker's whole sys.path, then the traceback) becomes the import error and the fix."""
    ray_error = RuntimeError(
        "The remote function failed to import on the worker. This may be because needed library "
        "dependencies are not installed in the worker environment or cannot be found from sys.path "
        "['/x', '/y']:\n\nTraceback (most recent call last):\n  File \"a.py\", line 1\n"
        "ModuleNotFoundError: No module named 'equimodal'"
    )
    message = _task_error(ray_error)
    assert message.startswith("ModuleNotFoundError: No module named 'equimodal' (a Ray worker could not")
    assert RAY_INSTALL in message and "sys.path" not in message
    assert _task_error(ValueError("bad\n\nmore")) == "ValueError: bad"


def test_ray_refuses_no_wait() -> None:
    with pytest.raises(ValueError, match="--no-wait .* Ray ends a driver's tasks"):
        Execution(executor="ray", wait=False).checked()


def test_the_cli_without_ray_names_its_install_command(tmp_path: Path, monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    argv = ["compare", "--out", str(tmp_path), "--balancers", "none", "--seeds", "1", "--no-references"]
    assert main([*argv, *(x for o in FAST for x in ("--set", o)), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert RAY_INSTALL in " ".join(err.split()) and "--executor ray" in err
