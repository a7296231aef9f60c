"""``equimodal report`` draws a run's curves."""

from __future__ import annotations

import pytest

from equimodal.cli import main
from equimodal.config import load_config
from equimodal.train import train


def test_report_writes_curves_png(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    overrides = ["data.options.views=fac,mor", "train.epochs=2", "train.progress=false", "train.probe=false"]
    train(load_config(None, [*overrides, "balancer.name=amss"]), run)
    assert main(["report", str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in capsys.readouterr().out


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "No metrics.csv" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="equimodal train --out"):
        from equimodal.report import read_metrics

        read_metrics(tmp_path)
