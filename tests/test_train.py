"""The reference trainer end to end on small real data."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from equimodal.engine.config import load_config
from equimodal.engine.trainer import stratified_holdout, train

FAST = ["data.options.views=fac,mor", "train.epochs=3", "train.progress=false", "data.batch_size=128"]


def test_run_folder_and_selection_on_val(tmp_path) -> None:
    summary = train(load_config(None, FAST), tmp_path)
    for name in ("config.yaml", "metrics.csv", "best.pt", "last.pt", "summary.json", "predictions.npz"):
        assert (tmp_path / name).exists(), name
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    best = max(rows, key=lambda r: float(r["val_acc"]))
    assert summary["val"]["val_acc"] == pytest.approx(float(best["val_acc"]))
    assert float(rows[summary["selected_epoch"]]["val_acc"]) == float(best["val_acc"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "test_acc",
        "test_f1",
        "test_acc_fac",
        "test_acc_mor",
        "test_probe_fac",
        "test_probe_mor",
        "test_removed_fac",
        "test_removed_mor",
        "test_imbalance",
    ):
        assert key in on_disk["test"], key
    assert 0.5 < on_disk["test"]["test_acc"] <= 1.0


def test_interrupted_run_resumes_to_the_same_result(tmp_path) -> None:
    cfg = load_config(None, FAST)
    reference = train(cfg, tmp_path / "ref")

    class Stop(Exception):
        pass

    def stop_after_first(row):
        if row["epoch"] == 0:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", on_epoch=stop_after_first)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = train(cfg, tmp_path / "cut")
    assert resumed["test"]["test_acc"] == reference["test"]["test_acc"]
    assert resumed["val"]["val_loss"] == pytest.approx(reference["val"]["val_loss"], rel=1e-6)


def test_same_seed_same_result_and_seed_option_rejected() -> None:
    cfg = load_config(None, FAST + ["train.probe=false", "train.epochs=1"])
    assert train(cfg)["val"]["val_loss"] == train(cfg)["val"]["val_loss"]
    with pytest.raises(ValueError, match="train.seed"):
        train(load_config(None, FAST + ["data.options.seed=3"]))


def test_unknown_names_fail_before_training() -> None:
    with pytest.raises(ValueError, match="Unknown balancer 'amsss'.*amss"):
        train(load_config(None, FAST + ["balancer.name=amsss"]))
    with pytest.raises(ValueError, match="Unknown optimizer"):
        train(load_config(None, FAST + ["optim.name=lbfgs"]))


def test_stratified_holdout_is_disjoint_and_per_class() -> None:
    labels = torch.arange(10).repeat_interleave(20)
    kept, held = stratified_holdout(labels, 0.1, torch.Generator().manual_seed(0))
    assert set(kept.tolist()).isdisjoint(held.tolist())
    assert len(kept) + len(held) == 200
    assert torch.bincount(labels[held]).tolist() == [2] * 10


def test_gradient_accumulation_matches_one_big_batch() -> None:
    base = ["data.options.views=fac,mor", "train.epochs=2", "train.progress=false", "train.probe=false"]
    big = train(load_config(None, [*base, "data.batch_size=40"]))  # 1200 training samples: 30 full batches
    acc = train(load_config(None, [*base, "data.batch_size=20", "train.grad_accum=2"]))
    assert acc["val"]["val_loss"] == pytest.approx(big["val"]["val_loss"], rel=1e-4)
    assert (
        acc["val"]["val_loss"] != train(load_config(None, [*base, "data.batch_size=20"]))["val"]["val_loss"]
    )


def test_mslr_keep_mode_trains_on_the_whole_training_split() -> None:
    from conftest import make_toy_model

    import equimodal as em

    assert em.create_balancer("mslr", make_toy_model(2), mode="keep").requirements.heldout_fraction == 0.0
    assert em.create_balancer("mslr", make_toy_model(2)).requirements.heldout_fraction > 0.0


def test_non_finite_data_is_rejected_once_before_training() -> None:
    from equimodal.data import load_dataset

    ds = load_dataset("mfeat", views="fac,mor", seed=0)
    ds.test.inputs["mor"][3, 1] = float("nan")
    with pytest.raises(ValueError, match="modality 'mor' holds 1 non-finite"):
        train(load_config(None, FAST), dataset=ds)


def test_the_indexed_training_split_is_read_without_augmentation() -> None:
    """Planners' per-sample passes read an on-disk training split as evaluation does (the reader gets no
    generator), while the training loader augments (a seeded generator per sample)."""
    from equimodal.data import load_dataset
    from equimodal.data.base import FileSplit, LoaderOptions
    from equimodal.engine.config import load_config
    from equimodal.engine.trainer import build_loaders

    calls: list[bool] = []

    def reader(i: int, gen: torch.Generator | None) -> dict[str, torch.Tensor]:
        calls.append(gen is not None)
        return {"m0": torch.full((3,), float(i)), "m1": torch.ones(2)}

    split = FileSplit(reader, torch.arange(8), torch.arange(8) % 2, train=True, seed=1)
    cfg = load_config(None, ["data.batch_size=4", "data.eval_batch_size=4"])
    ds = load_dataset(cfg.data.name, seed=0, **cfg.data.options)
    loaders = build_loaders(cfg, (split, None, ds), 0, 1, LoaderOptions(0, False, False, None), indexed=True)
    assert sum(len(b[1]) for b in loaders.indexed) == 8 and not any(calls)
    next(iter(loaders.train))
    assert calls[-1]  # the training loader still augments
