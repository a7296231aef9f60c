"""MSLR: with its defaults it is not joint training (a unimodal warm start, then per-modality rates)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model

import equimodal as em
from equimodal.balancers import EpochData
from equimodal.testing import drive_step, snapshot, start_epoch, toy_epoch_data


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("num", [2, 3])
def test_defaults_are_not_joint_training_in_the_first_epoch(num: int) -> None:
    model = make_toy_model(num)
    twin = copy.deepcopy(model)
    mslr, joint = em.create_balancer("mslr", model), em.create_balancer("none", twin)
    start_epoch(mslr, 0)
    start_epoch(joint, 0)
    batch, y = make_toy_batch(num, 16, seed=1)
    grads = drive_step(mslr, model, batch, y, sgd(model))
    ref = drive_step(joint, twin, batch, y, sgd(twin))
    assert any(not torch.allclose(grads[n], ref[n]) for n in ref if n.startswith("encoders."))


def test_warm_start_is_unimodal_training_then_fusion() -> None:
    model = make_toy_model(2)
    balancer = em.create_balancer("mslr", model, mode="keep", warmup_epochs=2)
    batch, y = make_toy_batch(2, 16)
    out = model(batch)
    for epoch, warm in ((0, True), (1, True), (2, False), (7, False)):
        balancer.set_epoch(epoch)
        assert balancer.warming_up == warm
        expected = (
            sum(F.cross_entropy(o, y) for o in out.unimodal_logits.values())
            if warm
            else F.cross_entropy(out.logits, y)
        )
        torch.testing.assert_close(balancer.loss(out, y), expected)
    late = em.create_balancer("mslr", model, mode="keep", warmup_epochs=2, start_epoch=3)
    late.set_epoch(4)
    assert late.warming_up  # the warm start opens the method's window


def test_the_warm_start_needs_set_epoch_and_keep_without_it_runs_bare() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 16)
    keep = em.create_balancer("mslr", model, mode="keep")
    assert keep.requirements.set_epoch and not keep.requirements.epoch_data
    with pytest.raises(em.DriverError, match=r"set_epoch\(epoch\)"):
        keep.loss(model(batch), y)
    bare = em.create_balancer("mslr", model, mode="keep", warmup_epochs=0)
    assert not bare.requirements.set_epoch
    bare.loss(model(batch), y)


def test_auxiliary_head_fusion_warm_start_reaches_the_encoders() -> None:
    model = make_toy_model(2, fusion="film")
    twin = copy.deepcopy(model)
    balancer = em.create_balancer("mslr", model, mode="keep")
    balancer.set_epoch(0)
    batch, y = make_toy_batch(2, 16)
    balancer.loss(model(batch), y).backward()
    out = twin(batch)
    sum(F.cross_entropy(twin.fusion.aux[m](out.features[m]), y) for m in ("m0", "m1")).backward()
    for n, p in model.named_parameters():
        q = dict(twin.named_parameters())[n]
        if n.startswith(("encoders.", "fusion.aux.")):
            torch.testing.assert_close(p.grad, q.grad)
            assert bool(p.grad.abs().sum() > 0)
        else:
            assert p.grad is None and q.grad is None  # the FiLM body waits for the fused phase


def test_unused_parameters_follow_the_warm_start() -> None:
    assert not em.create_balancer("mslr", make_toy_model(2)).requirements.unused_parameters
    for fusion in ("weighted", "film"):
        model = make_toy_model(2, fusion=fusion)
        assert em.create_balancer("mslr", model).requirements.unused_parameters
        assert not em.create_balancer("mslr", model, warmup_epochs=0).requirements.unused_parameters


def test_dynamic_scales_act_from_the_first_fused_epoch() -> None:
    model = make_toy_model(2)
    data = toy_epoch_data(2)
    balancer = em.create_balancer("mslr", model, warmup_epochs=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for epoch in range(3):
        stored = copy.deepcopy(balancer.memory)
        start_epoch(balancer, epoch, data)
        acc = balancer._heldout_acc
        if epoch < 2:  # warm start: accuracies are stored (from epoch 1 on), scales stay initial
            assert balancer.scales == {"m0": 1.0, "m1": 1.0}
        else:  # first fused epoch: one stored accuracy (epoch 1) is enough
            assert [len(v) for v in stored.values()] == [1, 1]
            assert balancer.scales == pytest.approx({m: acc[m] / stored[m][0] for m in acc})
            assert all(abs(s - 1.0) > 0.1 for s in balancer.scales.values())  # the accuracies moved
        for step in range(5):
            drive_step(balancer, model, *make_toy_batch(2, 32, seed=10 * epoch + step), opt)
    assert len(balancer.memory["m0"]) == 2


def test_two_epochs_of_defaults_differ_from_joint_training() -> None:
    model = make_toy_model(2)
    twin = copy.deepcopy(model)
    data = EpochData(
        train=lambda: iter([make_toy_batch(2, 16, seed=5)]),
        heldout=lambda: iter([make_toy_batch(2, 12, seed=6)]),
        device=torch.device("cpu"),
    )
    runs = []
    for name, m in (("mslr", model), ("none", twin)):
        balancer, opt = em.create_balancer(name, m), sgd(m)
        for epoch in range(2):
            start_epoch(balancer, epoch, data)
            for step in range(3):
                drive_step(balancer, m, *make_toy_batch(2, 16, seed=10 * epoch + step), opt)
        runs.append(snapshot(m, balancer))
    assert any(not torch.allclose(runs[0][n], runs[1][n]) for n in runs[1])
