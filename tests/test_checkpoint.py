"""Checkpoints hold plain data, load with ``weights_only=True`` and never run code.

For every registered balancer a run stopped right after a checkpoint (mid-epoch, or at the end of an
epoch) resumes from a ``last.pt`` read with ``weights_only=True`` to the summary of an uninterrupted run;
a planted pickle that would run code is refused, naming the file, and never runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import RUN_OPTIONS

import equimodal as em
from equimodal.cli import main
from equimodal.engine.checkpoint import Checkpointer, Progress
from equimodal.engine.config import load_config
from equimodal.engine.fitting import EpochState
from equimodal.engine.trainer import train
from equimodal.utils.io import plain_data

TINY = [
    "data.options.views=fac,mor", "train.epochs=2", "train.progress=false", "train.probe=false",
    "data.batch_size=128", "train.checkpoint_every=3", "train.num_threads=1",
]  # fmt: skip


class Killed(Exception):
    """Stands for a process killed right after it wrote a checkpoint."""


def _scores(summary: dict[str, Any]) -> dict[str, Any]:
    return {"val": summary["val"], "test": summary["test"], "epoch": summary["selected_epoch"]}


def _kill_after_save(monkeypatch: pytest.MonkeyPatch, epoch: int, mid_epoch: bool) -> None:
    """Make the run die right after it writes ``last.pt`` in ``epoch`` (mid-way, or at its end)."""
    save = Checkpointer.save_last

    def save_then_die(self, parts, progress, at, partial=None):  # noqa: ANN001, ANN202
        save(self, parts, progress, at, partial)
        if at == epoch and (partial is not None) == mid_epoch:
            raise Killed

    monkeypatch.setattr(Checkpointer, "save_last", save_then_die)


@pytest.mark.parametrize("name", em.list_balancers())
def test_every_balancer_resumes_under_weights_only_to_the_uninterrupted_summary(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, [*TINY, f"balancer.name={name}", *RUN_OPTIONS.get(name, ())])
    reference = _scores(train(cfg))
    for mid_epoch in (True, False):
        out = tmp_path / ("mid" if mid_epoch else "end")
        with monkeypatch.context() as patch:
            _kill_after_save(patch, epoch=1 if mid_epoch else 0, mid_epoch=mid_epoch)
            with pytest.raises(Killed):
                train(cfg, out)
        saved = torch.load(out / "last.pt", weights_only=True)
        assert (saved["partial"] is not None) == mid_epoch, name
        assert _scores(train(cfg, out)) == reference, (
            f"{name}, killed {'mid-epoch' if mid_epoch else 'at epoch end'}"
        )


@pytest.mark.parametrize(
    "optim",
    [
        ("sgd", "multistep", "optim.milestones=[1]"),
        ("adam", "cosine"),
        ("adamw", "step", "optim.step_size=1"),
    ],
)
def test_every_optimizer_and_schedule_resumes_under_weights_only(
    optim: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, schedule, *extra = optim  # MultiStepLR keeps a collections.Counter, which weights_only reads
    cfg = load_config(None, [*TINY, f"optim.name={name}", f"optim.schedule={schedule}", *extra])
    reference = _scores(train(cfg))
    with monkeypatch.context() as patch:
        _kill_after_save(patch, epoch=1, mid_epoch=True)
        with pytest.raises(Killed):
            train(cfg, tmp_path)
    assert _scores(train(cfg, tmp_path)) == reference


class Planted:
    """A pickle that writes ``marker`` when it is unpickled (what a malicious ``last.pt`` could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_planted_pickle_is_refused_naming_the_file_and_never_runs(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, marker = tmp_path / "run", tmp_path / "ran.txt"
    args = ["train", *(x for o in TINY for x in ("--set", o)), "--set", "train.epochs=1", "--out", str(out)]
    assert main(args) == 0
    (out / "summary.json").unlink()  # a finished run resumed reads last.pt, then best.pt
    config = torch.load(out / "last.pt", weights_only=True)["config"]
    torch.save({"config": config, "model": Planted(marker)}, out / name)
    capsys.readouterr()
    code = main(args)
    text = " ".join(capsys.readouterr().err.split())
    assert code == 2, text
    assert f"{str(out / name)!r} holds objects other than equimodal's (it refers to exec)" in text
    assert "--no-resume" in text and "--out another folder" in text
    assert not marker.exists()
    assert main([*args, "--no-resume"]) == 0 and not marker.exists()


def test_numpy_numbers_are_saved_as_python_numbers_and_other_objects_refused(tmp_path: Path) -> None:
    class Part:
        def __init__(self, state: dict[str, Any]) -> None:
            self.state = state

        def state_dict(self) -> dict[str, Any]:
            return self.state

    ckpt = Checkpointer(tmp_path, {"seed": np.int64(3)}, main=True)
    state = {"scale": np.float32(0.5), "flags": [np.bool_(True)], "t": torch.ones(2)}
    progress = Progress(rows=[{"epoch": 0, "val_acc": np.float64(0.75)}])
    ckpt.save_last(
        {"balancer": Part(state)}, progress, 0, partial=EpochState(stat_sums={"k": np.float64(2.0)})
    )
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["balancer"]["scale"] == 0.5 and type(saved["balancer"]["scale"]) is float
    assert saved["balancer"]["flags"] == [True] and torch.equal(saved["balancer"]["t"], torch.ones(2))
    assert type(saved["rows"][0]["val_acc"]) is float and saved["config"] == {"seed": 3}
    assert saved["partial"]["stat_sums"] == {"k": 2.0}
    with pytest.raises(
        TypeError, match=r"Cannot save balancer\['memory'\]\[1\] in a checkpoint.*numpy.ndarray"
    ):
        ckpt.save_last({"balancer": Part({"memory": [1.0, np.zeros(3)]})}, progress, 0)


def test_a_model_state_dict_is_kept_as_it_is() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    state = model.state_dict()
    assert plain_data(state, "model") is state  # nothing converted: the same object, _metadata and all
    with_numpy = {**state, "extra": np.float64(1.0)}
    assert plain_data(with_numpy, "model")["extra"] == 1.0
