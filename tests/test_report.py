"""``equimodal report`` draws runs' curves: where the figure goes, its axes, and bad inputs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from equimodal.cli import main
from equimodal.engine.config import load_config
from equimodal.engine.trainer import train
from equimodal.reporting.curves import curves_figure, plot_run, plot_runs


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
        from equimodal.reporting.curves import read_metrics

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


def _damage(folder, name: str, how: str) -> None:
    """Damage ``folder/name``: cut its last 5 bytes, replace it by garbage bytes, or by other text."""
    path = folder / name
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-5])
    elif how == "garbage":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        path.write_text(how)


def _comparison(folder):
    """A comparison folder as far as `equimodal report` reads it: results.json, .csv, .md, one run."""
    _fake_run(folder / "none" / "seed0")
    (folder / "results.json").write_text(json.dumps({"none": {"0": {"test": {"test_acc": 0.5}}}}))
    (folder / "results.csv").write_text("method,test acc\nnone,50.0\n")
    (folder / "results.md").write_text("| method |\n\nA note.\n")
    return folder


@pytest.mark.parametrize(
    ("name", "how", "expected"),
    [
        ("summary.json", "truncated", r"summary\.json' is not valid JSON \(.* at line \d+, column \d+\)"),
        ("summary.json", "[1, 2]", r"summary\.json' holds a JSON list, not an object"),
        ("metrics.csv", "truncated", r"metrics\.csv' line 4: 6 fields where the header has 7"),
        (
            "metrics.csv",
            "epoch,val_acc\n0,high\n",
            r"metrics\.csv' line 2, column 'val_acc': expected a number",
        ),
        ("metrics.csv", "garbage", r"metrics\.csv' is not UTF-8 text \(byte 0\)"),
    ],
)
def test_a_damaged_run_file_is_named_with_the_fix(
    tmp_path, capsys, monkeypatch, name: str, how: str, expected: str
) -> None:
    monkeypatch.setenv("COLUMNS", "10000")  # the error console does not wrap the long paths
    run = _fake_run(tmp_path / "run")
    (run / "summary.json").write_text(json.dumps({"selected_epoch": 2, "test": {"test_acc": 0.5}}, indent=2))
    _damage(run, name, how)
    pages = [[], ["--out", str(tmp_path / "c.png")]]  # the HTML page and the curves figure
    for out in pages[1:] if "high" in how else pages:  # the page shows text cells as they are
        assert main(["report", str(run), *out]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert re.search(expected, err), err
        assert "the file is truncated, damaged or not one equimodal wrote" in err and "Traceback" not in err
    fix = "Rerun `equimodal train` with the run's config.yaml" if name == "summary.json" else "--no-resume"
    assert fix in err


@pytest.mark.parametrize(
    ("name", "how", "expected"),
    [
        ("results.json", "truncated", r"results\.json' is not valid JSON"),
        ("results.csv", "method,test acc\nnone\n", r"results\.csv' line 2: 1 fields where the header has 2"),
        ("none/seed0/predictions.npz", "not a zip", r"predictions\.npz' is not a readable \.npz archive"),
        ("none/seed0/summary.json", "{}", r"summary\.json' has no 'test\.test_acc' entry"),
    ],
)
def test_damaged_comparison_files_are_named(tmp_path, name: str, how: str, expected: str) -> None:
    from equimodal.experiments.specs import RunSpec, finished_summary
    from equimodal.reporting.html import build_page, run_section

    folder = _comparison(tmp_path / "cmp")
    (folder / "none" / "seed0" / "predictions.npz").write_bytes(b"")
    np.savez(
        folder / "none" / "seed0" / "predictions.npz", test_labels=np.zeros(2), test_logits=np.zeros((2, 2))
    )
    (folder / "none" / "seed0" / "summary.json").write_text(json.dumps({"test": {"test_acc": 0.5}}))
    _damage(folder, name, how)
    with pytest.raises(ValueError, match=expected):
        if name.endswith("predictions.npz"):
            run_section(folder / "none" / "seed0")
        elif name.endswith("summary.json"):
            finished_summary(folder, RunSpec("none", (), 0))
        else:
            build_page([folder])


@pytest.mark.parametrize(("name", "keys"), [("diagnosis.json", "'modalities'"), ("study.json", "'study'")])
def test_damaged_diagnosis_and_study_files_are_named(tmp_path, name: str, keys: str) -> None:
    from equimodal.reporting.html import build_page

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / name).write_text("{}")
    with pytest.raises(ValueError, match=rf"{name}' has no {keys} entry: the file is .*Rerun the command"):
        build_page([folder])
    (folder / name).write_text('{"modalities": {"a": {}}, "headroom": {}, "study": "x"')
    with pytest.raises(ValueError, match=rf"{name}' is not valid JSON"):
        build_page([folder])
