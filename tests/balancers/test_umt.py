"""UMT: fidelity to BalanceBenchmark's UMT_trainer.py, the distillation at work, and its teachers' checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import BNEncoder, make_toy_batch, make_toy_model, umt_teachers
from torch import nn

import equimodal as em
from equimodal.models import MultimodalClassifier


def _balancemm_step(model: nn.Module, teachers: dict[str, nn.Module], batch, label, scaling: float):
    """BalanceBenchmark's UMTTrainer.training_step (balancemm/trainer/UMT_trainer.py, lines 129-147) as
    written: CE of the fused output, then per modality a no-grad teacher forward and
    ``loss += scaling * MSE(teacher feature, student feature)``; backward."""
    criterion = nn.CrossEntropyLoss()
    mse = nn.MSELoss()
    features = {m: enc(batch[m]) for m, enc in model.encoders.items()}  # model.encoder_result[m]
    out, _ = model.fusion(features)
    loss = criterion(out, label)
    for modality in teachers:
        with torch.no_grad():
            teacher_feature = teachers[modality](batch[modality])
        loss += scaling * mse(teacher_feature, features[modality])
    loss.backward()
    return loss


@pytest.mark.parametrize("num", [2, 3])
@pytest.mark.parametrize("scaling", [10.0, 0.5])
def test_loss_and_gradients_equal_balancemm(num: int, scaling: float) -> None:
    model = make_toy_model(num, seed=2)
    twin = copy.deepcopy(model)
    teachers = umt_teachers(model, seed=4)
    balancer = em.create_balancer("umt", model, teachers=teachers, scaling=scaling)
    batch, y = make_toy_batch(num, 16, seed=5)
    ours = balancer.loss(model(batch), y, batch=batch)
    ours.backward()
    theirs = _balancemm_step(
        twin, {m: copy.deepcopy(t).eval() for m, t in teachers.items()}, batch, y, scaling
    )
    torch.testing.assert_close(ours, theirs)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    stats = balancer.stats()
    for m in model.encoders:
        expected = nn.MSELoss()(teachers[m](batch[m]), model.encoders[m](batch[m]))
        assert stats[f"mse/{m}"] == pytest.approx(float(expected.detach()), rel=1e-5)


def test_distillation_pulls_the_features_to_the_frozen_teachers_and_only_inside_the_window() -> None:
    model = make_toy_model(2)
    teachers = umt_teachers(model, seed=4)
    frozen = {m: {k: v.clone() for k, v in t.state_dict().items()} for m, t in teachers.items()}
    balancer = em.create_balancer("umt", model, teachers=teachers, scaling=10.0, end_epoch=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batch, y = make_toy_batch(2, 32, seed=6)
    balancer.start_epoch(0)
    seen = []
    for _ in range(30):
        opt.zero_grad()
        balancer.loss(model(batch), y, batch=batch).backward()
        balancer.before_step()
        opt.step()
        seen.append(balancer.stats())
    for m in model.encoders:
        assert seen[-1][f"mse/{m}"] < 0.5 * seen[0][f"mse/{m}"]
    for m, t in balancer.teachers.items():  # frozen and in eval mode
        assert not t.training and all(not p.requires_grad for p in t.parameters())
        for k, v in t.state_dict().items():
            torch.testing.assert_close(v, frozen[m][k])
    balancer.start_epoch(1)  # outside the window: the fused CE alone, nothing recorded
    out = model(batch)
    torch.testing.assert_close(balancer.loss(out, y, batch=batch), nn.functional.cross_entropy(out.logits, y))
    assert balancer.stats() == {}


def test_teacher_mode_train_is_balancemm_batch_statistics() -> None:
    torch.manual_seed(0)
    model = MultimodalClassifier({"m0": BNEncoder(5), "m1": BNEncoder(6)}, 3)
    batch, y = make_toy_batch(2, 16)
    feats = {}
    for mode in ("eval", "train"):
        bal = em.create_balancer("umt", model, teachers=umt_teachers(model, seed=3), teacher_mode=mode)
        feats[mode] = bal.teacher_features(batch)["m0"]
        teacher = copy.deepcopy(bal.teachers["m0"]).train(mode == "train")
        torch.testing.assert_close(feats[mode], teacher(batch["m0"]))
    assert not torch.allclose(feats["eval"], feats["train"])


def _write_run(folder: Path, state: dict[str, torch.Tensor], name: str, modality: str | None) -> None:
    folder.mkdir(parents=True)
    config = {
        "balancer": {"name": name, "options": {"modality": modality} if modality else {}},
        "train": {"seed": 0},
    }
    torch.save({"model": state, "balancer": {}, "epoch": 0, "config": config}, folder / "best.pt")


def test_teachers_from_unimodal_run_folders(tmp_path: Path) -> None:
    model = make_toy_model(2)
    runs = {}
    for i, m in enumerate(model.encoders):
        unimodal = make_toy_model(2, seed=10 + i)
        _write_run(tmp_path / m, unimodal.state_dict(), "unimodal", m)
        runs[m] = unimodal
    bal = em.create_balancer("umt", model, teachers={m: str(tmp_path / m) for m in model.encoders})
    for m in model.encoders:
        for k, v in bal.teachers[m].state_dict().items():
            torch.testing.assert_close(v, runs[m].encoders[m].state_dict()[k])
    # errors: missing folder, not a unimodal run of that modality, another shape
    with pytest.raises(
        ValueError, match=r"umt teacher of 'm0': expected a run folder.*found no folder.*unimodal"
    ):
        em.create_balancer("umt", model, teachers={"m0": str(tmp_path / "nope"), "m1": str(tmp_path / "m1")})
    _write_run(tmp_path / "joint", model.state_dict(), "none", None)
    with pytest.raises(
        ValueError, match=r"not a unimodal run of 'm0': expected balancer.name=unimodal.*found name='none'"
    ):
        em.create_balancer("umt", model, teachers={"m0": str(tmp_path / "joint"), "m1": str(tmp_path / "m1")})
    with pytest.raises(ValueError, match=r"not a unimodal run of 'm0'.*found name='unimodal', modality='m1'"):
        em.create_balancer("umt", model, teachers={"m0": str(tmp_path / "m1"), "m1": str(tmp_path / "m1")})
    wide = make_toy_model(2)
    wide.encoders["m0"] = em.testing.ToyEncoder(5, out_dim=12)
    _write_run(tmp_path / "wide", wide.state_dict(), "unimodal", "m0")
    with pytest.raises(
        ValueError, match=r"best.pt.*entry 'fc.weight' has shape \(12, 20\), expected \(8, 20\)"
    ):
        em.create_balancer("umt", model, teachers={"m0": str(tmp_path / "wide"), "m1": str(tmp_path / "m1")})


def test_bad_options_name_what_to_do() -> None:
    model = make_toy_model(2)
    with pytest.raises(
        ValueError, match=r"needs option 'teachers'.*found 'none'.*equimodal compare.*unimodal"
    ):
        em.create_balancer("umt", model)
    with pytest.raises(ValueError, match=r"needs option 'teachers'.*found \['m0'\]"):
        em.create_balancer("umt", model, teachers={"m0": model.encoders["m0"]})
    with pytest.raises(ValueError, match="option 'scaling' must be a finite number >= 0, found -1"):
        em.create_balancer("umt", model, teachers=umt_teachers(model), scaling=-1)
    with pytest.raises(
        ValueError, match="option 'teacher_mode' must be one of 'eval', 'train', found 'frozen'"
    ):
        em.create_balancer("umt", model, teachers=umt_teachers(model), teacher_mode="frozen")
    with pytest.raises(TypeError, match=r"teachers\['m0'\].*found int"):
        em.create_balancer("umt", model, teachers={"m0": 3, "m1": model.encoders["m1"]})
    bal = em.create_balancer("umt", model, teachers=umt_teachers(model))
    batch, y = make_toy_batch(2)
    with pytest.raises(em.DriverError, match="batch=batch"):
        bal.loss(model(batch), y)
