"""The machinery shared by every preparer: parallel resumable work, reports, atomic outputs, the layout."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from equimodal.cli import main
from equimodal.prepare import PREPARERS, prepare, register_preparer
from equimodal.prepare.base import Item, PrepareError, Report, read_layout, run_items, save_npy, write_layout


def _square(item: Item, out: Path) -> None:
    """A work function: item.args[0] squared into its output; negative values are 'corrupt inputs'."""
    (value,) = item.args
    if value < 0:
        raise PrepareError(f"input {item.inputs[0]} is corrupt")
    if value == 13:
        raise RuntimeError("a decoder's own exception type")
    save_npy(out / item.outputs[0], np.array([value * value]))


def _items(values: list[int]) -> list[Item]:
    return [Item(f"c{v}", (Path(f"raw/c{v}.wav"),), (f"sq/c{v}.npy",), (v,)) for v in values]


@pytest.mark.parametrize("workers", [1, 2])
def test_run_items_reports_failures_and_resumes(tmp_path: Path, workers: int) -> None:
    report = run_items(_items([1, 2, -3, 13, 4]), _square, tmp_path, workers=workers)
    assert report.done == ["c1", "c2", "c4"] and report.existing == []
    reasons = {f["clip"]: f for f in report.failed}
    assert (
        reasons["c-3"]["reason"] == "input raw/c-3.wav is corrupt"
        and reasons["c-3"]["files"] == "raw/c-3.wav"
    )
    assert reasons["c13"]["reason"].startswith("RuntimeError: a decoder's own exception type")
    assert int(np.load(tmp_path / "sq" / "c4.npy")[0]) == 16
    (tmp_path / "sq" / "c2.npy").unlink()
    again = run_items(_items([1, 2, 4]), _square, tmp_path, workers=workers)
    assert again.done == ["c2"] and sorted(again.existing) == ["c1", "c4"]
    assert not list((tmp_path / "sq").glob(".*tmp"))  # no temporary files left behind


def test_layout_round_trip_and_errors(tmp_path: Path) -> None:
    rows = [
        {"key": "a", "label": "x", "split": "train", "m": "m/a.npy"},
        {"key": "c", "label": "x", "split": "val", "m": "m/c.npy"},
        {"key": "b", "label": "y", "split": "test", "m": "m/b.npy"},
    ]
    info = write_layout(tmp_path, "toy", rows, ["m"], options={"seed": 0, "path": tmp_path}, report=Report())
    assert info["counts"] == {"train": 1, "val": 1, "test": 1} and info["classes"] == ["x", "y"]
    manifest, read = read_layout(tmp_path, "toy")
    assert manifest.read_text().splitlines()[0] == "key,label,split,m" and read == json.loads(
        json.dumps(info)
    )
    assert (tmp_path / "splits" / "test.txt").read_text() == "b\n"
    with pytest.raises(ValueError, match="holds a prepared 'toy' dataset, not 'cremad'"):
        read_layout(tmp_path, "cremad")
    with pytest.raises(
        FileNotFoundError, match=r"Run `equimodal prepare cremad --raw <download folder> --out"
    ):
        read_layout(tmp_path / "nothing", "cremad")


def test_prepare_cli_errors_name_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = PREPARERS._items
    saved = dict(registry)
    try:

        @register_preparer("toy_prepare")
        def toy(raw: Path, out: Path, *, workers: int, level: int = 1) -> dict:
            report = run_items(_items([level, level + 1, level + 2, -1]), _square, out, workers=workers)
            rows = [
                {"key": k, "label": "a", "split": s, "m": f"sq/{k}.npy"}
                for k, s in zip(report.ok, ("train", "val", "test"), strict=True)
            ]
            return write_layout(out, "toy_prepare", rows, ["m"], options={"level": level}, report=report)

        def cli(raw: Path, *extra: str) -> int:
            return main(["prepare", "toy_prepare", "--raw", str(raw), "--out", str(tmp_path / "o"), *extra])

        assert cli(tmp_path / "missing") == 2
        assert "No raw toy_prepare folder at" in " ".join(capsys.readouterr().err.split())
        assert cli(tmp_path, "--set", "levle=2") == 2
        assert "Did you mean 'level'" in " ".join(capsys.readouterr().err.split())
        assert cli(tmp_path, "--set", "level=3", "--workers", "1") == 0
        printed = capsys.readouterr().out
        assert (
            "1 unusable input(s) were skipped" in printed and "c-1: input raw/c-1.wav is corrupt" in printed
        )
        assert (
            prepare("toy_prepare", tmp_path, tmp_path / "o", workers=1, level=3)["skipped"][0]["clip"]
            == "c-1"
        )
        with pytest.raises(ValueError, match="Unknown preparer 'toy_prepar'. Did you mean 'toy_prepare'"):
            prepare("toy_prepar", tmp_path, tmp_path / "o")
    finally:
        registry.clear()
        registry.update(saved)


@pytest.fixture
def toy_preparer() -> Iterator[Callable[..., None]]:
    """``add(name, {value: split}, desc)`` registers a preparer of :func:`_square` items (a negative value
    is a corrupt input); the registry is restored afterwards."""
    saved = dict(PREPARERS._items)

    def add(name: str, splits: dict[int, str], desc: str = "") -> None:
        @register_preparer(name)
        def toy(raw: Path, out: Path, *, workers: int) -> dict:
            report = run_items(_items(list(splits)), _square, out, workers=workers, desc=desc)
            ok = set(report.ok)
            rows = [{"key": f"c{v}", "label": "a", "split": s, "m": f"sq/c{v}.npy"}
                    for v, s in splits.items() if f"c{v}" in ok]  # fmt: skip
            return write_layout(out, name, rows, ["m"], options={}, report=report)

    yield add
    PREPARERS._items.clear()
    PREPARERS._items.update(saved)


def test_a_split_left_empty_fails_naming_what_was_found_and_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toy_preparer: Callable[..., None]
) -> None:
    """Every train input is corrupt: exit 2 naming the split, the counts and the skipped inputs; no layout."""
    toy_preparer("toy_empty", {-1: "train", -2: "train", 3: "val", 4: "test"})
    out = tmp_path / "o"
    assert main(["prepare", "toy_empty", "--raw", str(tmp_path), "--out", str(out), "--workers", "1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "toy_empty: the train split(s) would be empty" in err
    assert "(prepared: 0 train, 1 val, 1 test)" in err and "no manifest was written" in err
    assert "2 input(s) were skipped" in err and "c-1: input raw/c-1.wav is corrupt" in err
    assert [f["clip"] for f in json.loads((out / "skipped.json").read_text())] == ["c-1", "c-2"]
    assert not (out / "manifest.csv").exists() and not (out / "splits").exists()


def test_a_damaged_prepare_json_is_named_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("key,label,split,m\n")
    (tmp_path / "prepare.json").write_text('{"dataset": "toy", "layout_')
    with pytest.raises(
        ValueError, match=r"prepare.json' is not valid JSON .*Rerun `equimodal prepare toy --raw"
    ):
        read_layout(tmp_path, "toy")


def test_progress_lines_go_to_stdout_at_info_level(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    toy_preparer: Callable[..., None],
) -> None:
    """Off a terminal the CLI prints prepare's progress to stdout as plain lines; they are INFO, not WARNING."""
    with caplog.at_level("INFO", logger="equimodal.prepare"):
        run_items(_items([1, 2]), _square, tmp_path / "direct", desc="toy clips")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "toy clips: 1 / 2"),
        ("INFO", "toy clips: 2 / 2"),
    ]
    capsys.readouterr()  # (after an earlier CLI call in this process, those went to stdout too)
    toy_preparer("toy_progress", {1: "train", 2: "val", 3: "test"}, desc="toy clips")
    out_dir = tmp_path / "o"
    assert (
        main(["prepare", "toy_progress", "--raw", str(tmp_path), "--out", str(out_dir), "--workers", "1"])
        == 0
    )
    out, err = capsys.readouterr()
    assert out.splitlines()[:3] == ["toy clips: 1 / 3", "toy clips: 2 / 3", "toy clips: 3 / 3"]
    assert "toy clips" not in err and "WARNING" not in out + err
