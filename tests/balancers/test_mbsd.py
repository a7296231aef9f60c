"""MBSD: BalanceBenchmark's MBSD_trainer re-enacted (its per-sample loops), the weight acting, and its options."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from torch import Tensor, nn

import equimodal as em
from equimodal.balancers.mbsd import MBSD, pair_terms
from equimodal.types import MultimodalOutput


def balancemm_two(out: MultimodalOutput, label: Tensor) -> Tensor:
    """MBSD_trainer.py training_step, lines 119-159, literally (two modalities)."""
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    key = list(out.unimodal_logits)
    uni = out.unimodal_logits
    n = len(out.logits)
    loss_out = criterion(out.logits, label)
    loss_mod = {k: criterion(uni[k], label) for k in key}
    prediction = {k: softmax(uni[k]) for k in key}
    loss_rs = 1 / uni[key[0]].shape[1] * torch.sum((uni[key[0]] - uni[key[1]]) ** 2, dim=1)
    w = torch.tensor([0.0 for _ in range(n)])
    y_pred = {k: prediction[k].argmax(dim=-1) for k in key}
    ps = torch.tensor([0.0 for _ in range(n)])
    pw = torch.tensor([0.0 for _ in range(n)])
    for i in range(n):
        pa, pv = prediction[key[0]][i][label[i]], prediction[key[1]][i][label[i]]
        if y_pred[key[0]][i] == label[i] or y_pred[key[1]][i] == label[i]:
            w[i] = max(pa, pv) - min(pa, pv)
        ps[i] = max(pa, pv)
        pw[i] = min(pa, pv)
    loss_kl = F.kl_div(ps, pw, reduction="none")
    loss_kl = torch.mm(w.reshape(1, -1), loss_kl.reshape(-1, 1)) / n
    loss_rs = torch.mm(w.reshape(1, -1), loss_rs.reshape(-1, 1)) / n
    return loss_out + loss_mod[key[0]] + loss_mod[key[1]] + loss_rs.squeeze() + loss_kl.squeeze()


def balancemm_three(out: MultimodalOutput, label: Tensor) -> Tensor:
    """MBSD_trainer.py training_step, lines 160-224, literally (three modalities: probabilities in RS)."""
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    key = list(out.unimodal_logits)
    uni = out.unimodal_logits
    n = len(out.logits)
    prediction = {k: softmax(uni[k]) for k in key}
    y_pred = {k: prediction[k].argmax(dim=-1) for k in key}
    kls, rss = [], []
    for a, b in ((0, 1), (0, 2), (1, 2)):
        w, ps, pw = (torch.tensor([0.0 for _ in range(n)]) for _ in range(3))
        for i in range(n):
            p_a, p_b = prediction[key[a]][i][label[i]], prediction[key[b]][i][label[i]]
            if y_pred[key[a]][i] == label[i] or y_pred[key[b]][i] == label[i]:
                w[i] = max(p_a, p_b) - min(p_a, p_b)
            ps[i] = max(p_a, p_b)
            pw[i] = min(p_a, p_b)
        rs = 1 / uni[key[0]].shape[1] * torch.sum((prediction[key[a]] - prediction[key[b]]) ** 2, dim=1)
        kl = F.kl_div(ps, pw, reduction="none")
        kls.append(torch.mm(w.reshape(1, -1), kl.reshape(-1, 1)) / n)
        rss.append(torch.mm(w.reshape(1, -1), rs.reshape(-1, 1)) / n)
    loss_kl, loss_rs = sum(kls) / 3, sum(rss) / 3
    ces = criterion(out.logits, label) + sum(criterion(uni[k], label) for k in key)
    return ces + loss_kl.squeeze() + loss_rs.squeeze()


@pytest.mark.parametrize(("num_modalities", "reference"), [(2, balancemm_two), (3, balancemm_three)])
def test_loss_and_gradients_equal_balancebenchmark(num_modalities: int, reference) -> None:
    model = make_toy_model(num_modalities)
    with torch.no_grad():  # sharper unimodal predictions, so that many samples get a weight
        model.fusion.fc.weight.mul_(4.0)
    batch, y = make_toy_batch(num_modalities, 24)
    balancer = em.create_balancer("mbsd", model, kl_input="prob", detach_weight=False)  # the literal code
    out = model(batch)
    ours = balancer.loss(out, y)
    theirs = reference(out, y)
    torch.testing.assert_close(ours, theirs)
    assert 0 < balancer.stats()["weighted"] < 1  # both kinds of sample are in the batch
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours, params, retain_graph=True, allow_unused=True)
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_defaults_are_balancebenchmarks_but_for_its_two_bugs() -> None:
    params = inspect.signature(MBSD.__init__).parameters
    assert params["kl_input"].default == "log" and params["detach_weight"].default is True
    assert params["heads"].default == "shared"
    assert em.create_balancer("mbsd", make_toy_model(2)).distance == "logits"
    assert em.create_balancer("mbsd", make_toy_model(4)).distance == "probs"


def test_the_weight_is_the_confidence_gap_and_zero_where_both_are_wrong() -> None:
    y = torch.tensor([0, 0, 1])
    o_a = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])  # right, wrong, wrong
    o_b = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0]])  # wrong, right, wrong
    w, kl, dist = pair_terms(o_a, o_b, y)
    p_a, p_b = F.softmax(o_a, 1)[torch.arange(3), y], F.softmax(o_b, 1)[torch.arange(3), y]
    torch.testing.assert_close(
        w, torch.stack([(p_a - p_b).abs()[0], (p_a - p_b).abs()[1], torch.tensor(0.0)])
    )
    strong, weak = torch.maximum(p_a, p_b), torch.minimum(p_a, p_b)
    torch.testing.assert_close(kl, weak * (weak.log() - strong))
    torch.testing.assert_close(dist, ((o_a - o_b) ** 2).mean(1))
    _, kl_log, _ = pair_terms(o_a, o_b, y, kl_input="log")
    torch.testing.assert_close(kl_log, weak * (weak.log() - strong.log()))


def test_detaching_the_weight_changes_only_the_gradient() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 16)
    out = model(batch)
    kept = em.create_balancer("mbsd", model, detach_weight=False)
    cut = em.create_balancer("mbsd", model, detach_weight=True)
    a, b = kept.loss(out, y), cut.loss(out, y)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, model.fusion.fc.weight, retain_graph=True)[0]
    gb = torch.autograd.grad(b, model.fusion.fc.weight)[0]
    assert not torch.allclose(ga, gb)


def _distillation_step_gaps(**options: object) -> tuple[Tensor, Tensor]:
    """The mean squared logit gap between the two modalities before and after a step along the gradient of
    MBSD's distillation terms alone (its loss minus the CEs), on a toy batch."""
    model = make_toy_model(2)
    with torch.no_grad():
        model.fusion.fc.weight.mul_(4.0)
    batch, y = make_toy_batch(2, 24)
    balancer = em.create_balancer("mbsd", model, **options)
    out = model(batch)
    w = model.fusion.fc.weight
    ce = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(o, y) for o in out.unimodal_logits.values())
    g = torch.autograd.grad(balancer.loss(out, y) - ce, w)[0]

    def gap(weight: Tensor) -> Tensor:
        return ((out.features["m0"] @ weight[:, :8].t() - out.features["m1"] @ weight[:, 8:].t()) ** 2).mean()

    with torch.no_grad():
        return gap(w), gap(w - 2.0 * g)


def test_the_distillation_pulls_the_modalities_together_once_the_weight_is_detached() -> None:
    for options in ({}, {"kl_input": "prob"}, {"detach_weight": False}):  # the default, and each fix alone
        before, after = _distillation_step_gaps(**options)
        assert after < before, options


def test_the_literal_balancebenchmark_terms_can_push_the_modalities_apart() -> None:
    """Measured, and documented in the class: BalanceBenchmark's KL term is negative (``p_weak log p_weak -
    p_weak p_strong``) and its weight ``w = |p_a - p_b|`` carries gradient, so minimising ``w * KL`` rewards a
    larger confidence gap. On this batch a step on the literal terms widens the logit gap."""
    before, after = _distillation_step_gaps(kl_input="prob", detach_weight=False)
    assert after > before


def test_outside_its_window_it_is_plain_cross_entropy() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 16)
    balancer = em.create_balancer("mbsd", model, start_epoch=2)
    balancer.start_epoch(1)
    out = model(batch)
    torch.testing.assert_close(balancer.loss(out, y), F.cross_entropy(out.logits, y))


def test_auxiliary_head_fusions_need_separate_heads() -> None:
    model = make_toy_model(2, fusion="film")
    with pytest.raises(ValueError, match="fusion.*heads='separate'"):
        em.create_balancer("mbsd", model)
    balancer = em.create_balancer("mbsd", model, heads="separate")
    batch, y = make_toy_batch(2, 16)
    out = model(batch)
    balancer.loss(out, y).backward()
    assert all(p.grad is not None for p in balancer.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders.parameters())
    torch.testing.assert_close(balancer.predict_unimodal(out)["m0"], balancer.heads.logit(out, "m0"))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"distance": "l2"}, "option 'distance' must be one of 'auto', 'logits', 'probs', found 'l2'"),
        ({"kl_input": "logit"}, "option 'kl_input' must be one of 'prob', 'log', found 'logit'"),
        ({"heads": "own"}, "option 'heads' must be one of 'separate', 'shared', found 'own'"),
    ],
)
def test_bad_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        em.create_balancer("mbsd", make_toy_model(2), **options)
