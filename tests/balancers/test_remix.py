"""Data Remixing (``remix``): the official code's assignment and losses re-enacted, the plan, the stages."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import equimodal as em
from equimodal import testing
from equimodal.balancers import EpochData
from equimodal.balancers.plan import INDEX_KEY, PLAN_WEIGHT_KEY, indexed_loader
from equimodal.balancers.remix import assign_modalities, kl_to_uniform
from equimodal.data.base import TensorSplit
from equimodal.testing import toy_batch, toy_model


def _split(num=2, n=24, seed=0):
    batch, y = toy_batch(num, n, seed=seed)
    return TensorSplit(batch, y)


def _data(ds, batch_size=8):
    return EpochData(
        train=[], heldout=None, device="cpu", indexed=indexed_loader(ds, batch_size=batch_size), size=len(ds)
    )


def _planned(ds, idx):
    """Samples ``idx`` of ``ds`` as a planned batch: inputs with their indices and weight 1, and labels."""
    batch = {m: x[idx] for m, x in ds.inputs.items()}
    return {**batch, INDEX_KEY: idx, PLAN_WEIGHT_KEY: torch.ones(len(idx))}, ds.labels[idx]


def _balancer(num=2, n=24, **options):
    model = toy_model(num)
    balancer = em.create_balancer("remix", model, **options)
    ds = _split(num, n)
    return model, balancer, ds


def _warmed(num=2, n=24, steps=10, **options):
    """A balancer after ``steps`` warm-up steps of epoch 0 (``warmup_epochs=1``): its modalities disagree
    on which samples they know (an untrained toy model gives every sample to one modality)."""
    model, balancer, ds = _balancer(num, n, warmup_epochs=1, **options)
    balancer.start_epoch(0, _data(ds))
    optimizer = testing.optimizer_for(model, balancer)
    for _ in range(steps):
        testing.drive_step(balancer, model, ds.inputs, ds.labels, optimizer)
    return model, balancer, ds


# ------------------------------------------------------------------ the official code, re-enacted
def _official_kl(pred: np.ndarray, num_classes: int) -> float:
    """train.py ``kl_divergence``: numpy, clipped, log2, against the uniform distribution."""
    uniform = np.full(num_classes, 1.0 / num_classes)
    pred = np.clip(pred, 1e-9, 1.0)
    return float(np.sum(pred * np.log2(pred / uniform)))


def _official_assignment(model, heads, inputs) -> list[str]:
    """train.py ``remix``: eval mode, no grad, per sample audio (first) if KL_a < KL_v else video."""
    with torch.no_grad():
        pa = heads["m0"](model.encoders["m0"](inputs["m0"])).softmax(1)
        pv = heads["m1"](model.encoders["m1"](inputs["m1"])).softmax(1)
    out = []
    for i in range(pa.shape[0]):
        kl_a = _official_kl(pa[i].numpy(), pa.shape[1])
        kl_v = _official_kl(pv[i].numpy(), pv.shape[1])
        out.append("m0" if kl_a < kl_v else "m1")
    return out


def _official_remix_loss(model, heads, inputs, y, mode: str, gamma: float = 1.0):
    """special_train_epoch with AVClassifier.forward(mode): the other pooled feature set to 0 in place,
    concat head, loss CE(out) + gamma CE(own head)."""
    a = model.encoders["m0"](inputs["m0"]).clone()
    v = model.encoders["m1"](inputs["m1"]).clone()
    if mode == "video":
        a[:, :] = 0.0
    else:
        v[:, :] = 0.0
    fc = model.fusion.fc
    out = F.linear(torch.cat((a, v), 1), fc.weight, fc.bias)
    own = heads["m1"](v) if mode == "video" else heads["m0"](a)
    return F.cross_entropy(out, y) + gamma * F.cross_entropy(own, y)


def _grads(model, heads):
    params = {f"model.{k}": p for k, p in model.named_parameters()}
    params.update({f"head.{k}": p for k, p in heads.named_parameters()})
    return {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}


def test_fidelity_assignment_matches_the_official_remix():
    model, balancer, ds = _warmed()
    heads = copy.deepcopy(balancer.heads.linears)
    expected = _official_assignment(copy.deepcopy(model).eval(), heads, ds.inputs)
    balancer.start_epoch(1, _data(ds))
    got = [balancer.modalities[j] for j in balancer.assignment.value.tolist()]
    assert got == expected
    assert sorted(set(got)) == ["m0", "m1"], "the toy data should split between the modalities"


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_fidelity_remix_step_matches_special_train_epoch(gamma):
    model, balancer, ds = _warmed(remix_weight=gamma)
    balancer.start_epoch(1, _data(ds))
    ref_model, ref_heads = copy.deepcopy(model), copy.deepcopy(balancer.heads.linears)
    assignment = balancer.assignment.value
    groups = {
        "video": torch.nonzero(assignment == 1).flatten(),
        "audio": torch.nonzero(assignment == 0).flatten(),
    }
    inputs, labels = ds.inputs, ds.labels
    # a pure batch per group: our loss and gradients equal the official ones
    for mode, idx in groups.items():
        batch, y = _planned(ds, idx)
        model.zero_grad(), balancer.heads.linears.zero_grad()
        ours = balancer.loss(model(batch), y, batch=batch)
        ours.backward()
        ref_model.zero_grad(), ref_heads.zero_grad()
        ref = _official_remix_loss(
            ref_model, ref_heads, {m: x[idx] for m, x in inputs.items()}, y, mode, gamma
        )
        ref.backward()
        torch.testing.assert_close(ours, ref)
        testing.assert_same(_grads(model, balancer.heads.linears), _grads(ref_model, ref_heads), what=mode)
    # a batch straddling the groups: each sample trains as its group, the mean over the batch
    idx = torch.arange(len(ds))
    batch, y = _planned(ds, idx)
    ours = balancer.loss(model(batch), y, batch=batch)
    ref = sum(
        _official_remix_loss(
            ref_model, ref_heads, {m: x[g] for m, x in inputs.items()}, labels[g], mode, gamma
        )
        * (len(g) / len(idx))
        for mode, g in groups.items()
    )
    torch.testing.assert_close(ours, ref)


def test_fidelity_warmup_is_train_epoch():
    model, balancer, ds = _balancer(warmup_epochs=1)
    balancer.start_epoch(0, _data(ds))
    inputs, y = ds.inputs, ds.labels
    batch, _ = _planned(ds, torch.arange(len(ds)))
    ours = balancer.loss(model(batch), y, batch=batch)
    a, v = model.encoders["m0"](inputs["m0"]), model.encoders["m1"](inputs["m1"])
    fc, heads = model.fusion.fc, balancer.heads.linears
    ref = (
        F.cross_entropy(F.linear(torch.cat((a, v), 1), fc.weight, fc.bias), y)
        + 0.5 * F.cross_entropy(heads["m0"](a), y)
        + 0.5 * F.cross_entropy(heads["m1"](v), y)
    )
    torch.testing.assert_close(ours, ref)
    assert balancer.epoch_plan is None and balancer.stats()["stage"] == 0.0


def test_kl_to_uniform_matches_the_official_function():
    probs = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)).softmax(1)
    probs[0] = torch.tensor([1.0, 0, 0, 0, 0, 0])
    probs[1] = 1 / 6
    got = kl_to_uniform(probs)
    expected = torch.tensor([_official_kl(p.numpy(), 6) for p in probs], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert abs(float(got[1])) < 1e-6 and got[0] == got.max()


def test_assignment_takes_the_smallest_kl_and_gives_ties_to_the_last_modality():
    kl = torch.tensor([[1.0, 2.0, 1.0, 0.5], [1.0, 1.0, 3.0, 0.5], [2.0, 1.5, 2.0, 0.5]])
    assert assign_modalities(kl).tolist() == [1, 1, 0, 2]
    assert assign_modalities(kl[:2, :3]).tolist() == [1, 1, 0]  # two modalities: the code's rule


# ------------------------------------------------------------------ mechanism
def test_grouped_plan_holds_each_sample_once_in_unimodal_runs():
    model, balancer, ds = _warmed(num=3, n=30)
    balancer.start_epoch(1, _data(ds))
    plan, assignment = balancer.epoch_plan, balancer.assignment.value
    assert sorted(plan.indices.tolist()) == list(range(30)) and plan.zeroed is None and not plan.shuffle
    along = assignment[plan.indices]
    assert torch.all(along[1:] <= along[:-1]), "groups must follow in reverse modality order"
    assert balancer.counts.tolist() == torch.bincount(assignment, minlength=3).tolist()
    # the planned loader's batches hold one modality each but where two groups meet
    loader = balancer.planned_loader(ds, batch_size=4)
    mixed = sum(len(set(assignment[b[0][INDEX_KEY]].tolist())) > 1 for b in loader)
    assert mixed <= int((balancer.counts > 0).sum()) - 1
    # the order is the seed's and the epoch's: a new epoch reshuffles the groups
    first = plan.indices.clone()
    balancer.start_epoch(2, _data(ds))
    assert not torch.equal(first, balancer.epoch_plan.indices)


def test_feature_zeroing_stops_the_other_encoders_and_input_zeroing_plans_it():
    model, balancer, ds = _balancer(warmup_epochs=0)
    balancer.start_epoch(0, _data(ds))
    idx = torch.nonzero(balancer.assignment.value == 1).flatten()
    batch, y = _planned(ds, idx)
    balancer.loss(model(batch), y, batch=batch).backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.encoders["m0"].parameters())
    assert all(torch.count_nonzero(p.grad) == 0 for p in balancer.heads.linears["m0"].parameters())
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.encoders["m1"].parameters())
    model, balancer, ds = _balancer(warmup_epochs=0, zero="input", batches="mixed")
    balancer.start_epoch(0, _data(ds))
    plan = balancer.epoch_plan
    assert plan.shuffle and torch.equal(plan.indices, torch.arange(len(ds)))
    own = balancer.assignment.value[plan.indices]
    assert torch.equal(plan.zeroed, own[:, None] != torch.arange(2)[None, :])
    assert plan.summary(len(ds))["zeroed/m0"] == float((own != 0).sum())


def test_stages_warmup_then_remix_counted_from_the_window():
    model, balancer, ds = _balancer(warmup_epochs=2)
    passes = []
    original = balancer.sample_scores
    balancer.sample_scores = lambda data: passes.append(balancer.epoch) or original(data)
    for epoch in range(4):
        balancer.start_epoch(epoch, _data(ds))
        assert (balancer.epoch_plan is not None) == (epoch >= 2)
    assert passes == [2, 3]
    assert balancer.stage.stage.name == "remix" and balancer.stage.epoch_in_stage == 1
    model, balancer, ds = _balancer(warmup_epochs=1, start_epoch=3)
    for epoch, stage in ((2, None), (3, "warmup"), (4, "remix")):
        balancer.start_epoch(epoch, _data(ds))
        if stage is not None:
            assert balancer.stage.stage.name == stage
        assert (balancer.epoch_plan is not None) == (stage == "remix")


def test_records_and_state_carry_the_counts():
    model, balancer, ds = _balancer(warmup_epochs=0)
    balancer.start_epoch(0, _data(ds))
    batch, y = _planned(ds, torch.arange(8))
    balancer.loss(model(batch), y, batch=batch)
    stats = balancer.stats()
    assert stats["stage"] == 1.0
    assert [stats["assigned/m0"], stats["assigned/m1"]] == balancer.counts.float().tolist()
    assert sum(balancer.counts.tolist()) == len(ds)
    fresh = em.create_balancer("remix", toy_model(2), warmup_epochs=0)
    fresh.load_state_dict(balancer.state_dict())
    assert torch.equal(fresh.assignment.value, balancer.assignment.value)
    assert torch.equal(fresh.epoch_plan.indices, balancer.epoch_plan.indices)


def test_contract_in_the_remix_stage():
    """The contract suite with the remix path from epoch 0 (its overflow check plans at epoch 0 too)."""
    results = testing.check_balancer("remix", options={"warmup_epochs": 0}, modalities=(3,))
    assert results["host_reads/M3"] == 0 and results["aux_fusion"]
    results = testing.check_balancer(
        "remix", options={"warmup_epochs": 0, "zero": "input", "heads": "shared"}, modalities=(2,)
    )
    assert results["two_call_loop/M2"] == "refused: bare, readme" and not results["aux_fusion"]


@pytest.mark.ddp
def test_ranks_build_the_same_plan():
    testing.check_ranks_agree("remix", 2, {"warmup_epochs": 1})


# ------------------------------------------------------------------ edge cases and bad input
def test_a_sample_left_out_of_the_pass_is_refused():
    model, balancer, ds = _balancer(warmup_epochs=0)
    data = _data(ds)
    part = EpochData(
        train=[], heldout=None, device="cpu", indexed=list(data.batches("indexed"))[:1], size=len(ds)
    )
    with pytest.raises(ValueError, match="16 of the 24 samples"):
        balancer.start_epoch(0, part)


def test_a_group_may_be_empty():
    model, balancer, ds = _balancer(warmup_epochs=0)
    balancer.sample_scores = lambda data: torch.stack([torch.zeros(len(ds)), torch.ones(len(ds))]).double()
    balancer.start_epoch(0, _data(ds))
    assert balancer.counts.tolist() == [len(ds), 0]
    batch, y = _planned(ds, torch.arange(8))
    assert torch.isfinite(balancer.loss(model(batch), y, batch=batch))


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("warmup_epochs", -1, ">= 0"),
        ("warmup_weight", -0.5, ">= 0"),
        ("remix_weight", float("nan"), "finite"),
        ("zero", "encoder", "one of 'feature', 'input'"),
        ("batches", "pure", "one of 'grouped', 'mixed'"),
        ("heads", "own", "one of 'separate', 'shared'"),
    ],
)
def test_bad_options_are_refused(option, value, expected):
    with pytest.raises(ValueError, match=rf"remix.*{option}.*(?s:.*){expected}.*found") as err:
        em.create_balancer("remix", toy_model(2), **{option: value})
    assert repr(value)[:3] in str(err.value) or str(value)[:3] in str(err.value)


def test_a_fractional_warmup_is_refused():
    with pytest.raises(TypeError, match="'warmup_epochs'.*integer.*1.5"):
        em.create_balancer("remix", toy_model(2), warmup_epochs=1.5)


def test_feature_zeroing_needs_a_fusion_module():
    model = toy_model(2)
    model.fusion = torch.nn.Identity()
    with pytest.raises(ValueError, match="option 'zero' must be 'input'.*found 'feature'.*Identity"):
        em.create_balancer("remix", model)


def test_shared_heads_refuse_auxiliary_fusions():
    with pytest.raises(ValueError, match="FiLM"):
        em.create_balancer("remix", toy_model(2, fusion="film"), heads="shared")
