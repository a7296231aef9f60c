"""MMCosine: the official training logits re-enacted, the norm invariance it buys, and its options."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model

import equimodal as em
from equimodal.balancers.mmcosine import MMCosine


def official_logits(a: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """main_CD.py train_epoch, lines 113-118, literally: the fc_out weight's two column blocks, transposed and
    normalised along dim 0, against the row-normalised features; summed after scaling."""
    d = a.shape[1]
    out_a = torch.mm(F.normalize(a, dim=1), F.normalize(torch.transpose(weight[:, :d], 0, 1), dim=0))
    out_v = torch.mm(F.normalize(v, dim=1), F.normalize(torch.transpose(weight[:, d:], 0, 1), dim=0))
    return out_a * scaling + out_v * scaling


@pytest.mark.parametrize("scaling", [10.0, 15.0])
def test_loss_and_gradients_equal_the_official_code(scaling: float) -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 16)
    balancer = em.create_balancer("mmcosine", model, scaling=scaling)
    assert balancer.head == "model"
    out = model(batch)
    ours = balancer.loss(out, y)
    theirs = F.cross_entropy(
        official_logits(out.features["m0"], out.features["m1"], model.fusion.fc.weight, scaling), y
    )
    torch.testing.assert_close(ours, theirs)
    params = [model.fusion.fc.weight, *model.encoders.parameters()]
    g_ours = torch.autograd.grad(ours, params, retain_graph=True)
    g_theirs = torch.autograd.grad(theirs, params)
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b)
    # evaluation as the official valid(): the unimodal logits are the scaled cosines
    uni = balancer.predict_unimodal(out)
    d = out.features["m0"].shape[1]
    w = model.fusion.fc.weight
    torch.testing.assert_close(
        uni["m1"], scaling * F.normalize(out.features["m1"], dim=1) @ F.normalize(w[:, d:].t(), dim=0)
    )


def test_defaults_are_the_official_ones() -> None:
    params = inspect.signature(MMCosine.__init__).parameters
    assert params["scaling"].default == 10.0  # argparse default and README command; BalanceBenchmark: 15
    assert params["predict"].default == "cosine"
    balancer = em.create_balancer("mmcosine", make_toy_model(3))
    assert balancer.last_epoch is None and balancer.requirements.unused_parameters


def test_a_modality_cannot_dominate_by_growing_its_features() -> None:
    """The mechanism: scaling one encoder's output changes the model's logits, not the cosine logits."""
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 16)
    balancer = em.create_balancer("mmcosine", model)
    out = model(batch)
    grown = out._replace(features={"m0": out.features["m0"] * 50.0, "m1": out.features["m1"]})
    torch.testing.assert_close(balancer.loss(grown, y), balancer.loss(out, y))
    before = balancer.stats()
    assert before["feature_norm/m0"] > 0 and -1.0 <= before["cos/m0"] <= 1.0
    fused = balancer.predict(out)
    assert (fused.abs() <= 2 * balancer.scaling + 1e-4).all()  # each modality adds at most s


def test_outside_its_window_it_is_plain_cross_entropy() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 16)
    balancer = em.create_balancer("mmcosine", model, start_epoch=1)
    balancer.start_epoch(0)
    out = model(batch)
    torch.testing.assert_close(balancer.loss(out, y), F.cross_entropy(out.logits, y))
    assert balancer.predict(out) is out.logits
    balancer.start_epoch(1)
    assert not torch.allclose(balancer.loss(out, y), F.cross_entropy(out.logits, y))


def test_unsplittable_fusions_get_a_cosine_head_of_their_own() -> None:
    model = make_toy_model(2, fusion="film")
    balancer = em.create_balancer("mmcosine", model)
    assert balancer.head == "own" and len(list(balancer.parameters())) == 2
    batch, y = make_toy_batch(2, 16)
    out = model(batch)
    loss = balancer.loss(out, y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in balancer.parameters())
    logits = balancer.predict(out)
    w = balancer.weights
    expected = sum(
        10.0 * F.normalize(out.features[m], dim=1) @ F.normalize(w[m], dim=1).t() for m in ("m0", "m1")
    )
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match="head='model'.*FiLM"):
        em.create_balancer("mmcosine", model, head="model")


def test_predict_model_reports_the_models_fused_logits_as_the_official_valid() -> None:
    model = make_toy_model(2)
    out = model(make_toy_batch(2, 8)[0])
    balancer = em.create_balancer("mmcosine", model, predict="model")
    assert balancer.predict(out) is out.logits


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"scaling": 0.0}, "'scaling' must be a finite number > 0, found 0.0"),
        ({"head": "shared"}, "'head' must be one of"),
        ({"predict": "fused"}, "option 'predict' must be one of 'cosine', 'model', found 'fused'"),
    ],
)
def test_bad_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        em.create_balancer("mmcosine", make_toy_model(2), **options)


def test_output_without_features_is_refused() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 8)
    out = model(batch)._replace(features=None)
    with pytest.raises(ValueError, match="features=None"):
        em.create_balancer("mmcosine", model).loss(out, y)
