"""multitask (alias own_signal: weight 2): the fused CE plus each encoder's CE through a head of its own, starved-loss weights and
per-encoder gradient-norm equalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model

import equimodal as em
from equimodal.balancers.base import DriverError
from equimodal.testing import drive_step, optimizer_for


def _fixed(**options: object) -> em.Balancer:
    return em.create_balancer("multitask", make_toy_model(3), **options)


def test_loss_is_fused_plus_weighted_own_head_losses() -> None:
    bal = _fixed(weight=0.7, adapt="none")
    batch, y = make_toy_batch(3)
    out = bal.model(batch)
    own = [F.cross_entropy(bal.heads.linears[m](out.features[m]), y) for m in bal.modalities]
    expected = F.cross_entropy(out.logits, y) + 0.7 * sum(own)
    assert torch.allclose(bal.loss(out, y), expected)
    # the heads are the balancer's, trained through its parameters(), and reach the encoders
    assert {id(p) for p in bal.parameters()}.isdisjoint(id(p) for p in bal.model.parameters())
    bal.loss(out, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bal.model.encoders.parameters())


def test_starved_weights_follow_the_loss_ratio_and_are_capped() -> None:
    bal = _fixed(weight=2.0, adapt="starved", power=1.0, max_weight=3.0)
    batch, y = make_toy_batch(3)
    out = bal.model(batch)
    fused = F.cross_entropy(out.logits, y)
    own = torch.stack([F.cross_entropy(bal.heads.linears[m](out.features[m]), y) for m in bal.modalities])
    factor = (own / fused).clamp(max=3.0).detach()
    assert torch.allclose(bal.loss(out, y), fused + (2.0 * factor * own).sum())
    stats = bal.stats()
    assert [stats[f"w/{m}"] for m in bal.modalities] == pytest.approx((2.0 * factor).tolist())
    # a fused loss far below the own-head losses hits the cap
    tiny = em.types.MultimodalOutput(
        logits=F.one_hot(y, 3).float() * 50, unimodal_logits=out.unimodal_logits, features=out.features
    )
    bal.loss(tiny, y)
    assert all(bal.stats()[f"w/{m}"] == pytest.approx(6.0) for m in bal.modalities)


def test_normalize_equalises_the_encoders_gradient_norms() -> None:
    def norms(bal: em.Balancer) -> torch.Tensor:
        return torch.stack(
            [torch.cat([p.grad.reshape(-1) for p in bal.encoder_params(m)]).norm() for m in bal.modalities]
        )

    batch, y = make_toy_batch(3)
    spread = {}
    for normalize in (0.0, 1.0):
        bal = _fixed(weight=1.0, normalize=normalize, momentum=0.0, max_scale=100.0)
        bal.model.zero_grad()
        bal.loss(bal.model(batch), y).backward()
        before = norms(bal)
        bal.before_step()
        after = norms(bal)
        spread[normalize] = float(after.max() / after.min())
        if normalize == 1.0:  # each encoder scaled to the mean norm
            assert torch.allclose(after, before.mean().expand_as(after), rtol=1e-4)
            assert [bal.stats()[f"scale/{m}"] for m in bal.modalities] == pytest.approx(
                (before.mean() / before).tolist(), rel=1e-4
            )
    assert spread[1.0] == pytest.approx(1.0, abs=1e-4) and spread[0.0] > 1.05


def test_equalisation_factors_are_bounded() -> None:
    bal = _fixed(weight=1.0, normalize=1.0, momentum=0.0, max_scale=2.0)
    batch, y = make_toy_batch(3)
    bal.loss(bal.model(batch), y).backward()
    for p in bal.encoder_params("m0"):
        p.grad.mul_(1e4)  # one encoder's gradients far larger than the others'
    bal.before_step()
    scales = [bal.stats()[f"scale/{m}"] for m in bal.modalities]
    assert min(scales) == pytest.approx(0.5) and max(scales) == pytest.approx(2.0)


def test_an_overflow_step_keeps_the_running_norms() -> None:
    bal = _fixed(weight=1.0, normalize=1.0, momentum=0.5)
    batch, y = make_toy_batch(3)
    bal.loss(bal.model(batch), y).backward()
    bal.before_step()
    kept = bal.grad_norms.clone()
    bal.model.zero_grad()
    bal.loss(bal.model(batch), y).backward()
    next(iter(bal.encoder_params("m1"))).grad.fill_(float("nan"))  # what a GradScaler would skip
    bal.before_step()
    assert torch.equal(bal.grad_norms, kept) and all(
        math.isfinite(bal.stats()[f"scale/{m}"]) for m in bal.modalities
    )


def test_refuses_bad_options() -> None:
    for options, words in (
        ({"weight": -1.0}, "option 'weight' must be a finite number >= 0, found -1.0"),
        ({"adapt": "always"}, "adapt"),
        ({"normalize": 2.0}, "'normalize' must be a finite number in [0, 1]"),
        ({"max_weight": 0.5}, "option 'max_weight' must be a finite number >= 1"),
        ({"max_scale": 0.5}, "option 'max_scale' must be"),
    ):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            _fixed(**options)


def test_heads_left_out_of_the_optimizer_raise() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("multitask", model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the heads are missing
    batch, y = make_toy_batch(2)
    with pytest.raises(DriverError, match="optimizer"):
        for _ in range(2):  # found at the second step
            drive_step(bal, model, batch, y, opt)


@pytest.mark.parametrize("fusion", ["film", "gated", "attention", "ml_lstm"])
def test_runs_on_fusions_that_cannot_be_split(fusion: str) -> None:
    """The fused loss falls at least as far as in joint training (60 SGD steps on a toy batch)."""

    def fused_losses(name: str, **options: object) -> list[float]:
        model = make_toy_model(2, fusion=fusion)
        bal = em.create_balancer(name, model, **options)
        opt = optimizer_for(model, bal)
        batch, y = make_toy_batch(2)
        losses = []
        for _ in range(60):
            out = model(batch)
            loss = bal.loss(out, y)
            losses.append(float(F.cross_entropy(out.logits.detach(), y)))
            opt.zero_grad()
            loss.backward()
            bal.before_step()
            opt.step()
        if name == "multitask":
            assert set(bal.predict_unimodal(model(batch))) == set(bal.modalities)
        return losses

    joint = fused_losses("none")
    own = fused_losses("multitask", weight=2.0, adapt="starved", normalize=0.5)  # own_signal's weight
    assert own[-1] < own[0] and own[-1] <= joint[-1] + 0.02


@pytest.mark.parametrize("seed", [0, 1])
def test_trains_the_under_trained_encoder_more_than_joint_training(seed: int) -> None:
    """A toy imbalance: m1 carries the label without noise (fit first), m0 carries it through noise. After
    joint training the fused loss no longer teaches m0's encoder; with multitask it does: a linear probe
    on m0's features is more accurate (seeds 0-4 measured: 0.49-0.55 joint, 0.61-0.64 with weight 2, starved, normalize 0.5)."""
    g = torch.Generator().manual_seed(seed)
    n, classes = 256, 4
    y = torch.randint(0, classes, (n,), generator=g)
    x0 = torch.randn(n, 5, generator=g)
    x0[:, :4] += F.one_hot(y, classes).float()
    x1 = torch.zeros(n, 6)
    x1[:, 0] = y.float()
    batch = {"m0": x0, "m1": x1}

    def probe_accuracy(name: str, **options: object) -> float:
        model = make_toy_model(2, num_classes=classes, seed=1)
        bal = em.create_balancer(name, model, **options)
        opt = optimizer_for(model, bal, lr=0.05)
        for _ in range(300):
            loss = bal.loss(model(batch), y)
            opt.zero_grad()
            loss.backward()
            bal.before_step()
            opt.step()
        with torch.no_grad():
            z = model(batch).features["m0"]
        head = torch.nn.Linear(z.shape[1], classes)
        probe = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(200):
            probe.zero_grad()
            F.cross_entropy(head(z), y).backward()
            probe.step()
        return float((head(z).argmax(1) == y).float().mean())

    joint = probe_accuracy("none")
    own = probe_accuracy("multitask", weight=2.0, adapt="starved", normalize=0.5)
    assert own > joint + 0.05


def test_own_signal_is_the_multitask_baseline_with_weight_two_and_listed_as_an_alias(capsys) -> None:
    from equimodal.cli import main

    own, base = (em.create_balancer(n, make_toy_model(2)) for n in ("own_signal", "multitask"))
    assert type(own) is type(base) and (own.weight, base.weight) == (2.0, 1.0)  # MMPareto's baseline: w = 1
    assert em.create_balancer("own_signal", make_toy_model(2), weight=0.5).weight == 0.5  # an option wins
    assert "own_signal" not in em.list_balancers() and "own_signal" in em.balancers.registry.BALANCERS
    assert main(["list", "balancers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "multitask" in lines and lines[-1].startswith("own_signal  (alias: multitask with weight=2.0")
