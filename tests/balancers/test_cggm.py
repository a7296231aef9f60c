"""cggm: classifier-guided gradient modulation, checked against a literal re-enactment of the official
training step (zrguo/CGGM ``src/foodtrain.py`` / ``src/msatrain.py`` ``train``)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model

import equimodal as em
from equimodal.balancers.cggm import cggm_coefficients


def _official_run(model, classifiers, batches, *, rou, lamda, lr, stale, unit=False):
    """The official ``train`` loop, literally, on our toy model: the fusion's ``out_layer.weight`` is the
    concat head's column block of each modality (the weight ``cal_cos`` compares with each classifier's
    ``out_layer.weight``). ``stale=True`` is the released order (``l_gm`` of step t added to the loss of step
    t+1); ``False`` adds it in the same step. ``unit``: coefficients 1 when the changes cancel. Returns the gradients of every step after the modulation."""
    mods = list(model.encoders)
    num_mod = len(mods)
    blocks = model.fusion.modality_blocks()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    cls_optimizer = torch.optim.SGD(classifiers.parameters(), lr=lr)
    acc1 = [0] * num_mod
    l_gm = None
    seen = []
    for batch, eval_attr in batches:
        model.zero_grad()
        out = model(batch)
        preds, hs = out.logits, [out.features[m].clone().detach() for m in mods]
        raw_loss = F.cross_entropy(preds, eval_attr)
        if stale and l_gm is not None:
            raw_loss += lamda * l_gm
        cls_res = [classifiers[m](hs[i]) for i, m in enumerate(mods)]
        acc2 = [float(np.mean(np.argmax(r.detach().numpy(), axis=1) == eval_attr.numpy())) for r in cls_res]
        diff = [acc2[i] - acc1[i] for i in range(num_mod)]
        diff_sum = sum(diff) + 1e-8
        coeff = [(diff_sum - d) / diff_sum for d in diff]
        if unit and abs(sum(diff)) <= 1e-6:
            coeff = [1.0] * num_mod
        acc1 = acc2
        llist = [
            F.cosine_similarity(
                classifiers[m].weight.clone().reshape(-1),
                blocks[m][0][:, blocks[m][1]].clone().reshape(-1),
                dim=0,
            )
            for m in mods
        ]
        new_l_gm = (np.sum(np.abs(coeff)) - sum(coeff[i] * llist[i] for i in range(num_mod))) / num_mod
        if not stale:
            raw_loss += lamda * new_l_gm
        raw_loss.backward()
        cls_optimizer.zero_grad()  # drops what l_gm gave the classifiers
        cls_loss = sum(F.cross_entropy(cls_res[i], eval_attr) for i in range(num_mod))
        cls_loss.backward()
        l_gm = new_l_gm
        for i, m in enumerate(mods):
            for params in model.encoders[m].parameters():
                params.grad *= coeff[i] * rou
        seen.append({n: p.grad.clone() for n, p in model.named_parameters()})
        cls_optimizer.step()
        optimizer.step()
    return seen


def _our_run(bal, batches, *, lr):
    model = bal.model
    optimizer = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=lr)
    seen, stats = [], []
    for batch, y in batches:
        bal.loss(model(batch), y).backward()
        bal.before_step()
        seen.append({n: p.grad.clone() for n, p in model.named_parameters()})
        stats.append(bal.stats())
        optimizer.step()
        optimizer.zero_grad()
    return seen, stats


@pytest.mark.parametrize(
    ("num_mod", "stale", "zero_sum"),
    [
        (2, True, "code"),
        (2, True, "unit"),
        (3, True, "code"),
        (2, False, "unit"),
        (3, False, "unit"),
        (3, False, "code"),
    ],
)
def test_fidelity_to_the_official_training_step(num_mod: int, stale: bool, zero_sum: str) -> None:
    """Gradients of every step and the final weights equal the official loop's: with the released one-step-
    stale direction term and with the one it meant; with the released +1e-8 (``"code"``, whose 1e7
    coefficients blow the weights up, hence the looser relative tolerance) and with our unit rule."""
    batches = [make_toy_batch(num_mod, batch_size=16, seed=s) for s in range(4)]
    ours = make_toy_model(num_mod)
    ref = copy.deepcopy(ours)
    bal = em.create_balancer("cggm", ours, rho=1.3, lam=0.05, stale=stale, zero_sum=zero_sum)
    classifiers = copy.deepcopy(bal.heads.linears)
    got, stats = _our_run(bal, batches, lr=0.05)
    unit = zero_sum == "unit"
    want = _official_run(ref, classifiers, batches, rou=1.3, lamda=0.05, lr=0.05, stale=stale, unit=unit)
    tol = {} if unit else {"rtol": 1e-4, "atol": 1e-5}
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for name in w:
            torch.testing.assert_close(
                g[name], w[name], **tol, msg=lambda m, s=step, n=name: f"step {s} {n}: {m}"
            )
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol, msg=lambda m, n=name: f"{n}: {m}")
    for p, q in zip(bal.parameters(), classifiers.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol)
    assert all(f"coeff/{m}" in s for s in stats for m in bal.modalities)


def test_coefficients_formula_first_step_and_zero_sum() -> None:
    d = torch.tensor([0.25, 0.125])
    s = 0.375 + 1e-8
    torch.testing.assert_close(cggm_coefficients(d), torch.tensor([(s - 0.25) / s, (s - 0.125) / s]))
    three = cggm_coefficients(torch.tensor([0.1, 0.2, -0.05]))
    torch.testing.assert_close(three.sum(), torch.tensor(2.0))  # they sum to M - 1
    cancel = torch.tensor([0.0625, -0.0625])
    assert torch.equal(cggm_coefficients(cancel, "unit"), torch.ones(2))
    # the released +1e-8: coefficients of order 1e8 * |d|, of both signs
    code = cggm_coefficients(cancel, "code")
    assert code[0] < -1e6 and code[1] > 1e6
    assert torch.equal(cggm_coefficients(torch.zeros(3), "code"), torch.ones(3))
    with pytest.raises(ValueError, match="zero_sum"):
        cggm_coefficients(d, "clip")


def test_the_classifier_that_improves_less_gets_the_larger_gradient_scale() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("cggm", model, lam=0.0)
    batch, _ = make_toy_batch(2, batch_size=16)
    y = torch.zeros(16, dtype=torch.long)
    out = model(batch)
    names = [n for n, _ in model.named_parameters()]
    fused_grads = torch.autograd.grad(
        F.cross_entropy(out.logits, y), list(model.parameters()), retain_graph=True
    )
    plain = dict(zip(names, fused_grads, strict=True))
    with torch.no_grad():  # m0's classifier says class 0 (right on every sample), m1's class 1 (on none)
        for m, cls in (("m0", 0), ("m1", 1)):
            bal.heads.linears[m].weight.zero_()
            bal.heads.linears[m].bias.copy_(F.one_hot(torch.tensor(cls), 3).float() * 10)
    bal.prev_acc = torch.tensor([0.0, 0.5])
    bal.loss(out, y).backward()
    bal.before_step()
    st = bal.stats()
    # d = (1 - 0, 0 - 0.5): S = 0.5, c_m0 = (0.5 - 1) / 0.5 = -1, c_m1 = (0.5 + 0.5) / 0.5 = 2
    assert st["acc/m0"] == 1.0 and st["acc/m1"] == 0.0
    assert st["coeff/m0"] == pytest.approx(1.3 * -1.0, rel=1e-5)
    assert st["coeff/m1"] == pytest.approx(1.3 * 2.0, rel=1e-5)
    for name, p in model.named_parameters():
        m = name.split(".")[1] if name.startswith("encoders.") else None
        expected = plain[name] * st[f"coeff/{m}"] if m else plain[name]
        torch.testing.assert_close(p.grad, expected)
    assert torch.equal(bal.prev_acc, torch.tensor([1.0, 0.0]))


def test_direction_term_turns_the_fusion_blocks_towards_the_classifiers() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2)
    with_dir = em.create_balancer("cggm", model, lam=1.0)
    without = em.create_balancer("cggm", copy.deepcopy(model), lam=0.0)
    for bal in (with_dir, without):
        bal.loss(bal.model(batch), y).backward()
        bal.before_step()
    w, wo = with_dir.model.fusion.fc.weight.grad, without.model.fusion.fc.weight.grad
    assert not torch.allclose(w, wo)
    stats = with_dir.stats()
    assert "direction_loss" in stats and {"cos/m0", "cos/m1"} <= set(stats)
    # a small step against the added gradient raises each cosine where its coefficient is positive
    blocks = with_dir.model.fusion.modality_blocks()
    for m in with_dir.modalities:
        weight, cols = blocks[m]
        head = with_dir.heads.linears[m].weight.detach().reshape(-1)
        before = F.cosine_similarity(head, weight[:, cols].detach().reshape(-1), dim=0)
        moved = (weight[:, cols] - 0.1 * (w - wo)[:, cols]).detach().reshape(-1)
        after = F.cosine_similarity(head, moved, dim=0)
        assert (after > before) == (stats[f"coeff/{m}"] > 0)
    # the heads learn from their own CE only (their features are detached: no encoder gradient from them)
    only_heads = em.create_balancer("cggm", make_toy_model(2), lam=0.0)
    out = only_heads.model(batch)
    (only_heads.loss(out, y) - F.cross_entropy(out.logits, y)).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in only_heads.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in only_heads.parameters())


def test_stale_direction_starts_at_the_second_step() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2)
    stale = em.create_balancer("cggm", model, lam=1.0, stale=True)
    none = em.create_balancer("cggm", copy.deepcopy(model), lam=0.0)
    for bal in (stale, none):
        bal.loss(bal.model(batch), y).backward()
        bal.before_step()
    torch.testing.assert_close(stale.model.fusion.fc.weight.grad, none.model.fusion.fc.weight.grad)
    assert bool(stale.has_prev)
    state = stale.state_dict()
    assert {"prev_coeff", "prev_heads", "prev_blocks", "has_prev", "prev_acc"} <= set(state)


def test_a_step_without_a_loss_changes_nothing() -> None:
    bal = em.create_balancer("cggm", make_toy_model(2))
    batch, y = make_toy_batch(2)
    bal.loss(bal.model(batch), y).backward()
    bal.before_step()
    acc = bal.prev_acc.clone()
    grads = [p.grad.clone() for p in bal.model.parameters()]
    bal.before_step()  # no loss() in this step
    assert torch.equal(bal.prev_acc, acc)
    assert all(torch.equal(p.grad, g) for p, g in zip(bal.model.parameters(), grads, strict=True))


def test_fusion_without_blocks_gets_no_direction_term(caplog: pytest.LogCaptureFixture) -> None:
    model = make_toy_model(2, fusion="film")
    with caplog.at_level(logging.WARNING):
        bal = em.create_balancer("cggm", model)
    assert "direction term" in caplog.text
    batch, y = make_toy_batch(2)
    bal.loss(model(batch), y).backward()
    bal.before_step()
    assert "direction_loss" not in bal.stats() and "coeff/m0" in bal.stats()
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        em.create_balancer("cggm", make_toy_model(2, fusion="film"), lam=0.0)
    assert "direction term" not in caplog.text


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rho": -1.0}, "'rho' must be a finite number >= 0, found -1.0"),
        ({"lam": float("nan")}, "'lam' must be a finite number >= 0"),
        ({"zero_sum": "skip"}, "'zero_sum' must be one of"),
    ],
)
def test_bad_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        em.create_balancer("cggm", make_toy_model(2), **options)
