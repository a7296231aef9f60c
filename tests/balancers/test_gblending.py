"""G-Blending's separate unimodal heads (MultiBench's layout): objective, copies, state and fusion coverage."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model

import equimodal as em
from equimodal.testing import drive_step, optimizer_for, start_epoch, toy_epoch_data


def test_separate_heads_by_default_in_parameters_and_state() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("gblending", model, super_epoch_len=1)
    assert bal.heads_mode == "separate" and bal.requirements.parameters
    assert len(list(bal.parameters())) == 4
    start_epoch(bal, 0)
    drive_step(bal, model, *make_toy_batch(2), optimizer_for(model, bal))
    buf = io.BytesIO()
    torch.save(bal.state_dict(), buf)
    buf.seek(0)
    fresh = em.create_balancer("gblending", make_toy_model(2), super_epoch_len=1, seed=4)
    params = list(fresh.parameters())
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert all(a is b for a, b in zip(params, fresh.parameters(), strict=True))  # loaded in place
    assert all(torch.equal(a, b) for a, b in zip(bal.parameters(), fresh.parameters(), strict=True))
    assert torch.equal(fresh.weights, bal.weights)


def test_objective_and_predictions_use_the_separate_heads() -> None:
    model = make_toy_model(3)
    bal = em.create_balancer("gblending", model, super_epoch_len=1)
    start_epoch(bal, 0)
    batch, y = make_toy_batch(3)
    out = model(batch)
    heads = [bal.heads.linears[m](out.features[m]) for m in bal.modalities]
    w = bal.weights
    expected = w[0] * F.cross_entropy(out.logits, y) + sum(
        w[i + 1] * F.cross_entropy(h, y) for i, h in enumerate(heads)
    )
    assert torch.allclose(bal.loss(out, y), expected)
    uni = bal.predict_unimodal(out)
    assert all(torch.allclose(uni[m], h) for m, h in zip(bal.modalities, heads, strict=True))


def test_weights_are_measured_with_the_separate_heads() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("gblending", model, super_epoch_len=1)
    data = toy_epoch_data(2)
    held = bal._losses(model, bal.heads, data, "heldout")
    batch, y = next(iter(data.heldout()))
    out = model.eval()(batch)
    model.train()
    expected = [F.cross_entropy(out.logits, y)] + [
        F.cross_entropy(bal.heads.linears[m](out.features[m]), y) for m in bal.modalities
    ]
    assert torch.allclose(held, torch.stack(expected).detach())
    heads_before = copy.deepcopy(bal.heads.state_dict())
    start_epoch(bal, 0)  # trains copies of the model and the heads; the originals stay as they were
    assert all(torch.equal(v, bal.heads.state_dict()[k]) for k, v in heads_before.items())


@pytest.mark.parametrize("fusion", ["film", "gated", "attention"])
def test_auxiliary_head_fusions_train(fusion: str) -> None:
    model = make_toy_model(2, fusion=fusion)
    before = copy.deepcopy(model.state_dict())
    bal = em.create_balancer("gblending", model, super_epoch_len=1)
    opt = optimizer_for(model, bal)
    start_epoch(bal, 0)
    assert bal.weights is not None and torch.isfinite(bal.weights).all()
    for seed in range(2):
        grads = drive_step(bal, model, *make_toy_batch(2, seed=seed), opt)
        assert all(bool(torch.isfinite(g).all()) for g in grads.values())
        # each encoder gets a unimodal gradient through its separate head (not only the fused one)
        assert all(grads[f"encoders.{m}.fc.weight"].abs().sum() > 0 for m in bal.modalities)
    assert not torch.equal(before["encoders.m0.fc.weight"], model.state_dict()["encoders.m0.fc.weight"])


def test_shared_heads_keep_the_old_behaviour_and_refusal() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("gblending", model, super_epoch_len=1, heads="shared")
    assert bal.heads is None and list(bal.parameters()) == [] and not bal.requirements.parameters
    start_epoch(bal, 0)
    batch, y = make_toy_batch(2)
    out = model(batch)
    logits = [out.logits, *out.unimodal_logits.values()]
    expected = sum(bal.weights[i] * F.cross_entropy(h, y) for i, h in enumerate(logits))
    assert torch.allclose(bal.loss(out, y), expected)
    assert bal.predict_unimodal(out) is out.unimodal_logits
    for fusion in ("film", "gated", "attention"):
        with pytest.raises(ValueError, match=r"fusion \(.*\) computes them with auxiliary heads"):
            em.create_balancer("gblending", make_toy_model(2, fusion=fusion), heads="shared")


def test_an_optimizer_without_the_heads_is_refused() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("gblending", model, super_epoch_len=1)
    start_epoch(bal, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batch, y = make_toy_batch(2)
    with pytest.raises(em.DriverError, match=r"\*balancer.parameters\(\)"):
        for _ in range(30):
            opt.zero_grad()
            bal.loss(model(batch), y).backward()
            bal.before_step()
            opt.step()
