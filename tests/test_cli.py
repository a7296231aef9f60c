"""The command line."""

from __future__ import annotations

import json
from pathlib import Path

from equimodal.cli import main


def test_list_commands(capsys) -> None:
    assert main(["list", "balancers"]) == 0
    names = capsys.readouterr().out.split()
    assert "none" in names and "amss_plus" in names
    assert main(["list", "datasets"]) == 0
    assert "mfeat" in capsys.readouterr().out.split()
    assert main(["list", "fusions"]) == 0
    assert set(capsys.readouterr().out.split()) >= {"concat", "sum", "weighted", "film", "gated", "attention"}


def test_train_prints_table_and_writes_run(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--set",
            "train.epochs=1",
            "--set",
            "data.options.views=fac,mor",
            "--set",
            "train.progress=false",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "fused accuracy" in text and "fac: unimodal accuracy" in text and "mor: linear probe" in text
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_errors_are_reported_with_exit_code_2(capsys) -> None:
    assert main(["train", "--set", "balancer.name=ogmge"]) == 2
    err = capsys.readouterr().err
    assert "Unknown balancer 'ogmge'" in err and "ogm_ge" in err
    assert main(["train", "--set", "optim.lr=fast"]) == 2
    assert "optim.lr: expected a number" in capsys.readouterr().err


def test_train_keeps_its_run_by_default_and_a_rerun_resumes_it(tmp_path, capsys) -> None:
    """Without --out a run is kept in a folder of its own config (study and diagnose save by default too);
    the same command again finds it finished instead of training 40 epochs again; --no-save keeps nothing."""
    sets = ["train.epochs=1", "data.options.views=fac,mor", "train.probe=false"]
    argv = ["train", *[a for x in sets for a in ("--set", x)]]
    assert main(argv) == 0
    first = capsys.readouterr().out
    folders = list(Path("runs/train").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("mfeat-none-")
    assert first.index(f"Run folder: {folders[0]}") < first.index("fused accuracy")  # said before training
    summary = json.loads((folders[0] / "summary.json").read_text())
    assert main(argv) == 0
    assert json.loads((folders[0] / "summary.json").read_text()) == summary
    assert main([*argv, "--set", "optim.lr=0.01"]) == 0  # another config: another folder, nothing refused
    assert len(list(Path("runs/train").iterdir())) == 2
    capsys.readouterr()
    assert main([*argv, "--set", "train.seed=5", "--no-save"]) == 0
    assert "nothing was kept" in capsys.readouterr().out and len(list(Path("runs/train").iterdir())) == 2
    assert main([*argv, "--no-save", "--out", str(tmp_path / "x")]) == 2
