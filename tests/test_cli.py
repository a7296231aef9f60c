"""The command line."""

from __future__ import annotations

import json

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
    assert "optim.lr: expected float" in capsys.readouterr().err
