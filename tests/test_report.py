"""``equimodal report`` draws runs' curves: where the figure goes, its axes, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from equimodal.cli import main
from equimodal.config import load_config
from equimodal.report import curves_figure, plot_run, plot_runs
from equimodal.train import train


def test_report_writes_curves_png(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    overrides = ["data.options.views=fac,mor", "train.epochs=2", "train.progress=false", "train.probe=false"]
    train(load_config(None, [*overrides, "balancer.name=amss"]), run)
    assert main(["report", str(run), "--out", str(run / "curves.png")]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in capsys.readouterr().out


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "holds neither metrics.csv" in " ".join(capsys.readouterr().err.split())
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
    assert "No metrics.csv" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="equimodal train --out"):
        from equimodal.report import read_metrics

        read_metrics(tmp_path)


def _fake_run(folder, balancer: bool = True, rows: int = 3):
    """A run folder as train writes it: metrics.csv (one row per epoch) and summary.json."""
    folder.mkdir(parents=True)
    header = ["epoch", "train_loss", "val_acc", "val_acc_a", "val_acc_b"] + (
        ["bal_k/a", "bal_k/b"] if balancer else []
    )
    lines = [",".join(header)]
    for e in range(rows):
        values = [e, 1.0 / (e + 1), 0.90 + 0.01 * e, 0.8, 0.7] + ([0.5, 0.6] if balancer else [])
        lines.append(",".join(str(v) for v in values))
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps({"selected_epoch": rows - 1}))
    return folder


def test_out_is_honoured_for_several_runs(tmp_path) -> None:
    a, b = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", balancer=False)
    target = tmp_path / "figs" / "both.png"
    assert plot_runs([a, b], target) == [target]
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (a / "curves.png").exists() and not (b / "curves.png").exists()
    assert plot_runs([a, b]) == [a / "curves.png", b / "curves.png"]  # without out: one per run
    assert plot_run(a, tmp_path / "one.png") == tmp_path / "one.png"
    cli_out = tmp_path / "cli.png"
    assert main(["report", str(a), str(b), "--out", str(cli_out)]) == 0  # the CLI honours --out too
    assert cli_out.read_bytes()[:4] == b"\x89PNG"


def test_the_figure_has_a_row_per_run_and_accuracy_from_zero(tmp_path) -> None:
    import matplotlib.pyplot as plt

    runs = [_fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", balancer=False), _fake_run(tmp_path / "c")]
    fig = curves_figure(runs)
    grid = np.array(fig.axes).reshape(3, 3)
    for row, run in zip(grid, runs, strict=True):
        assert row[0].get_ylim() == (0.0, 100.0)
        assert str(run) in row[0].get_title()
    assert not grid[1, 2].axison  # the run without balancer statistics leaves its third panel empty
    plt.close(fig)
    fig = curves_figure([runs[1]])  # one run: two panels, accuracy from 0 as well
    assert len(fig.axes) == 2 and fig.axes[0].get_ylim()[0] == 0
    plt.close(fig)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("folder", r"is a folder; pass an image file path, e.g\. '.*curves\.png'"),
        (
            "curves.txt",
            r"expected an image file ending in \.png .*found '\.txt'\. Pass e\.g\. --out '.*curves\.png'",
        ),
        ("curves", r"found 'no suffix'"),
    ],
)
def test_a_bad_out_says_what_to_pass(tmp_path, out, message) -> None:
    (tmp_path / "folder").mkdir()
    run = _fake_run(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        plot_runs([run], tmp_path / out)


def test_nothing_is_written_when_one_folder_is_not_a_run(tmp_path) -> None:
    good = _fake_run(tmp_path / "good")
    with pytest.raises(FileNotFoundError, match="No metrics.csv in .*missing"):
        plot_runs([good, tmp_path / "missing"])
    assert not (good / "curves.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.csv").write_text("epoch,train_loss,val_acc\n")
    with pytest.raises(ValueError, match="has no epoch rows yet"):
        plot_runs([empty], tmp_path / "x.png")
