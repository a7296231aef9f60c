"""AUG: the boosting loss and its residual labels against a literal re-enactment of the official code, the
classifier assignment (weak modality, check epochs, cap, window), the pre-allocated slots, resume, options."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from torch import nn

import equimodal as em
from equimodal.balancers.aug import check_interval, residual_targets, weakest_modality
from equimodal.testing import drive_step


def official_classifier(bal, m: str, z: torch.Tensor, active: int):
    """``AVGBShareClassifier.classfier`` of the official code, re-enacted step by step: the base embedding and
    every added layer go through the shared ``fc_out``; ``o_fea`` follows the loop's ``i < layerlen`` rule."""
    c = bal.classifiers
    feature = c.out(torch.relu(c.base[m](z)))
    o_fea, add_fea = feature, None
    layers = list(c.added[m])[:active]
    for i, layer in enumerate(layers, start=1):
        add_fea = c.out(torch.relu(layer(z)))
        feature = feature + add_fea
        if i < len(layers):
            o_fea = feature
    return feature, o_fea, add_fea


def official_loss(out, o_fea, add_fea, y_onehot: torch.Tensor) -> torch.Tensor:
    """The per-modality loss of ``train_audio_video``: soft-label ``nn.CrossEntropyLoss`` on one-hot labels."""
    criterion = nn.CrossEntropyLoss(reduction="none")
    if add_fea is None:
        return criterion(out, y_onehot).mean()
    kl = y_onehot * o_fea.detach().softmax(1)
    return (
        criterion(out, y_onehot).mean()
        + criterion(o_fea, y_onehot).mean()
        + criterion(add_fea, y_onehot).mean()
        - 0.5 * criterion(add_fea, kl).mean()
    )


def with_classifiers(bal, counts: dict[str, int]) -> None:
    bal.active_counts = dict(counts)
    bal._sync_trainable()


@pytest.mark.parametrize("counts", [(0, 0), (1, 0), (3, 2)])
def test_loss_and_gradients_equal_the_official_code(counts: tuple[int, int]) -> None:
    model = make_toy_model(2, num_classes=4)
    bal = em.create_balancer("aug", model, hidden_dim=6)
    bal.start_epoch(0)
    with_classifiers(bal, dict(zip(bal.modalities, counts, strict=True)))
    batch, y = make_toy_batch(2, num_classes=4)
    out = model(batch)
    ours = bal.loss(out, y)
    onehot = F.one_hot(y, 4).float()
    feats = {m: out.features[m] for m in bal.modalities}
    ref = sum(
        official_loss(*official_classifier(bal, m, feats[m], k), onehot)
        for m, k in zip(bal.modalities, counts, strict=True)
    )
    assert torch.allclose(ours, ref, atol=1e-6)
    params = list(bal.classifiers.parameters()) + list(model.encoders.parameters())
    trainable = [p for p in params if p.requires_grad]
    g_ours = torch.autograd.grad(ours, trainable, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(ref, trainable, allow_unused=True)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6)


def test_residual_labels_are_one_hot_minus_weighted_confidence() -> None:
    prev = torch.randn(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    r = residual_targets(y, prev, 0.5)
    p = prev.softmax(1)
    for i in range(5):
        for c in range(3):
            expected = 1 - 0.5 * p[i, c] if c == y[i] else 0.0
            assert torch.isclose(r[i, c], torch.as_tensor(expected))


def test_fused_prediction_is_the_weighted_sum_of_the_ensembles() -> None:
    model = make_toy_model(2, num_classes=3)
    bal = em.create_balancer("aug", model, fusion_weights=[0.4, 0.6])
    bal.start_epoch(0)
    with_classifiers(bal, {"m0": 2, "m1": 0})
    batch, _ = make_toy_batch(2)
    out = model(batch)
    a = official_classifier(bal, "m0", out.features["m0"], 2)[0]
    v = official_classifier(bal, "m1", out.features["m1"], 0)[0]
    assert torch.allclose(bal.predict(out), 0.4 * a + 0.6 * v, atol=1e-6)
    uni = bal.predict_unimodal(out)
    assert torch.allclose(uni["m0"], a) and torch.allclose(uni["m1"], v)


def official_choice(score_a: float, score_v: float, lam: float = 1.0) -> str | None:
    ratio_a = score_a / score_v
    if ratio_a > lam + 0.01:
        return "v"
    if ratio_a < lam - 0.01:
        return "a"
    return None


@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.98, 0.995, 1.0, 1.005, 1.0101, 1.02, 2.0])
def test_weak_modality_choice_equals_the_official_band(ratio: float) -> None:
    scores = torch.tensor([ratio * 10.0, 10.0])
    ours = weakest_modality(scores, 0.01)
    assert {None: None, 0: "a", 1: "v"}[ours] == official_choice(float(scores[0]), float(scores[1]))


def test_three_modalities_choose_the_lowest_against_the_highest() -> None:
    assert weakest_modality(torch.tensor([5.0, 3.0, 4.0]), 0.01) == 1
    assert weakest_modality(torch.tensor([5.0, 4.99, 4.98]), 0.01) is None


def run_epoch(bal, model, opt, epoch: int, steps: int = 3, seed: int = 0) -> None:
    bal.start_epoch(epoch)
    for s in range(steps):
        drive_step(bal, model, *make_toy_batch(len(bal.modalities), 16, seed=seed + 10 * epoch + s), opt)


def sgd(model, bal, wd: float = 0.0):
    return torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.05, momentum=0.9, weight_decay=wd)


def test_epoch_scores_are_the_summed_true_class_confidences() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("aug", model)
    opt = sgd(model, bal)
    bal.start_epoch(0)
    expected = torch.zeros(2)
    for s in range(3):
        batch, y = make_toy_batch(2, 16, seed=s)
        with torch.no_grad():
            out = model(batch)
            for j, m in enumerate(bal.modalities):
                f = bal.ensemble(out, m)[0]
                expected[j] += sum(F.softmax(f, 1)[i][y[i]] for i in range(16))
        drive_step(bal, model, batch, y, opt)
    assert torch.allclose(bal.score, expected, atol=1e-4) and float(bal.seen) == 48


def test_the_weak_modality_gets_classifiers_at_check_epochs_only() -> None:
    torch.manual_seed(0)
    model = make_toy_model(3)
    bal = em.create_balancer("aug", model, check_every=3)
    opt = sgd(model, bal)
    added = []
    for epoch in range(4):
        run_epoch(bal, model, opt, epoch)
        added.append(dict(bal.active_counts))
    scores_before = bal.score.clone()
    bal.start_epoch(4)  # epoch 3 is not a check epoch ((3 + 1) % 3 != 0)
    added.append(dict(bal.active_counts))
    total = [sum(c.values()) for c in added]
    # after epoch 0 (the first) and epoch 2 ((2 + 1) % 3 == 0): one classifier each; none after 1 and 3
    assert total == [0, 1, 1, 2, 2]
    assert torch.count_nonzero(scores_before) == 3 and float(bal.seen) == 0  # reset at the epoch start
    weak = bal.weak
    assert weak is not None and bal.active_counts[weak] >= 1
    drive_step(bal, model, *make_toy_batch(3, 16, seed=99), opt)
    stats = bal.stats()
    assert stats[f"weak/{weak}"] == 1.0 and sum(stats[f"weak/{m}"] for m in bal.modalities) == 1.0
    assert [stats[f"classifiers/{m}"] for m in bal.modalities] == [
        bal.active_counts[m] for m in bal.modalities
    ]
    for m in bal.modalities:  # a residual loss exactly where a classifier was added
        assert (stats[f"residual_loss/{m}"] > 0) == (bal.active_counts[m] > 0)


def test_weak_modality_of_the_toy_data_is_the_least_confident() -> None:
    torch.manual_seed(0)
    model = make_toy_model(2)
    bal = em.create_balancer("aug", model)
    opt = sgd(model, bal)
    run_epoch(bal, model, opt, 0, steps=4)
    scores = bal.score.clone()
    bal.start_epoch(1)
    lowest = bal.modalities[int(scores.argmin())]
    assert bal.weak == lowest and bal.active_counts == {m: int(m == lowest) for m in bal.modalities}


def test_nothing_is_added_outside_the_window_nor_beyond_the_cap() -> None:
    torch.manual_seed(0)
    model = make_toy_model(2)
    late = em.create_balancer("aug", model, start_epoch=2, max_classifiers=1)
    opt = sgd(model, late)
    for epoch in range(2):  # outside the window: joint training, no scores, no classifier
        run_epoch(late, model, opt, epoch)
        assert float(late.seen) == 0
    assert late.active_counts == {"m0": 0, "m1": 0}
    for epoch in range(2, 6):
        run_epoch(late, model, opt, epoch)
    late.start_epoch(6)
    assert all(c <= 1 for c in late.active_counts.values()) and sum(late.active_counts.values()) >= 1


def test_inactive_slots_never_move_and_frozen_slots_still_pass_gradient() -> None:
    for train_added in (True, False):
        torch.manual_seed(0)
        model = make_toy_model(2)
        bal = em.create_balancer("aug", model, train_added=train_added)
        opt = sgd(model, bal, wd=1e-2)
        bal.start_epoch(0)
        with_classifiers(bal, {"m0": 1, "m1": 0})
        before = [p.detach().clone() for p in bal.classifiers.added.parameters()]
        for s in range(3):
            opt.zero_grad(set_to_none=False)  # zeros, not None: weight decay would act on a held gradient
            batch, y = make_toy_batch(2, 16, seed=s)
            bal.loss(model(batch), y).backward()
            bal.before_step()
            opt.step()
        after = list(bal.classifiers.added.parameters())
        for (name, _), b, a in zip(bal.classifiers.added.named_parameters(), before, after, strict=True):
            moved = not torch.equal(a, b)
            assert moved == (train_added and name.startswith("m0.0.")), name
    # a frozen added classifier still reaches the encoder: m0's encoder gradient changes with it
    model = make_toy_model(2)
    bal = em.create_balancer("aug", model, train_added=False)
    bal.start_epoch(0)
    batch, y = make_toy_batch(2)
    grads = []
    for count in (0, 1):
        with_classifiers(bal, {"m0": count, "m1": 0})
        model.zero_grad(set_to_none=True)
        bal.loss(model(batch), y).backward()
        grads.append(next(model.encoders["m0"].parameters()).grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_state_round_trip_restores_classifiers_and_trainable_slots() -> None:
    torch.manual_seed(0)
    model = make_toy_model(2)
    bal = em.create_balancer("aug", model)
    opt = sgd(model, bal)
    run_epoch(bal, model, opt, 0)
    bal.start_epoch(1)
    run_epoch(bal, model, opt, 1, steps=1)
    buf = io.BytesIO()
    torch.save(bal.state_dict(), buf)
    buf.seek(0)
    fresh = em.create_balancer("aug", make_toy_model(2), seed=5)
    params = list(fresh.parameters())
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert all(a is b for a, b in zip(params, fresh.parameters(), strict=True))  # loaded in place
    assert fresh.active_counts == bal.active_counts and fresh.weak == bal.weak
    assert torch.equal(fresh.score, bal.score) and fresh.scored_epoch == 1
    assert [p.requires_grad for p in fresh.parameters()] == [p.requires_grad for p in bal.parameters()]
    fresh.start_epoch(1)  # resuming the same epoch adds nothing and keeps the scores
    assert fresh.active_counts == bal.active_counts and torch.equal(fresh.score, bal.score)


def test_check_interval_follows_the_official_rule() -> None:
    assert check_interval(None, 200) == 20 and check_interval(None, 10) == 1 and check_interval(None, 11) == 1
    assert check_interval(None, None) == 1 and check_interval(4, None) == 4
    model = make_toy_model(2)
    assert em.create_balancer("aug", model, epochs=200).check_every == 20


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_classifiers": 0}, ["max_classifiers", "found 0"]),
        ({"residual_weight": 1.5}, ["residual_weight", "found 1.5"]),
        ({"tolerance": -0.1}, ["tolerance", "found -0.1"]),
        ({"check_every": 0}, ["check_every", "found 0"]),
        ({"check_every": 2, "epochs": 100}, ["check_every", "epochs", "pass one"]),
        ({"fusion_weights": [1.0]}, ["fusion_weights", "2 non-negative", "found [1.0]"]),
        ({"train_added": "maybe"}, ["train_added", "true or false", "'maybe'"]),
    ],
)
def test_bad_options_raise_naming_the_option(options: dict, words: list[str]) -> None:
    with pytest.raises((ValueError, TypeError)) as err:
        em.create_balancer("aug", make_toy_model(2), **options)
    for w in words:
        assert w in str(err.value)


def test_missing_features_raise_a_clear_error() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("aug", model)
    bal.start_epoch(0)
    batch, y = make_toy_batch(2)
    out = model(batch)._replace(features=None)
    with pytest.raises(ValueError, match="features"):
        bal.loss(out, y)
