"""steps.csv (the balancer's per-step statistics) and the optional TensorBoard event files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from equimodal.engine.config import load_config
from equimodal.engine.trainer import train

FAST = ["data.options.views=fac,mor", "train.epochs=2", "train.probe=false", "train.progress=false",
        "balancer.name=amss"]  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_steps_csv_records_every_step_with_the_layers(tmp_path: Path) -> None:
    train(load_config(None, FAST), tmp_path / "r")
    rows = _rows(tmp_path / "r" / "steps.csv")
    steps = [int(r["step"]) for r in rows]
    assert steps == list(range(1, len(rows) + 1)) and {r["epoch"] for r in rows} == {"0", "1"}
    assert {"k/fac", "k/mor", "kept_fraction/fac"} <= set(rows[0])
    layers = [k for k in rows[0] if k.startswith("layer_kept/fac/")]
    assert layers and all(0 < float(rows[-1][k]) <= 1 for k in layers)
    metrics = _rows(tmp_path / "r" / "metrics.csv")
    assert f"bal_{layers[0]}" in metrics[0]  # epoch means of the per-layer figures too


def test_steps_every_n_and_a_resumed_run_keeps_its_rows(tmp_path: Path) -> None:
    cfg = load_config(None, [*FAST, "train.stats_every=5", "train.epochs=3"])
    train(cfg, tmp_path / "whole")
    whole = _rows(tmp_path / "whole" / "steps.csv")
    assert all(int(r["step"]) % 5 == 0 for r in whole) and len(whole) > 3

    class Stop(Exception):
        pass

    def stop_after_epoch(row: dict) -> None:
        if row["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", on_epoch=stop_after_epoch)
    train(cfg, tmp_path / "cut")  # resumes from last.pt after epoch 1
    assert _rows(tmp_path / "cut" / "steps.csv") == whole


def test_tensorboard_mirrors_epochs_and_steps(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(load_config(None, [*FAST, "train.tensorboard=true"]), tmp_path / "r")
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/val_acc", "epoch/train_loss", "epoch/train_acc_fac", "step/k/fac"} <= tags
    assert [e.step for e in events.Scalars("epoch/val_acc")] == [0, 1]
    assert len(events.Scalars("step/k/fac")) == len(_rows(tmp_path / "r" / "steps.csv"))
    with pytest.raises(ValueError, match="train.tensorboard=true writes into the run folder: pass --out"):
        train(load_config(None, [*FAST, "train.tensorboard=true"]))
