"""UME: each member trains as a separate unimodal model would; the prediction averages the members."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from torch import nn

import equimodal as em


def _separate_models(model: nn.Module, heads: nn.ModuleDict) -> dict[str, nn.Sequential]:
    """The M unimodal models UME ensembles: encoder m followed by its own linear head, as separate objects."""
    return {
        m: nn.Sequential(copy.deepcopy(model.encoders[m]), copy.deepcopy(heads[m])) for m in model.encoders
    }


@pytest.mark.parametrize("num", [2, 3])
def test_each_member_gets_exactly_its_own_unimodal_gradient(num: int) -> None:
    model = make_toy_model(num)
    balancer = em.create_balancer("ume", model, seed=2)
    alone = _separate_models(model, balancer.heads.linears)
    batch, y = make_toy_batch(num, 16, seed=3)
    balancer.loss(model(batch), y, batch=batch).backward()
    for m, unimodal in alone.items():  # each trained alone on its own CE
        F.cross_entropy(unimodal(batch[m]), y).backward()
        for p, q in zip([*model.encoders[m].parameters(), *balancer.heads.linears[m].parameters()],
                        unimodal.parameters(), strict=True):  # fmt: skip
            torch.testing.assert_close(p.grad, q.grad)
    assert all(p.grad is None for p in model.fusion.parameters())  # no fused loss


def test_prediction_is_the_members_average() -> None:
    model = make_toy_model(3)
    batch, _ = make_toy_batch(3, 16)
    out = model(batch)
    for combine in ("probs", "logits"):
        bal = em.create_balancer("ume", model, combine=combine)
        members = {m: bal.heads.linears[m](out.features[m]) for m in model.encoders}
        assert bal.predict_unimodal(out).keys() == members.keys()
        if combine == "probs":
            mean_probs = sum(torch.softmax(v, 1) for v in members.values()) / 3
            torch.testing.assert_close(torch.softmax(bal.predict(out), 1), mean_probs)
            torch.testing.assert_close(bal.predict(out).exp().sum(1), torch.ones(16))  # log-probabilities
        else:
            torch.testing.assert_close(bal.predict(out), sum(members.values()) / 3)


def test_a_modality_never_reaches_another_and_the_members_learn() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("ume", model)
    batch, y = make_toy_batch(2, 32, seed=4)
    bal.loss(model(batch), y).backward()
    g0 = [p.grad.clone() for p in model.encoders["m0"].parameters()]
    model.zero_grad()
    other = dict(batch, m1=torch.randn_like(batch["m1"]))  # another m1 input changes nothing for m0
    bal.loss(model(other), y).backward()
    for p, g in zip(model.encoders["m0"].parameters(), g0, strict=True):
        torch.testing.assert_close(p.grad, g)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    first = None
    for _ in range(20):
        opt.zero_grad()
        bal.loss(model(batch), y).backward()
        bal.before_step()
        opt.step()
        first = first or bal.stats()
    last = bal.stats()
    for m in ("m0", "m1"):
        assert last[f"uni_loss/{m}"] < first[f"uni_loss/{m}"]
    assert last["ensemble_loss"] < first["ensemble_loss"]


def test_outside_the_window_it_is_joint_training_and_bad_options_are_named() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("ume", model, start_epoch=1)
    bal.start_epoch(0)
    batch, y = make_toy_batch(2)
    out = model(batch)
    torch.testing.assert_close(bal.loss(out, y), F.cross_entropy(out.logits, y))
    torch.testing.assert_close(bal.predict(out), out.logits)
    with pytest.raises(ValueError, match=r"option 'combine' must be one of 'probs', 'logits', found 'vote'"):
        em.create_balancer("ume", model, combine="vote")
