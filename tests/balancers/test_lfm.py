"""LFM: the loss and the learnable weight step equal a literal re-enactment of the authors' code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from torch import nn

import equimodal as em
from equimodal import testing
from equimodal.balancers import EpochData
from equimodal.balancers.lfm import alignment_divergence, heuristic_weights
from equimodal.types import MultimodalOutput


# ------------------------------------------------------------------ the authors' code, re-enacted
def their_alignment(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Alignment`` of Crema_epoch.py (lines 38-45), as written there."""
    p = F.softmax(p, dim=-1)
    q = F.softmax(q, dim=-1)
    m = 0.5 * p + 0.5 * q
    kl_p_m = F.kl_div(p.log(), m, reduction="batchmean")
    kl_q_m = F.kl_div(q.log(), m, reduction="batchmean")
    return 0.5 * (kl_p_m + kl_q_m)


def their_alpha(epoch: int) -> list[float]:
    """``getAlpha_Learnable_Fitted`` of Crema_epoch.py (lines 47-53)."""
    coef_alpha1 = [
        2.04623704e-01,
        3.35472727e-03,
        1.22989557e-04,
        -2.92947416e-06,
        2.23835486e-08,
        -5.39717505e-11,
    ]
    coef_alpha2 = [
        7.95376296e-01,
        -3.35472727e-03,
        -1.22989557e-04,
        2.92947416e-06,
        -2.23835486e-08,
        5.39717505e-11,
    ]
    alpha1 = sum(c * (epoch**i) for i, c in enumerate(coef_alpha1))
    alpha2 = sum(c * (epoch**i) for i, c in enumerate(coef_alpha2))
    return [alpha1, alpha2]


def their_loss(o_a: torch.Tensor, o_v: torch.Tensor, y: torch.Tensor, cls_k: list[float]) -> torch.Tensor:
    """The training loss of ``train_audio_video`` (lines 69-71)."""
    loss_alignment = their_alignment(o_a, o_v)
    loss_cls = nn.CrossEntropyLoss(reduction="none")(0.5 * o_v + 0.5 * o_a, y).mean()
    return 2 * (cls_k[0] * loss_cls + cls_k[1] * loss_alignment)


def their_learnable_step(epoch, valbatch, forward, params, alpha, lr_alpha):  # noqa: ANN001, ANN201
    """``getAlpha_Learnable`` of Crema_epoch_learnable.py (lines 55-97); ``forward`` gives (o_a, o_v)."""
    inputs, y = valbatch
    half_size = y.size(0) // 2
    inputs = {k: v[:half_size] for k, v in inputs.items()}
    y = y[:half_size]
    o_a, o_v = forward(inputs)
    loss_alignment = their_alignment(o_a, o_v)
    loss_cls = nn.CrossEntropyLoss(reduction="none")(0.5 * o_v + 0.5 * o_a, y).mean()
    L_total = alpha[0] * loss_cls + alpha[1] * loss_alignment  # noqa: N806
    theta_grads = torch.autograd.grad(L_total, params(), create_graph=True)
    cls_grads = torch.autograd.grad(loss_cls, params(), retain_graph=True, create_graph=True)
    hvp = torch.autograd.grad(outputs=theta_grads, inputs=params(), grad_outputs=cls_grads, retain_graph=True)
    with torch.no_grad():
        alpha_grad = hvp[0].mean().item()
        if epoch % 20 == 0 and epoch != 0:
            lr_alpha = lr_alpha / 2
        alpha[1] -= lr_alpha * alpha_grad
        alpha[1] = max(0.05, min(0.95, alpha[1]))
        alpha[0] = 1.0 - alpha[1]
    return alpha, lr_alpha, alpha_grad


def true_js(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """The JS divergence ``0.5 KL(p || m) + 0.5 KL(q || m)`` (what the code's names say it computes)."""
    p, q = F.softmax(p_logits, -1), F.softmax(q_logits, -1)
    m = 0.5 * (p + q)
    return 0.5 * (F.kl_div(m.log(), p, reduction="batchmean") + F.kl_div(m.log(), q, reduction="batchmean"))


def random_output(batch: int = 8, classes: int = 3, seed: int = 0) -> tuple[MultimodalOutput, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    o_a = (2 * torch.randn(batch, classes, generator=g)).requires_grad_()
    o_v = (2 * torch.randn(batch, classes, generator=g)).requires_grad_()
    y = torch.randint(0, classes, (batch,), generator=g)
    return MultimodalOutput(o_a + o_v, {"m0": o_a, "m1": o_v}), y


# ------------------------------------------------------------------ fidelity
@pytest.mark.parametrize("epoch", [0, 37, 120, 180])
def test_loss_and_gradients_equal_the_official_training_loss(epoch: int) -> None:
    out, y = random_output(seed=epoch)
    o_a, o_v = out.unimodal_logits["m0"], out.unimodal_logits["m1"]
    balancer = em.create_balancer("lfm", make_toy_model(2), divergence="official")
    balancer.start_epoch(epoch)
    ours = balancer.loss(out, y)
    theirs = their_loss(o_a, o_v, y, their_alpha(epoch))
    torch.testing.assert_close(ours, theirs.float())
    torch.testing.assert_close(torch.autograd.grad(ours, [o_a, o_v]), torch.autograd.grad(theirs, [o_a, o_v]))
    a1, a2 = their_alpha(epoch)
    stats = balancer.stats()
    assert stats["alpha_ce"] == pytest.approx(a1, abs=1e-7) and stats["alpha_align"] == pytest.approx(
        a2, abs=1e-7
    )


def test_default_divergence_is_the_true_js_and_the_official_one_differs() -> None:
    out, y = random_output(seed=3)
    o_a, o_v = out.unimodal_logits["m0"], out.unimodal_logits["m1"]
    torch.testing.assert_close(alignment_divergence([o_a, o_v]), true_js(o_a, o_v))
    torch.testing.assert_close(alignment_divergence([o_a, o_v], "official"), their_alignment(o_a, o_v))
    assert not torch.allclose(true_js(o_a, o_v), their_alignment(o_a, o_v), rtol=1e-2)
    balancer = em.create_balancer("lfm", make_toy_model(2))
    balancer.start_epoch(5)
    a1, a2 = their_alpha(5)
    expected = 2 * (a1 * F.cross_entropy((o_a + o_v) / 2, y) + a2 * true_js(o_a, o_v))
    torch.testing.assert_close(balancer.loss(out, y), expected)


def _heldout(n: int = 16) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return make_toy_batch(2, n, seed=31)


def test_learnable_steps_equal_the_official_hypergradient_steps() -> None:
    """Epochs 0-21 without training: ``a2`` and the hypergradient follow the literal loop, halvings included."""
    model = make_toy_model(2)
    lr0 = 5.0  # large, so that the steps show at float precision (theirs is 1e-4)
    balancer = em.create_balancer(
        "lfm", model, weighting="learnable", divergence="official", alpha_lr=lr0, alpha_init=0.5
    )
    valbatch = _heldout()
    data = EpochData(train=[valbatch], heldout=[valbatch], device="cpu")

    def forward(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(inputs)
        return out.unimodal_logits["m0"], out.unimodal_logits["m1"]

    alpha, lr, moved = [0.5, 0.5], lr0, 0
    for epoch in range(22):
        before = alpha[1]
        alpha, lr, grad = their_learnable_step(epoch, valbatch, forward, model.parameters, alpha, lr)
        balancer.start_epoch(epoch, data)
        torch.testing.assert_close(balancer.alpha_grad, torch.tensor(grad), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(balancer.alpha_align, torch.tensor(alpha[1]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(balancer.weights(), torch.tensor(alpha), rtol=1e-5, atol=1e-7)
        moved += alpha[1] != before
    assert lr == lr0 / 2  # halved at epoch 20
    assert moved > 15  # the weight moved (not stuck at a bound)


# ------------------------------------------------------------------ mechanism
def test_heuristic_schedule_moves_weight_from_alignment_to_ce_and_is_held_after_200() -> None:
    balancer = em.create_balancer("lfm", make_toy_model(2))
    batch, y = make_toy_batch(2)
    seen = {}
    for epoch in (0, 80, 160, 199, 250):
        balancer.start_epoch(epoch)
        balancer.loss(balancer.model(batch), y)
        seen[epoch] = balancer.stats()
    assert seen[0]["alpha_align"] == pytest.approx(0.795376296, abs=1e-6)
    assert seen[160]["alpha_align"] < 0.11 < 0.49 < seen[80]["alpha_align"] < seen[0]["alpha_align"]
    assert seen[250]["alpha_align"] == pytest.approx(seen[199]["alpha_align"])
    assert heuristic_weights(1000) == heuristic_weights(199)
    assert 0 < seen[0]["align_share"] < 1 and seen[0]["divergence"] > 0


def test_window_offsets_the_schedule_and_outside_it_the_loss_is_plain_ce() -> None:
    out, y = random_output(seed=7)
    balancer = em.create_balancer("lfm", make_toy_model(2), start_epoch=10)
    balancer.start_epoch(3)
    torch.testing.assert_close(balancer.loss(out, y), F.cross_entropy(out.logits, y))
    balancer.start_epoch(10)
    balancer.loss(out, y)
    assert balancer.stats()["alpha_align"] == pytest.approx(their_alpha(0)[1], abs=1e-7)


def test_generalised_js_for_more_modalities() -> None:
    g = torch.Generator().manual_seed(1)
    logits = [3 * torch.randn(6, 4, generator=g) for _ in range(3)]
    probs = [F.softmax(o, -1) for o in logits]
    mix = sum(probs) / 3
    expected = sum(F.kl_div(mix.log(), p, reduction="batchmean") for p in probs) / 3
    torch.testing.assert_close(alignment_divergence(logits), expected)
    torch.testing.assert_close(alignment_divergence(logits[::-1]), expected)  # symmetric in the modalities
    assert float(alignment_divergence([logits[0]] * 3)) == pytest.approx(0.0, abs=1e-6)
    assert float(alignment_divergence(logits)) <= math.log(3)


def test_alignment_term_pulls_the_unimodal_predictions_together() -> None:
    """The alignment gradient lowers the divergence; with a2 = 0 (a1 = 1) it is plain CE of the mean."""
    out, y = random_output(seed=2)
    o_a, o_v = out.unimodal_logits["m0"], out.unimodal_logits["m1"]
    div = alignment_divergence([o_a, o_v])
    g_a, g_v = torch.autograd.grad(div, [o_a, o_v])
    after = alignment_divergence([o_a - 0.1 * g_a, o_v - 0.1 * g_v])
    assert after < div
    balancer = em.create_balancer(
        "lfm", make_toy_model(2), weighting="learnable", alpha_init=0.0, alpha_bounds=(0, 1)
    )
    balancer.start_epoch(0, EpochData(train=[_heldout()], heldout=[_heldout()], device="cpu"))
    balancer.alpha_align = torch.zeros(())
    torch.testing.assert_close(balancer.loss(out, y), 2 * F.cross_entropy((o_a + o_v) / 2, y))


def test_learnable_weight_is_clipped_and_a_non_finite_hypergradient_leaves_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make_toy_model(2)
    data = EpochData(train=[_heldout()], heldout=[_heldout()], device="cpu")
    balancer = em.create_balancer("lfm", model, weighting="learnable", alpha_lr=1e6)
    balancer.start_epoch(0, data)
    assert float(balancer.alpha_align) in (pytest.approx(0.05), pytest.approx(0.95))
    kept = balancer.alpha_align.clone()
    monkeypatch.setattr(type(balancer), "hypergradient", lambda self, b, t: torch.tensor(float("nan")))
    balancer.start_epoch(1, data)
    assert torch.equal(balancer.alpha_align, kept)


def test_learnable_mode_uses_the_first_heldout_samples_and_holds_out_a_small_share() -> None:
    model = make_toy_model(2)
    balancer = em.create_balancer("lfm", model, weighting="learnable")
    req = balancer.requirements
    assert req.epoch_data and req.heldout_fraction == 0.0025 and req.set_epoch
    heuristic = em.create_balancer("lfm", model).requirements
    assert not heuristic.epoch_data and heuristic.heldout_fraction == 0 and heuristic.set_epoch
    inputs, y = _heldout(16)
    pieces = [({k: v[i : i + 3] for k, v in inputs.items()}, y[i : i + 3]) for i in range(0, 16, 3)]
    batch, target = balancer._heldout_batch(EpochData(train=pieces, heldout=pieces, device="cpu"))
    assert torch.equal(target, y[:8]) and all(torch.equal(batch[k], inputs[k][:8]) for k in inputs)
    with pytest.raises(ValueError, match="heldout"):
        balancer.start_epoch(0, EpochData(train=pieces, heldout=None, device="cpu"))


def test_all_parameters_scope_differs_from_the_first_tensor() -> None:
    model = make_toy_model(2)
    batch, y = _heldout()
    first = em.create_balancer("lfm", model, weighting="learnable").hypergradient(batch, y)
    every = em.create_balancer("lfm", model, weighting="learnable", hypergrad_params="all").hypergradient(
        batch, y
    )
    assert torch.isfinite(first) and torch.isfinite(every) and not torch.allclose(first, every)


def test_prediction_is_the_mean_of_the_unimodal_logits() -> None:
    model = make_toy_model(3)
    batch, _ = make_toy_batch(3)
    balancer = em.create_balancer("lfm", model)
    balancer.start_epoch(0)
    out = model(batch)
    mean = torch.stack(list(out.unimodal_logits.values())).mean(0)
    torch.testing.assert_close(balancer.predict(out), mean)
    assert torch.equal(balancer.predict(out).argmax(1), out.logits.argmax(1))  # concat: fused = sum


def test_heads_follow_the_fusion() -> None:
    concat = em.create_balancer("lfm", make_toy_model(2))
    assert concat.heads is None and not list(concat.parameters()) and not concat.unused_parameters
    film_model = make_toy_model(2, fusion="film")
    film = em.create_balancer("lfm", film_model)
    assert film.heads is not None and list(film.parameters()) and film.unused_parameters
    with pytest.raises(ValueError, match="fusion.*heads='separate'"):
        em.create_balancer("lfm", film_model, heads="shared")
    assert em.create_balancer("lfm", make_toy_model(2, fusion="weighted")).unused_parameters  # its alpha


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weighting": "fixed"}, "'weighting' must be one of 'heuristic', 'learnable', found 'fixed'"),
        ({"divergence": "kl"}, "'divergence' must be one of 'js', 'official', found 'kl'"),
        ({"hypergrad_params": "last"}, "'hypergrad_params' must be one of 'first', 'all', found 'last'"),
        ({"heads": "own"}, "'heads' must be one of 'shared', 'separate', found 'own'"),
        ({"alpha_bounds": (0.9, 0.1)}, "'alpha_bounds' must be"),
        ({"alpha_init": 0.99}, r"'alpha_init' must be a finite number in \[0.05, 0.95\], found 0.99"),
        ({"alpha_lr": -1.0}, "'alpha_lr' must be a finite number >= 0, found -1.0"),
        ({"alpha_halving": 0}, "'alpha_halving' must be an integer >= 1, found 0"),
        ({"heldout_samples": 0}, "'heldout_samples' must be an integer >= 1, found 0"),
        ({"heldout_fraction": 1.0}, r"'heldout_fraction' must be a finite number in \(0, 1\), found 1.0"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        em.create_balancer("lfm", make_toy_model(2), **options)


@pytest.mark.parametrize(
    "options", [{"weighting": "learnable", "alpha_lr": 10.0}, {"heads": "separate", "divergence": "official"}]
)
def test_the_other_paths_pass_the_contract_suite(options: dict) -> None:
    """The default options run in test_contract.py; the learnable weighting and separate heads here."""
    results = testing.check_balancer("lfm", options=options, modalities=(3,))
    assert results["aux_fusion"] is True
