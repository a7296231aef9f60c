"""One signal stops every command that runs many runs or workers (compare, study, diagnose, prepare).

Each command runs in its own session, as from a terminal; it is stopped by Ctrl-C (SIGINT to the whole
process group) or by SIGTERM to its main process, with runs in this process (``--jobs 1``) or in worker
processes. It must exit 130 / 143 within seconds, without a traceback, leave no process of its group
behind and no table built from a part of its runs; the same command then finishes, resuming the runs
that were in flight from the checkpoint they wrote at the signal. The pool itself (:mod:`equimodal.utils.workers`)
is tested in-process: a stop between two tasks, a worker that dies, a worker that does not stop.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

import equimodal
from equimodal.cli import main
from equimodal.experiments import estimate
from equimodal.experiments.execution import execute_runs
from equimodal.experiments.executors import Execution
from equimodal.experiments.specs import run_specs
from equimodal.utils.interrupt import Interrupted, StopRequest
from equimodal.utils.workers import Hooks, run_tasks

STOP_SECONDS = 20.0
"""Signal to exit, with the driver's own interpreter teardown, on a busy 2-core machine."""

EPOCHS = 3
RUN = ["train.probe=false", "data.batch_size=32", f"train.epochs={EPOCHS}", "train.checkpoint_every=0",
       "train.num_threads=1"]  # fmt: skip
SETS = [x for o in RUN for x in ("--set", o)]
SOURCE = str(Path(equimodal.__file__).resolve().parents[1])
"""The folder of the equimodal these tests import: the commands they start import it too (they run from
an empty working folder, where a relative PYTHONPATH would miss it)."""
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
}

STUDY = f"""
title: "Stop"
quick:
  seeds: 1
  set: [{", ".join(RUN)}]
parts:
  - name: p
    reference: none
    rows:
      none: [balancer.name=none]
      amss: [balancer.name=amss]
"""


# ----------------------------------------------------------------------------------------- helpers
def _alive(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that have not ended (an ended one waiting to be reaped is not)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    if not Path("/proc").is_dir():
        return [pgid]
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _group_ends(pgid: int, seconds: float = 10.0) -> list[int]:
    """Wait up to ``seconds`` for the group to end; returns what is still alive then."""
    deadline = time.monotonic() + seconds
    while _alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pgid)


def _interrupt(
    args: list[str], ready: Callable[[Any], bool], sig: int, group: bool
) -> tuple[int, str, float]:
    """Start ``equimodal ARGS`` in a new session, signal it once ``ready(process)``; returns the exit code,
    what it printed and the seconds from the signal to its exit. Its group must be empty soon after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "equimodal", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not ready(proc):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"it ended or stalled before it could be stopped: {proc.communicate()}")
            time.sleep(0.02)
        tic = time.monotonic()
        if group:
            os.killpg(proc.pid, sig)  # Ctrl-C in a terminal: the whole foreground group
        else:
            proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - tic
        assert _group_ends(proc.pid) == [], "a process of the command's group outlived it"
    finally:
        if _alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stdout + stderr, took


def _check_stopped(code: int, printed: str, took: float, sig: int, args: list[str]) -> None:
    assert code == 128 + sig, printed
    assert took < STOP_SECONDS, f"{took:.1f} s from the signal to the exit"
    assert "Traceback" not in printed, printed
    assert f"Resume: equimodal {shlex.join(args)}" in printed, printed


def _in_flight(out: Path) -> dict[Path, str]:
    """The metrics.csv of every run stopped part-way (a finished epoch, no summary), with its text."""
    found = {p: p.read_text() for p in out.rglob("metrics.csv") if not (p.parent / "summary.json").exists()}
    for path in found:  # written by the trainer at the signal: mid-epoch, at an optimizer step
        assert torch.load(path.parent / "last.pt", weights_only=False)["partial"] is not None
    return found


def _rerun_resumes(args: list[str], stopped: dict[Path, str]) -> None:
    """The same command finishes every run; a stopped run kept its finished epochs (a restart would
    measure their times again)."""
    again = subprocess.run(
        [sys.executable, "-m", "equimodal", *args], capture_output=True, text=True, env=ENV
    )
    assert again.returncode == 0, again.stdout + again.stderr
    for path, before in stopped.items():
        after = path.read_text()
        assert after.startswith(before) and len(after.splitlines()) == EPOCHS + 1, path


def _command(name: str, tmp_path: Path, jobs: int) -> tuple[list[str], Path, str]:
    """The arguments of a small ``compare``, ``study`` or ``diagnose``, its folder and its table."""
    out = tmp_path / "out"
    if name == "compare":
        args = [
            "compare",
            "--dataset",
            "mfeat",
            "--balancers",
            "none,amss",
            "--seeds",
            "1",
            "--no-references",
        ]
        return [*args, *SETS, "--out", str(out), "--jobs", str(jobs)], out, "results.md"
    if name == "study":
        (tmp_path / "stop.yaml").write_text(STUDY)
        return ["study", str(tmp_path / "stop.yaml"), "--out", str(out), "--jobs", str(jobs)], out, "stop.md"
    return ["diagnose", *SETS, "--seeds", "1", "--out", str(out), "--jobs", str(jobs)], out, "diagnosis.md"


# ------------------------------------------------------------------------ compare, study, diagnose
def _case(name: str, jobs: int, sig: int, group: bool, slow: bool = True) -> object:
    marks = [pytest.mark.slow] if slow else []
    how = "ctrl-c" if group else signal.Signals(sig).name.lower()
    return pytest.param(name, jobs, sig, group, marks=marks, id=f"{name}-jobs{jobs}-{how}")


CASES = [
    _case("compare", 2, signal.SIGINT, True, slow=False),
    _case("compare", 1, signal.SIGTERM, False, slow=False),
    _case("compare", 1, signal.SIGINT, True),
    _case("compare", 2, signal.SIGTERM, False),
    *[_case(n, j, s, g) for n in ("study", "diagnose") for j in (1, 2)
      for s, g in ((signal.SIGINT, True), (signal.SIGTERM, False))],
]  # fmt: skip


@pytest.mark.parametrize(("name", "jobs", "sig", "group"), CASES)
def test_a_signal_stops_every_run_and_the_same_command_resumes(
    name: str, jobs: int, sig: int, group: bool, tmp_path: Path
) -> None:
    args, out, table = _command(name, tmp_path, jobs)
    code, printed, took = _interrupt(args, lambda _: any(out.rglob("metrics.csv")), sig, group)
    _check_stopped(code, printed, took, sig, args)
    assert f"{signal.Signals(sig).name} stopped the runs" in " ".join(printed.split())
    assert not (out / table).exists()  # no table from a part of the runs
    stopped = _in_flight(out)
    assert stopped, "no run was stopped part-way"
    _rerun_resumes(args, stopped)
    assert (out / table).is_file()


def test_ctrl_c_while_the_workers_start_stops_them_quietly(tmp_path: Path) -> None:
    """The workers are still importing their modules: Ctrl-C must not raise KeyboardInterrupt in them."""
    args, out, table = _command("compare", tmp_path, 2)
    code, printed, took = _interrupt(args, lambda p: "] start " in p.stdout.readline(), signal.SIGINT, True)
    _check_stopped(code, printed, took, signal.SIGINT, args)
    assert not (out / table).exists()


@pytest.mark.slow
def test_a_driver_killed_outright_takes_its_workers_along(tmp_path: Path) -> None:
    """SIGKILL cannot be caught: the workers get SIGTERM from Linux, checkpoint and end."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux only")
    args, out, _ = _command("compare", tmp_path, 2)
    code, _, _ = _interrupt(args, lambda _: any(out.rglob("metrics.csv")), signal.SIGKILL, False)
    assert code == -signal.SIGKILL
    _rerun_resumes(args, _in_flight(out))


# ------------------------------------------------------------------------------------------ prepare
@pytest.fixture(scope="module")
def raw_cremad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw CREMA-D tree of 16 good clips over 8 actors (the clip writers of tests/prepare)."""
    pytest.importorskip("av")
    from prepare.test_cremad import EMOTIONS, SENTENCES, write_flv, write_wav

    root = tmp_path_factory.mktemp("raw") / "CREMA-D"
    (root / "AudioWAV").mkdir(parents=True)
    (root / "VideoFlash").mkdir()
    for i in range(16):
        key = f"{1001 + i % 8}_{SENTENCES[i // 8]}_{EMOTIONS[i % 6]}_XX"
        write_wav(root / "AudioWAV" / f"{key}.wav", tone=200.0 + 20 * i)
        write_flv(root / "VideoFlash" / f"{key}.flv", shade=i)
    return root


@pytest.mark.parametrize(
    ("workers", "sig", "group"),
    [
        pytest.param(2, signal.SIGTERM, False, id="workers2-sigterm"),
        pytest.param(2, signal.SIGINT, True, id="workers2-ctrl-c", marks=pytest.mark.slow),
        pytest.param(1, signal.SIGINT, True, id="workers1-ctrl-c", marks=pytest.mark.slow),
        pytest.param(1, signal.SIGTERM, False, id="workers1-sigterm", marks=pytest.mark.slow),
    ],
)
def test_a_signal_stops_prepare_and_keeps_the_finished_clips(
    workers: int, sig: int, group: bool, raw_cremad: Path, tmp_path: Path
) -> None:
    out = tmp_path / "prepared"
    args = ["prepare", "cremad", "--raw", str(raw_cremad), "--out", str(out), "--workers", str(workers),
            "--set", "val_actors=1", "--set", "test_actors=1"]  # fmt: skip

    def a_whole_clip(_: object) -> bool:  # a spectrogram alone is half a clip: its frames come after it
        return any((out / "visual" / p.stem).is_dir() for p in out.glob("audio/*.npy"))

    code, printed, took = _interrupt(args, a_whole_clip, sig, group)
    _check_stopped(code, printed, took, sig, args)
    assert not (out / "manifest.csv").exists() and not (out / "prepare.json").exists()
    assert not [p for p in out.rglob("*.tmp")], "an aborted clip left a temporary file"
    kept = {p: p.stat().st_mtime_ns for p in out.glob("audio/*.npy") if (out / "visual" / p.stem).is_dir()}
    assert 1 <= len(kept) < 16  # whole clips: their spectrogram and their frames
    again = subprocess.run(
        [sys.executable, "-m", "equimodal", *args], capture_output=True, text=True, env=ENV
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert (out / "manifest.csv").is_file()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished clips were not redone
    assert len(list(out.glob("audio/*.npy"))) == 16


# ------------------------------------------------------------------------------------ the pool itself
def _quiet_hooks(done: list[tuple[int, object, str | None]], said: list[str]) -> Hooks:
    return Hooks(start=lambda i: None, done=lambda *a: done.append(a), say=said.append)


def _double_or_die(x: int) -> int:
    """A task: ``2 x``, or for a negative ``x`` the worker ends at once with exit code ``-x``."""
    if x < 0:
        os._exit(-x)
    return 2 * x


def _ignore_sigterm(marker: str) -> str:
    """A task that will not stop: SIGTERM ignored, a marker file written, then a long sleep."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(marker).touch()
    time.sleep(60)
    return marker


def test_in_this_process_a_stop_between_two_tasks_starts_no_other() -> None:
    stop, done, ran = StopRequest(), [], []

    def task(x: int) -> int:
        ran.append(x)
        stop.signum = int(signal.SIGTERM)  # the signal arrives while the first task runs
        return x

    outcome = run_tasks(task, [1, 2, 3], 1, _quiet_hooks(done, []), stop)
    assert ran == [1] and done == [(0, 1, None)]
    assert outcome.signum == signal.SIGTERM and outcome.not_started == [1, 2]


def test_in_this_process_an_interrupted_task_is_a_stop_not_a_failure() -> None:
    def task(x: int) -> int:
        raise Interrupted(int(signal.SIGINT), "stopped at step 3")

    done: list = []
    outcome = run_tasks(task, [1, 2], 1, _quiet_hooks(done, []), StopRequest())
    assert done == [] and outcome.signum == signal.SIGINT
    assert outcome.stopped == [0] and outcome.not_started == [1]


def test_a_worker_that_dies_fails_its_task_by_name_and_is_replaced() -> None:
    done: list = []
    outcome = run_tasks(_double_or_die, [1, -3, 2, 3], 2, _quiet_hooks(done, []), StopRequest())
    assert outcome.signum is None
    results = {i: (value, error) for i, value, error in done}
    assert results[0] == (2, None) and results[2] == (4, None) and results[3] == (6, None)
    assert results[1][0] is None and "exited with code 3 before reporting" in str(results[1][1])


@pytest.mark.parametrize("second_ctrl_c", [False, True], ids=["grace-period", "second-ctrl-c"])
def test_a_worker_that_does_not_stop_is_killed(second_ctrl_c: bool, tmp_path: Path) -> None:
    """After the grace period, or at once on a second Ctrl-C while the driver waits."""
    stop, done, said, marker = StopRequest(), [], [], tmp_path / "running"
    asked: list[float] = []

    def signal_once_running() -> None:  # as a signal handler would, once the task ignores SIGTERM
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        asked.append(time.monotonic())
        stop.signum = int(signal.SIGTERM)

    def say(text: str) -> None:
        said.append(text)
        if second_ctrl_c and text.startswith("Stopping"):
            raise KeyboardInterrupt  # what the driver's handler raises on a second Ctrl-C

    threading.Thread(target=signal_once_running, daemon=True).start()
    hooks = Hooks(start=lambda i: None, done=lambda *a: done.append(a), say=say, name=lambda i: f"task{i}")
    outcome = run_tasks(_ignore_sigterm, [str(marker)], 2, hooks, stop, grace=120.0 if second_ctrl_c else 1.0)
    assert time.monotonic() - asked[0] < 30
    assert outcome.signum == signal.SIGTERM and outcome.killed == [0] and done == []
    assert any("Killed the workers of task0" in s for s in said), said


# ---------------------------------------------------------------------------------- start lines, estimate
def test_runs_are_named_when_they_start_and_the_time_is_estimated(tmp_path: Path, capsys) -> None:
    args = ["compare", "--dataset", "mfeat", "--seeds", "1", "--no-references", "--out", str(tmp_path / "c")]
    fast = [
        x for o in ("train.epochs=1", "train.probe=false", "data.options.views=fac,mor") for x in ("--set", o)
    ]
    assert main([*args, "--balancers", "none", *fast]) == 0
    first = " ".join(capsys.readouterr().out.split())
    assert "To train: 1 run(s) with --jobs 1: about" in first and "timed steps of none/seed0" in first
    assert first.index("[1/1] start none/seed0") < first.index("[1/1] done none/seed0")
    assert main([*args, "--balancers", "none,amss", *fast]) == 0
    second = " ".join(capsys.readouterr().out.split())
    assert "To train: 1 run(s) with --jobs 1: about" in second
    assert "an estimate from the 1 finished run(s)" in second and "[1/1] start amss/seed0" in second


def test_an_estimate_that_cannot_be_made_says_so_and_fails_nothing(tmp_path: Path, monkeypatch) -> None:
    def broken(*_args: object, **_kw: object) -> estimate.RunCost:
        raise RuntimeError("no device")

    monkeypatch.setattr(estimate, "timed_step", broken)
    console = Console(record=True, width=200)
    specs = run_specs(["train.epochs=1", "train.probe=false", "data.options.views=fac,mor"], ["none"],
                      ["fac", "mor"], 1, False)  # fmt: skip
    _, failures = execute_runs(tmp_path, specs, None, execution=Execution(), overwrite=False, console=console)
    text = console.export_text()
    assert failures == [] and "no time estimate (RuntimeError: no device)" in text
    assert (tmp_path / "none" / "seed0" / "summary.json").is_file()
