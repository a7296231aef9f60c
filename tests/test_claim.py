"""One writer per folder: ``train`` and ``prepare`` claim their ``--out`` folder (:mod:`equimodal.utils.claim`).

The reported race (a second ``train`` into the folder of a running one took it over and both exited 0),
stale claims (a dead pid, a reused pid, another host's old claim) taken over with a warning and race-free,
the claim released however a run ends, two ``prepare cremad`` into one folder, private temporary frame
folders, and a claimed folder refused on every rank under torchrun.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from equimodal.cli import main
from equimodal.engine.run_folder import RunFolder, RunFolderError
from equimodal.prepare.base import save_frame_folder
from equimodal.utils.claim import CLAIM_FILE, FOREIGN_STALE_SECONDS, Owner, _look, _take_over, claim_folder

FAST = ["train.progress=false", "train.probe=false", "data.options.views=fac,mor", "train.num_threads=1"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def sets(*overrides: str) -> list[str]:
    return [x for o in (*FAST, *overrides) for x in ("--set", o)]


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI in this process; returns the exit code and its output with whitespace folded."""
    code = main(args)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def equimodal(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "equimodal", *args], stdout=f, stderr=f, env=ENV)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the process ended (rc {proc.returncode}) before {path.name} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_claim(folder: Path, **fields: object) -> Path:
    """A claim file as another process would have left it: this one's identity with ``fields`` changed."""
    owner = {**json.loads(Owner.current().to_json()), "command": "equimodal train --out elsewhere", **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CLAIM_FILE).write_text(json.dumps(owner))
    return folder / CLAIM_FILE


def claim_of(folder: Path) -> dict:
    return json.loads((folder / CLAIM_FILE).read_text())


# ------------------------------------------------------------------------------- the reported race
def test_a_second_train_into_a_running_ones_folder_is_refused_and_the_first_finishes(
    tmp_path: Path, capsys
) -> None:
    """The review's race: ``train --out R`` running, then ``train --set balancer.name=ogm_ge --out R``.

    The first is held (SIGSTOP) right after it wrote its config, so it is surely still running when the
    second starts, whatever the machine's load; before the claim, the second took the folder and both
    exited 0.
    """
    out = tmp_path / "R"
    first = equimodal(["train", *sets("train.epochs=2"), "--out", str(out)], tmp_path / "first.log")
    try:
        wait_for(out / "config.yaml", first)
        first.send_signal(signal.SIGSTOP)
        code, text = cli(
            ["train", *sets("train.epochs=2", "balancer.name=ogm_ge"), "--out", str(out)], capsys
        )
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert code == 2, text
    assert f"--out {str(out)!r} is in use by another process: pid {first.pid} on host" in text
    assert "equimodal train" in text and "Wait for it to finish, or pass another --out folder" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["balancer"] == "none" and summary["epochs"] == 2
    assert "ogm_ge" not in (out / "config.yaml").read_text()
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2
    assert not (out / CLAIM_FILE).exists()


# ----------------------------------------------------------------------------------- stale claims
def test_a_claim_of_a_dead_process_is_taken_over_with_a_warning(tmp_path: Path, caplog) -> None:
    pid = dead_pid()
    write_claim(tmp_path, pid=pid)
    with caplog.at_level(logging.WARNING, "equimodal.utils.claim"), claim_folder(tmp_path) as claim:
        assert claim_of(tmp_path)["pid"] == os.getpid() and claim.held()
    assert f"Taking over the stale claim on {tmp_path} of pid {pid} on host" in caplog.text
    assert "that process is gone" in caplog.text
    assert not (tmp_path / CLAIM_FILE).exists()


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path: Path, caplog) -> None:
    me = Owner.current()
    if me.start_time is None:
        pytest.skip("process start times are read from /proc (Linux)")
    write_claim(tmp_path, start_time=me.start_time - 1)  # this pid, but a process started earlier
    with caplog.at_level(logging.WARNING, "equimodal.utils.claim"), claim_folder(tmp_path):
        pass
    assert "its pid now belongs to a process started at another time" in caplog.text


def test_a_live_processs_claim_is_refused_naming_it(tmp_path: Path) -> None:
    with claim_folder(tmp_path), pytest.raises(RunFolderError) as err:
        claim_folder(tmp_path, flag="--out")
    text = str(err.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()!r}, since " in text
    assert "Nothing was changed" in text and "pass another --out folder" in text


def test_another_hosts_claim_is_refused_while_fresh_and_taken_over_when_old(tmp_path: Path, caplog) -> None:
    path = write_claim(tmp_path, host="gpu-node-7", pid=4242)
    with pytest.raises(
        RunFolderError, match="pid 4242 on host 'gpu-node-7'.*equimodal train --out elsewhere"
    ):
        claim_folder(tmp_path)
    assert claim_of(tmp_path)["host"] == "gpu-node-7"  # refused: left as it was
    old = time.time() - FOREIGN_STALE_SECONDS - 60
    os.utime(path, (old, old))
    with caplog.at_level(logging.WARNING, "equimodal.utils.claim"), claim_folder(tmp_path):
        assert claim_of(tmp_path)["host"] == socket.gethostname()
    assert "of pid 4242 on host 'gpu-node-7'" in caplog.text and "last refreshed 11 min ago" in caplog.text


def test_the_owner_refreshes_its_claim(tmp_path: Path) -> None:
    with claim_folder(tmp_path, heartbeat=0.05):
        old = time.time() - 1000
        os.utime(tmp_path / CLAIM_FILE, (old, old))
        time.sleep(0.5)
        assert time.time() - (tmp_path / CLAIM_FILE).stat().st_mtime < 10


def test_a_takeover_never_removes_a_claim_made_after_the_stale_one_was_judged(tmp_path: Path) -> None:
    """Process B judged claim S stale; meanwhile A took S over and made its own claim N. B must not remove N."""
    write_claim(tmp_path, pid=dead_pid())
    judged = _look(tmp_path / CLAIM_FILE)  # B's view of S
    with claim_folder(tmp_path) as claim_a:  # A takes S over
        assert not _take_over(tmp_path / CLAIM_FILE, judged)  # B, late
        assert claim_a.held()
        assert not (tmp_path / f"{CLAIM_FILE}.takeover").exists()


def _contend(folder: str, start: mp.Barrier, results: mp.Queue, done: mp.Event) -> None:  # type: ignore[valid-type]
    start.wait()
    try:
        claim = claim_folder(folder)
    except RunFolderError:
        results.put("refused")
        return
    results.put("claimed")
    done.wait(60)
    claim.release()


def test_of_processes_finding_the_same_stale_claim_one_wins(tmp_path: Path) -> None:
    write_claim(tmp_path, pid=dead_pid())
    ctx = mp.get_context("fork")
    n = 4
    start, results, done = ctx.Barrier(n), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), start, results, done)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in range(n))
    done.set()
    for p in procs:
        p.join(60)
    assert outcomes == ["claimed"] + ["refused"] * (n - 1)
    assert not (tmp_path / CLAIM_FILE).exists()


# ---------------------------------------------------------------------------------- released always
def test_the_claim_is_released_after_success_and_failure_and_ignored_by_the_run_checks(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    code, text = cli(
        ["train", *sets("balancer.name=own_signal", "balancer.options.weight=-1"), "--out", str(out)], capsys
    )
    assert code == 2 and "weight" in text
    assert not (out / CLAIM_FILE).exists()
    assert cli(["train", *sets("train.epochs=1"), "--out", str(out)], capsys)[0] == 0
    assert not (out / CLAIM_FILE).exists()
    with claim_folder(out):
        assert RunFolder(out).has_outputs()
        RunFolder(out).clear(config=True)
        assert not RunFolder(out).has_outputs() and (out / CLAIM_FILE).exists()  # the claim is no run output


def test_the_claim_is_released_after_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = equimodal(
        ["train", *sets("train.epochs=200", "data.batch_size=16"), "--out", str(out)], tmp_path / "log"
    )
    wait_for(out / "config.yaml", proc)  # written after the claim, which is taken with the handlers set
    assert (out / CLAIM_FILE).exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "log").read_text()[-3000:]
    assert not (out / CLAIM_FILE).exists()
    assert (out / "last.pt").exists()


# ------------------------------------------------------------------------------------------ prepare
def _cremad_fixture():
    """The raw CREMA-D tree generator of tests/prepare/test_cremad.py."""
    spec = importlib.util.spec_from_file_location(
        "cremad_fixture", Path(__file__).parent / "prepare" / "test_cremad.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_second_prepare_into_the_same_out_is_refused_and_the_first_completes(
    tmp_path: Path, capsys
) -> None:
    cremad = _cremad_fixture()
    raw, out = cremad.make_raw(tmp_path / "raw"), tmp_path / "prepared"
    args = ["prepare", "cremad", "--raw", str(raw), "--out", str(out), "--workers", "1", *cremad.SMALL]
    first = equimodal(args, tmp_path / "first.log")
    try:
        wait_for(out / ".prepare-settings.json", first)
        first.send_signal(signal.SIGSTOP)
        code, text = cli(args, capsys)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert code == 2 and f"is in use by another process: pid {first.pid} on host" in text, text
    info = json.loads((out / "prepare.json").read_text())
    assert sum(info["counts"].values()) == len(cremad.GOOD) and len(info["skipped"]) == 6
    for key in cremad.GOOD:
        assert (
            len(list((out / "visual" / key).glob("*.jpg"))) >= 1 and (out / "audio" / f"{key}.npy").is_file()
        )
    assert not list((out / "visual").glob(".*")) and not (out / CLAIM_FILE).exists()


def test_save_frame_folder_removes_only_temporary_folders_of_writers_that_are_gone(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = dead_pid()
        busy = tmp_path / f".clip.{live.pid}.0a1b2c3d.tmp"
        busy.mkdir()
        (busy / "00001.jpg").write_bytes(b"a live writer's frame")
        left = [tmp_path / f".clip.{gone}.deadbeef.tmp", tmp_path / f".clip.{gone}.tmp"]
        other = tmp_path / f".clip.x.{gone}.deadbeef.tmp"  # clip "clip.x"'s, not clip's
        for folder in (*left, other):
            folder.mkdir()
        save_frame_folder(tmp_path / "clip", [np.zeros((8, 8, 3), np.uint8)] * 2)
        assert (busy / "00001.jpg").read_bytes() == b"a live writer's frame"
        assert not any(p.exists() for p in left) and other.exists()
        assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == ["00001.jpg", "00002.jpg"]
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------------------------------ torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, out: str, results: mp.Queue) -> None:  # type: ignore[valid-type]
    from equimodal.engine.config import load_config
    from equimodal.engine.trainer import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    try:
        train(load_config(None, [*FAST, "train.epochs=1", "data.batch_size=64"]), out)
        results.put((rank, "trained"))
    except RunFolderError as err:
        results.put((rank, str(err)))


@pytest.mark.ddp
def test_a_claimed_folder_is_refused_on_every_rank(tmp_path: Path) -> None:
    """Two gloo processes (forked, so quick): rank 0 is refused, rank 1 learns it and raises, no hang."""
    out, ctx, port = tmp_path / "run", mp.get_context("fork"), _free_port()
    results = ctx.Queue()
    with claim_folder(out):
        procs = [ctx.Process(target=_rank, args=(r, port, str(out), results)) for r in (0, 1)]
        for p in procs:
            p.start()
        outcomes = dict(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(60)
    assert all(f"is in use by another process: pid {os.getpid()} on host" in outcomes[r] for r in (0, 1)), (
        outcomes
    )
    assert outcomes[0] == outcomes[1] and not (out / "config.yaml").exists()


@pytest.mark.ddp
@pytest.mark.slow
def test_under_torchrun_a_claimed_folder_is_refused_on_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "equimodal", "train", *sets("train.epochs=1", "data.batch_size=64"), "--out", str(out)]  # fmt: skip
    with claim_folder(out):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    err = " ".join(done.stderr.split())
    assert done.returncode != 0 and "exitcode : 2" in err, err[-3000:]
    assert err.count(f"is in use by another process: pid {os.getpid()}") == 2, err[-3000:]  # both ranks
    assert not (out / "config.yaml").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["compare", "--balancers", "none", "--seeds", "1", "--no-references"],
        ["diagnose", "--seeds", "1"],
    ],
    ids=lambda c: c[0],
)
def test_an_experiment_leaves_a_run_held_by_another_process_to_it_and_trains_it_once_released(
    tmp_path, command
) -> None:
    """Several experiments may share a folder: a run folder another live process holds (here this test
    process) is not trained, the experiment says whose it is and waits; once the holder lets it go
    unfinished, the experiment trains it and writes its tables."""
    out = tmp_path / "exp"
    label = "none" if command[0] == "compare" else "joint"
    held = out / label / "seed0"
    sets = [a for s in ["train.epochs=1", *FAST] for a in ("--set", s)]
    with claim_folder(held):
        proc = subprocess.Popen(
            [sys.executable, "-m", "equimodal", *command, "--out", str(out), *sets],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
        )  # fmt: skip
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "waiting for it" in line or "Waiting for" in line:
                break
        text = " ".join("".join(seen).split())
        assert f"{label}/seed0 is trained by another process (pid {os.getpid()}" in text, text
        assert not RunFolder(held).finished
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(seen) + rest
    assert RunFolder(held).finished
    table = out / ("results.md" if command[0] == "compare" else "diagnosis.md")
    assert table.is_file()


def test_diagnose_with_runs_that_did_not_finish_exits_1_without_a_traceback(tmp_path, capsys) -> None:
    """A run that fails (here: a learning rate that makes the loss non-finite) leaves the diagnosis without
    its runs: exit 1 naming that and the retry, no traceback (it used to escape as a RuntimeError)."""
    sets = [a for s in ["train.epochs=1", "optim.lr=1e20", *FAST] for a in ("--set", s)]
    assert main(["diagnose", "--seeds", "1", "--out", str(tmp_path / "d"), *sets]) == 1
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())
    assert "did not finish" in text and "Rerun the same command" in text and "Traceback" not in text
    assert not (tmp_path / "d" / CLAIM_FILE).exists()  # released
