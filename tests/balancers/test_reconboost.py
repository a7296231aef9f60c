"""ReconBoost: the boosting loss against a literal re-enactment of the released step, the GA term, the stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import equimodal
from equimodal import DriverError
from equimodal.testing import toy_batch, toy_model


def _build(num_modalities: int = 2, **options: object) -> tuple[torch.nn.Module, equimodal.Balancer]:
    model = toy_model(num_modalities)
    return model, equimodal.create_balancer("reconboost", model, **options)


def _released_boosting_loss(out_obj, out_join, lbl, weight1, weight2):
    """The released phase-1 loss, re-enacted from train.py: a one-hot target, ``.mean(-1)`` over classes."""
    target = torch.zeros(lbl.shape[0], out_obj.shape[1]).scatter_(1, lbl.view(-1, 1), 1)
    per_sample = -weight1 * (target * out_obj.log_softmax(1)).mean(-1) + weight2 * (
        target * out_join.detach().softmax(1) * out_obj.log_softmax(1)
    ).mean(-1)
    return per_sample.mean()


def test_fidelity_learner_loss_matches_the_released_step() -> None:
    """Stage 1 (m1's turn, GA on): our loss equals train.py's boosting loss + alpha * MSE of softmaxes."""
    model, bal = _build(2, epochs_per_stage=1, correct_epoch=1, ga="released")
    with torch.no_grad():
        bal.boost_rate.fill_(1.3)
    x, y = toy_batch(2, 16)
    bal.start_epoch(2)  # stage 1: learner m1, previous learner m0
    out = model(x)
    ours = bal.loss(out, y, batch=x)
    h = {m: bal.head(out.features[m]) for m in ("m0", "m1")}  # the common head on each modality (equal dims)
    out_join = 1.3 * h["m0"]  # DynamicNet.forward(mask_model="m1")
    expected = _released_boosting_loss(h["m1"], out_join, y, 5.0, 1.0)
    expected = expected + 0.5 * F.mse_loss(h["m1"].detach().softmax(1), h["m0"].detach().softmax(1))
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(
        bal.stats()["recon_weight"], (5.0 - out_join.softmax(1)[range(16), y]).mean().item()
    )


def test_rectification_is_ce_of_the_boosted_sum_over_every_learner() -> None:
    model, bal = _build(3, epochs_per_stage=1, correct_epoch=1)
    x, y = toy_batch(3, 16)
    bal.start_epoch(1)  # the rectification of stage 0
    out = model(x)
    loss = bal.loss(out, y, batch=x)
    ensemble = bal.boost_rate * sum(bal.head(F.pad(out.features[m], (0, 0))) for m in ("m0", "m1", "m2"))
    torch.testing.assert_close(loss, F.cross_entropy(ensemble, y))
    torch.testing.assert_close(bal.predict(out), ensemble)  # forward_grad / test: the same boosted sum
    loss.backward()
    assert bal.boost_rate.grad is not None and bal.boost_rate.grad.abs() > 0
    assert all(p.grad is not None for m in model.encoders for p in bal.encoder_params(m))


def test_ga_released_adds_a_value_without_gradient_and_paper_has_one() -> None:
    grads = {}
    for mode in ("released", "paper", "off"):
        model, bal = _build(2, epochs_per_stage=1, correct_epoch=0, alpha=100.0, ga=mode)
        x, y = toy_batch(2, 16)
        bal.start_epoch(1)  # stage 1 (no rectification phase): learner m1, GA against m0
        bal.loss(model(x), y, batch=x).backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in bal.encoder_params("m1")])
        assert all(p.grad is None for p in bal.encoder_params("m0"))  # the other learner does not train
        assert bal.boost_rate.grad is None  # F is detached in the learner phase
    torch.testing.assert_close(grads["released"], grads["off"])  # as released, GA moves nothing
    assert not torch.allclose(grads["paper"], grads["off"])


def test_ga_paper_gradient_is_the_gradient_of_the_mse_of_softmaxes() -> None:
    from equimodal.balancers.reconboost import ga_loss

    h = torch.randn(6, 4, requires_grad=True)
    prev = torch.randn(6, 4)
    ga_loss(h, prev, "paper").backward()
    h2 = h.detach().clone().requires_grad_(True)
    ((h2.softmax(1) - prev.softmax(1)) ** 2).mean().backward()
    torch.testing.assert_close(h.grad, h2.grad)


def test_turns_alternate_and_only_the_stage_learner_trains() -> None:
    model, bal = _build(3, epochs_per_stage=2, correct_epoch=1)
    x, y = toy_batch(3, 16)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    seen = []
    for epoch in range(10):
        bal.start_epoch(epoch)
        before = {m: [p.detach().clone() for p in bal.encoder_params(m)] for m in model.encoders}
        bal.train_step(x, y, opt)
        moved = [
            m
            for m in model.encoders
            if any(not torch.equal(a, p) for a, p in zip(before[m], bal.encoder_params(m), strict=True))
        ]
        stats = bal.stats()
        seen.append((int(stats["stage"]), "R" if stats["rectify"] else moved[0], len(moved)))
    assert seen == [
        (0, "m0", 1), (0, "m0", 1), (0, "R", 3),
        (1, "m1", 1), (1, "m1", 1), (1, "R", 3),
        (2, "m2", 1), (2, "m2", 1), (2, "R", 3),
        (3, "m0", 1),
    ]  # fmt: skip


def test_order_option_and_window_start() -> None:
    _, bal = _build(3, epochs_per_stage=1, correct_epoch=1, order=["m2", "m0", "m1"], start_epoch=2)
    bal.set_epoch(2)
    assert bal.phase() == (0, "learn", "m2")
    bal.set_epoch(5)
    assert bal.phase() == (1, "rectify", "m0")


def test_stage_zero_has_no_ga_and_first_learner_sees_the_others() -> None:
    model, bal = _build(2, epochs_per_stage=1, correct_epoch=1)
    x, y = toy_batch(2, 16)
    bal.start_epoch(0)
    bal.loss(model(x), y, batch=x)
    stats = bal.stats()
    assert "ga" not in stats and stats["learner/m0"] == 1.0 and stats["learner/m1"] == 0.0
    assert 4.0 <= stats["recon_weight"] <= 5.0  # w1 - w2 p_F(y) with p_F(y) in [0, 1]


def test_head_model_uses_the_models_unimodal_logits() -> None:
    model, bal = _build(2, head="model", epochs_per_stage=1, correct_epoch=1)
    assert [tuple(p.shape) for p in bal.parameters()] == [()]  # only the boost rate
    x, y = toy_batch(2, 16)
    bal.start_epoch(1)
    out = model(x)
    torch.testing.assert_close(
        bal.predict(out), bal.boost_rate * (out.unimodal_logits["m0"] + out.unimodal_logits["m1"])
    )
    with pytest.raises(ValueError, match="option 'head' must be 'shared' for this model"):
        equimodal.create_balancer("reconboost", toy_model(2, fusion="film"), head="model")


def test_optimizer_state_reset_at_phase_starts_only() -> None:
    model, bal = _build(2, epochs_per_stage=2, correct_epoch=1, optimizer_state="reset")
    x, y = toy_batch(2, 16)
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1, momentum=0.9)
    bal.check_optimizer(opt)
    bal.start_epoch(0)
    bal.train_step(x, y, opt)
    assert len(opt.state) > 0
    bal.start_epoch(1)  # second epoch of the same learner phase: kept
    assert len(opt.state) > 0
    bal.start_epoch(1)  # the same epoch again (a resume): kept
    assert len(opt.state) > 0
    bal.start_epoch(2)  # the rectification phase starts: dropped, as a fresh SGD
    assert len(opt.state) == 0
    _, bare = _build(2, optimizer_state="reset")
    with pytest.raises(DriverError, match="check_optimizer"):
        bare.start_epoch(0)


def test_state_round_trip_keeps_head_and_boost_rate_in_place() -> None:
    _, bal = _build(2)
    _, other = _build(2, seed=5)
    head_param, beta = other.head.net[0].weight, other.boost_rate
    with torch.no_grad():
        bal.boost_rate.fill_(0.7)
    other.load_state_dict(bal.state_dict())
    assert other.head.net[0].weight is head_param and other.boost_rate is beta
    assert other.boost_rate.item() == pytest.approx(0.7)
    torch.testing.assert_close(other.head.net[0].weight, bal.head.net[0].weight)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"ga": "both"}, "option 'ga' must be one of 'paper', 'released', 'off'"),
        ({"epochs_per_stage": 0}, "option 'epochs_per_stage' must be an integer >= 1, found 0"),
        ({"correct_epoch": -1}, "option 'correct_epoch' must be an integer >= 0"),
        ({"weight2": -1.0}, "option 'weight2' must be a finite number >= 0"),
        ({"alpha": float("nan")}, "option 'alpha'"),
        ({"head": "mlp"}, "option 'head' must be one of 'shared', 'model'"),
        ({"hidden": 0}, "option 'hidden' must be an integer >= 1"),
        ({"optimizer_state": "fresh"}, "option 'optimizer_state'"),
        ({"order": ["m0", "m0"]}, "option 'order' must name every modality once"),
    ],
)
def test_bad_options_raise_naming_the_option(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _build(2, **options)


def test_unequal_feature_sizes_are_zero_padded_and_too_wide_refused() -> None:
    model, bal = _build(2, feature_dims={"m0": 8, "m1": 12})
    assert bal.width == 12 and bal.head.net[0].in_features == 12
    x, y = toy_batch(2, 16)
    bal.start_epoch(0)
    out = model(x)
    expected = bal.head(F.pad(out.features["m0"], (0, 4)))
    torch.testing.assert_close(bal.predict_unimodal(out)["m0"], expected)
    _, narrow = _build(2, feature_dims={"m0": 4, "m1": 4})
    with pytest.raises(ValueError, match="d <= 4"):
        narrow.predict(out)
