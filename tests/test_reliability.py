"""Runs never lose work, never report failure as success, and say what went wrong (CLI and API).

Each test is one fault or bad input: a run folder of another config, a non-finite loss, invalid values,
broken checkpoints and paths, signals, SIGKILL mid-epoch, and output off a terminal.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import equimodal as em
from equimodal.cli import main
from equimodal.engine.config import load_config
from equimodal.engine.trainer import train

FAST = ["train.epochs=2", "train.progress=false", "train.probe=false", "data.options.views=fac,mor"]


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI; returns the exit code and what it printed (stdout + stderr, whitespace folded)."""
    code = main(args)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def sets(*overrides: str) -> list[str]:
    return [x for o in (*FAST, *overrides) for x in ("--set", o)]


def test_a_run_folder_of_another_config_is_refused_and_kept(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli(["train", *sets(), "--out", str(out)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, text = cli(["train", *sets("optim.lr=0.02"), "--out", str(out)], capsys)
    assert code == 2
    assert "holds a run of another config (optim.lr: 0.05 there, 0.02 now)" in text
    assert "Pass a new --out folder" in text and "--overwrite" in text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost
    assert cli(["train", *sets("optim.lr=0.02"), "--out", str(out), "--overwrite"], capsys)[0] == 0
    assert json.loads((out / "summary.json").read_text())["config"]["optim"]["lr"] == 0.02


def test_a_run_that_failed_on_a_bad_option_can_be_retried_with_a_fixed_one(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, text = cli(
        ["train", *sets("balancer.name=own_signal", "balancer.options.weight=-1"), "--out", str(out)], capsys
    )
    assert code == 2 and "weight" in text and not (out / "metrics.csv").exists()
    assert (
        cli(["train", *sets("balancer.name=own_signal"), "--out", str(out)], capsys)[0] == 0
    )  # no --overwrite


def test_a_non_finite_loss_stops_the_run_naming_where(tmp_path: Path, capsys) -> None:
    code, text = cli(["train", *sets("optim.lr=1e6"), "--out", str(tmp_path / "r")], capsys)
    assert code == 3
    assert "Non-finite values at epoch 0, optimizer step" in text
    assert any(
        w in text
        for w in ("the unimodal logits of modality 'fac'", "modality 'mor'", "the loss is", "gradient of")
    )
    assert "train.on_nonfinite=skip" in text and not (tmp_path / "r" / "summary.json").exists()


def test_skip_mode_counts_the_skipped_steps(tmp_path: Path) -> None:
    cfg = load_config(None, [*FAST, "optim.lr=1e6", "train.on_nonfinite=skip"])
    summary = train(cfg, tmp_path / "r")
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("skipped_steps")
    assert sum(int(r.split(",")[column]) for r in rows[1:]) > 0
    assert summary["epochs"] == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", "train.epochs: expected an integer >= 1, found 0."),
        ("train.epochs=-1", "train.epochs: expected an integer >= 1, found -1."),
        ("optim.lr=nan", "optim.lr: expected a finite number > 0, found nan."),
        ("optim.lr=0", "optim.lr: expected a finite number > 0, found 0.0."),
        ("data.batch_size=0", "data.batch_size: expected an integer >= 1, found 0."),
        ("optim.momentum=1.5", "optim.momentum: expected a number in [0, 1), found 1.5."),
        ("train.on_nonfinite=ignore", "Unknown train.on_nonfinite value 'ignore'."),
        ("optim.name=lbfgs", "Unknown optimizer (optim.name) 'lbfgs'."),
    ],
)
def test_invalid_values_fail_before_any_work(override: str, message: str, capsys, tmp_path: Path) -> None:
    code, text = cli(["train", "--set", override, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and message in text
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_yaml_errors_name_the_file_line_and_column(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 2\n optim: [\n")
    code, text = cli(["train", str(bad)], capsys)
    assert code == 2 and f"{bad} line 3, column 2: invalid YAML" in text
    code, text = cli(["train", str(tmp_path)], capsys)
    assert code == 2 and "is a folder; pass a YAML file or a preset name" in text


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_truncated_checkpoint_names_the_file_and_no_resume(name: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", *sets(), "--out", str(out)]
    assert cli(args, capsys)[0] == 0
    (out / "summary.json").unlink()
    # last.pt is read by the resume; best.pt then, as the resumed run has no epoch left to train
    (out / name).write_bytes((out / name).read_bytes()[:300])
    code, text = cli(args, capsys)
    assert code == 2 and f"checkpoint {str(out / name)!r} cannot be read" in text and "--no-resume" in text
    assert cli([*args, "--no-resume"], capsys)[0] == 0


def test_bad_output_paths_are_named(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, text = cli(["train", *sets(), "--out", str(a_file)], capsys)
    assert code == 2 and "is an existing file, not a folder" in text
    code, text = cli(["train", *sets(), "--out", str(a_file / "run")], capsys)  # below a file: cannot exist
    assert code == 2 and f"--out {str(a_file / 'run')!r} cannot be written" in text


def test_modalities_of_different_batch_sizes_are_named() -> None:
    from equimodal.testing import toy_model

    model = toy_model(2)
    with pytest.raises(ValueError, match=r"different numbers of samples: \{'m0': 4, 'm1': 3\}"):
        model({"m0": torch.randn(4, 5), "m1": torch.randn(3, 6)})


def test_outputs_follow_the_umask_and_save_the_class_names(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        summary = train(load_config(None, FAST), tmp_path / "r")
    finally:
        os.umask(old)
    for name in ("summary.json", "metrics.csv", "last.pt", "predictions.npz", "config.yaml"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == 0o644, name
    assert summary["class_names"] == em.load_dataset("mfeat").class_names
    import numpy as np

    assert np.load(tmp_path / "r" / "predictions.npz")["class_names"].tolist() == summary["class_names"]


def test_with_no_save_the_cli_says_nothing_was_kept(capsys) -> None:
    code, text = cli(["train", *sets("train.epochs=1"), "--no-save"], capsys)
    assert code == 0 and "--no-save: nothing was kept" in text and not Path("runs").exists()


# ------------------------------------------------------------------ subprocess runs: logs, signals, kill -9
def _equimodal(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "equimodal", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


LONG = ["--set", "data.options.views=fac,mor", "--set", "train.probe=false", "--set", "data.batch_size=16",
        "--set", "train.epochs=3", "--set", "train.checkpoint_every=10", "--set", "train.log_every=10",
        "--set", "train.num_threads=1"]  # fmt: skip


def _wait_for_partial(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Read the run's log until the line after its step-10 checkpoint of epoch 2 (index 1) appears.

    The trainer writes ``last.pt`` before it logs the step, so a mid-epoch checkpoint of epoch 1 exists
    from then on (until the end of that epoch, which is far away in steps).
    """
    deadline = time.time() + timeout
    assert proc.stdout is not None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the run ended before its step-10 checkpoint of epoch 1 (rc {proc.poll()})")
        if line.startswith("epoch 1, step 10:"):
            return
    raise AssertionError("no mid-epoch checkpoint appeared")


def _scores(summary: dict) -> dict:
    return {"val": summary["val"], "test": summary["test"], "epoch": summary["selected_epoch"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _equimodal(["train", *LONG, "--out", str(out)])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    epochs = [ln.split(":")[0] for ln in stdout.splitlines() if "/2:" in ln]
    # one numbering everywhere, from 0 (as Lightning): the log lines, metrics.csv and summary.json
    assert epochs == ["epoch 0/2", "epoch 1/2", "epoch 2/2"], stdout
    assert "epoch 0, step 10: train loss" in stdout  # train.log_every
    with open(out / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selected_epoch"] in (0, 1, 2) and summary["epochs"] == 3
    return summary


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_resumes_to_the_same_summary(sig: int, tmp_path: Path, uninterrupted: dict) -> None:
    out = tmp_path / "run"
    proc = _equimodal(["train", *LONG, "--out", str(out)])
    _wait_for_partial(proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig, stderr
        assert f"{signal.Signals(sig).name} stopped the run in epoch 1" in " ".join(stderr.split())
        assert "Rerun the same command to resume" in " ".join(stderr.split())
    partial = torch.load(out / "last.pt", weights_only=True)
    assert partial["partial"] is not None and partial["epoch"] == 1
    again = _equimodal(["train", *LONG, "--out", str(out)])
    _, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr
    assert _scores(json.loads((out / "summary.json").read_text())) == _scores(uninterrupted)
