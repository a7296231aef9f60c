"""CML: BalanceBenchmark's CML_trainer re-enacted, the confidence hinge acting, and its options."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from torch import Tensor, nn

import equimodal as em
from equimodal.balancers.cml import CML
from equimodal.types import MultimodalOutput


def balancemm_loss(
    out: MultimodalOutput, model: nn.Module, label: Tensor, lam: float, order: list[str]
) -> Tensor:
    """CML_trainer.py training_step (lines 19-22, 135-156 / 181-201), literally, for the concat head:
    unimodal logits W_m h_m + b/M (unimodality_calculate), modalities popped from the end of the shuffled
    list, out_p = out_s - unimodal[m] + b/M, conf from torch.max(softmax), hinge max(0, sum(conf_p - conf_s))."""
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    n = len(order)
    bias = model.fusion.fc.bias
    unimodal_result = dict(out.unimodal_logits)
    out_s = out.logits
    random_dict = list(reversed(order))  # their pop() takes the last: ours removes order[0] first
    loss_c = 0
    for i in range(n - 1):
        removed = random_dict.pop()
        out_p = out_s - unimodal_result[removed] + bias / n
        conf_s, _ = torch.max(softmax(out_s), dim=1)
        conf_p, _ = torch.max(softmax(out_p), dim=1)
        if i == 0:
            loss = criterion(out_s, label)
        loss = loss + criterion(out_p, label)
        loss_c = loss_c + max(0, torch.sub(conf_p, conf_s).sum())
        out_s = out_p
    return loss / n + lam * loss_c


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_loss_and_gradients_equal_balancebenchmark(num_modalities: int) -> None:
    model = make_toy_model(num_modalities)
    batch, y = make_toy_batch(num_modalities, 16)
    # lam large enough that the hinge is felt; reduction="sum" is their batch-summed hinge
    balancer = em.create_balancer("cml", model, lam=2.0, reduction="sum")
    out = model(batch)
    acted = []
    for step in range(3):  # three removal orders
        balancer.num_steps = step
        ours = balancer.loss(out, y)
        theirs = balancemm_loss(out, model, y, 2.0, balancer.removal_order())
        torch.testing.assert_close(ours, theirs)
        acted.append(balancer.stats()["hinge"] > 0)
        params = [*model.parameters()]
        g_ours = torch.autograd.grad(ours, params, retain_graph=True, allow_unused=True)
        g_theirs = torch.autograd.grad(theirs, params, retain_graph=True, allow_unused=True)
        for a, b in zip(g_ours, g_theirs, strict=True):
            torch.testing.assert_close(a, b)
    assert any(acted)  # the hinge was positive in at least one order (checked: M=2 has one of each)


def test_the_default_mean_is_the_sum_over_the_batch_size() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 16)
    out = model(batch)
    by_mean = em.create_balancer("cml", model, lam=0.1 * 16).loss(out, y)
    by_sum = em.create_balancer("cml", model, lam=0.1, reduction="sum").loss(out, y)
    torch.testing.assert_close(by_mean, by_sum)


def test_defaults() -> None:
    params = inspect.signature(CML.__init__).parameters
    assert params["lam"].default == 0.1  # BalanceBenchmark trainer_config.yaml
    assert (params["subsets"].default, params["reduction"].default) == ("chain", "mean")


def _output(model: nn.Module, feats: Tensor) -> MultimodalOutput:
    """The model's output for both modalities given the same features ``feats`` (a controlled case)."""
    features = {"m0": feats, "m1": feats.clone()}
    fused, uni = model.fusion(features)
    return MultimodalOutput(fused, uni, features)


def _cancelling_model(block_m1: float) -> nn.Module:
    """A concat head without bias whose m1 block is ``block_m1`` times the m0 block: with equal features the
    full logits are ``(1 + block_m1) A z`` and removing m1 leaves ``A z``."""
    model = make_toy_model(2)
    with torch.no_grad():
        model.fusion.fc.bias.zero_()
        model.fusion.fc.weight[:, 8:] = block_m1 * model.fusion.fc.weight[:, :8]
    return model


def test_the_hinge_acts_only_when_a_subset_is_more_confident() -> None:
    feats = torch.randn(32, 8, generator=torch.Generator().manual_seed(3)).abs()
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(4))
    model = _cancelling_model(-0.5)  # removing m1 doubles the logits: a sharper softmax
    out = _output(model, feats)
    each = em.create_balancer("cml", model, subsets="each")
    loss = each.loss(out, y)
    stats = each.stats()
    assert stats["hinge"] > 0 and 0.5 <= stats["acting"] <= 1
    ces = [F.cross_entropy(o, y) for o in [out.logits, *(each.subset_logits(out, r) for r in each.masks())]]
    torch.testing.assert_close(loss, sum(ces) / 3 + 0.1 * torch.tensor(stats["hinge"]))
    # equal blocks: every subset halves the logits, so it is less confident; no hinge
    model = _cancelling_model(1.0)
    calm = em.create_balancer("cml", model, subsets="each")
    loss = calm.loss(_output(model, feats), y)
    assert calm.stats()["hinge"] == 0 and calm.stats()["acting"] == 0


def test_the_hinge_gradient_lowers_the_subsets_confidence() -> None:
    feats = torch.randn(32, 8, generator=torch.Generator().manual_seed(3)).abs()
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(4))
    model = _cancelling_model(-0.5)
    w = model.fusion.fc.weight
    with_hinge = em.create_balancer("cml", model, subsets="each", lam=1.0)
    without = em.create_balancer("cml", model, subsets="each", lam=0.0)
    g = torch.autograd.grad(with_hinge.loss(_output(model, feats), y), w)[0]
    g = g - torch.autograd.grad(without.loss(_output(model, feats), y), w)[0]  # the hinge's own gradient
    before = with_hinge.stats()["hinge"]
    with torch.no_grad():
        w.sub_(0.5 * g)
    with_hinge.loss(_output(model, feats), y)
    assert 0 <= with_hinge.stats()["hinge"] < before


def test_chain_removes_one_more_modality_each_time_in_a_per_step_order() -> None:
    model = make_toy_model(4)
    balancer = em.create_balancer("cml", model)
    masks = balancer.masks()
    assert [len(r) for r in masks] == [1, 2, 3] and all(masks[k] == masks[k + 1][: k + 1] for k in range(2))
    orders = set()
    for step in range(20):
        balancer.num_steps = step
        orders.add(tuple(balancer.removal_order()))
    assert len(orders) > 1  # redrawn per optimizer step, from the seed
    twin = em.create_balancer("cml", make_toy_model(4))
    twin.num_steps = 19
    assert twin.removal_order() == balancer.removal_order()


def test_outside_its_window_it_is_plain_cross_entropy() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 16)
    balancer = em.create_balancer("cml", model, end_epoch=0)
    balancer.start_epoch(1)
    out = model(batch)
    torch.testing.assert_close(balancer.loss(out, y), F.cross_entropy(out.logits, y))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lam": -1.0}, "option 'lam' must be a finite number >= 0, found -1.0"),
        ({"subsets": "all"}, "option 'subsets' must be one of 'chain', 'each', found 'all'"),
        ({"reduction": "max"}, "option 'reduction' must be one of 'mean', 'sum', found 'max'"),
        ({"mask": "zero"}, "option 'mask' must be one of 'auto', 'features', 'logits', found 'zero'"),
    ],
)
def test_bad_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        em.create_balancer("cml", make_toy_model(2), **options)


def test_a_model_without_a_fusion_head_is_refused() -> None:
    class NoFusion(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoders = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})

    with pytest.raises(ValueError, match="mask='features'.*needs `model.fusion`.*NoFusion has none"):
        em.create_balancer("cml", NoFusion(), mask="features")
    assert em.create_balancer("cml", NoFusion()).mask == "logits"  # auto: additive unimodal logits assumed
    with pytest.raises(ValueError, match="auxiliary heads"):
        em.create_balancer("cml", make_toy_model(2, fusion="film"), mask="logits")


def test_logit_masking_drops_the_modalitys_whole_term() -> None:
    """mask="logits" equals zeroed features for a concat head, up to the removed modality's bias share."""
    model = make_toy_model(3)
    out = model(make_toy_batch(3, 8)[0])
    by_logits = em.create_balancer("cml", model, mask="logits").subset_logits(out, ["m1", "m2"])
    by_features = em.create_balancer("cml", model).subset_logits(out, ["m1", "m2"])
    torch.testing.assert_close(by_logits, by_features - 2 * model.fusion.fc.bias / 3)
