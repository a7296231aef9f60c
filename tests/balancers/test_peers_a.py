"""Method tests for OGM/OGM-GE, AGM, PMR, unimodal and MSLR: each changes gradients or losses as its paper says.

Expected values are computed here from the formulas (never stored floats).
"""

from __future__ import annotations

import copy
import math
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import equimodal as em
from equimodal.balancers import Balancer, EpochData
from equimodal.balancers.agm import agm_coefficients, shapley_responses
from equimodal.balancers.mslr import accuracy_ratio
from equimodal.balancers.ogm import ogm_coefficients, score_ratios
from equimodal.balancers.pmr import update_prototypes
from equimodal.types import MultimodalOutput

Grads = dict[str, Tensor]


def step_grads(
    balancer: Balancer, model: nn.Module, inputs: dict[str, Tensor], y: Tensor, **kw: object
) -> Grads:
    model.zero_grad(set_to_none=True)
    balancer.set_epoch(balancer.epoch)  # a driver starts the epoch (needed by windowed balancers)
    balancer.loss(model(inputs), y, **kw).backward()
    balancer.before_step()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def joint_grads(model: nn.Module, batch: dict[str, Tensor], y: Tensor) -> Grads:
    return step_grads(em.create_balancer("none", model), model, batch, y)


def true_class_prob_sums(model: nn.Module, batch: dict[str, Tensor], y: Tensor) -> list[float]:
    with torch.no_grad():
        out = model(batch)
    return [float(F.softmax(o, 1)[torch.arange(len(y)), y].sum()) for o in out.unimodal_logits.values()]


def is_weight(name: str, grad: Tensor) -> bool:
    return name.startswith("encoders.") and grad.dim() >= 2


# ---------------------------------------------------------------------------------------------- OGM
@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=2, max_size=2), st.floats(0.01, 2.0))
def test_ogm_two_modalities_slow_exactly_the_stronger(scores: list[float], alpha: float) -> None:
    s = torch.tensor(scores, dtype=torch.float64)
    for ref in ("mean", "min", "sum", "max"):
        rho = score_ratios(s, ref)
        torch.testing.assert_close(rho, torch.stack([s[0] / s[1], s[1] / s[0]]))
        k = ogm_coefficients(rho, alpha)
        assert bool(((k >= 0) & (k <= 1)).all())  # 1 - tanh(x) underflows to 0 for large x
        strong = int(s.argmax())
        if s[0] != s[1]:
            # 1 - tanh(x) cancels for large x: torch's and math's tanh may differ by an ulp of 1 there
            expected = 1 - math.tanh(alpha * float(rho[strong]))
            assert math.isclose(float(k[strong]), expected, rel_tol=1e-12, abs_tol=4e-16)
            assert float(k[1 - strong]) == 1.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=3, max_size=5))
def test_ogm_max_reference_slows_at_most_the_leader(scores: list[float]) -> None:
    rho = score_ratios(torch.tensor(scores, dtype=torch.float64), "max")
    assert int((rho > 1).sum()) <= 1


def test_ogm_scales_dominant_encoder_weights_by_one_minus_tanh() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 32)
    ref = joint_grads(copy.deepcopy(model), batch, y)
    s = true_class_prob_sums(model, batch, y)
    grads = step_grads(em.create_balancer("ogm", model, alpha=0.5), model, batch, y)
    dom = 0 if s[0] > s[1] else 1
    k = 1 - math.tanh(0.5 * s[dom] / s[1 - dom])
    changed = 0
    for n, g in grads.items():
        if n.startswith(f"encoders.m{dom}.") and g.dim() >= 2:
            torch.testing.assert_close(g, ref[n] * k)
            changed += 1
        else:  # the weaker encoder, biases and the head are untouched
            torch.testing.assert_close(g, ref[n], rtol=0, atol=0)
    assert changed == 2 and k < 1


def test_ogm_three_modalities_mean_reference() -> None:
    model = make_toy_model(3)
    batch, y = make_toy_batch(3, 32)
    ref = joint_grads(copy.deepcopy(model), batch, y)
    s = true_class_prob_sums(model, batch, y)
    balancer = em.create_balancer("ogm", model, alpha=0.3)
    grads = step_grads(balancer, model, batch, y)
    for i in range(3):
        rho = s[i] / ((sum(s) - s[i]) / 2)
        k = 1 - math.tanh(0.3 * rho) if rho > 1 else 1.0
        assert balancer.stats()[f"k/m{i}"] == pytest.approx(k, rel=1e-5)
        for n, g in grads.items():
            if n.startswith(f"encoders.m{i}.") and g.dim() >= 2:
                torch.testing.assert_close(g, ref[n] * k)


def test_ogm_micro_batches_equal_one_big_batch() -> None:
    model = make_toy_model(2)
    twin = copy.deepcopy(model)
    batch, y = make_toy_batch(2, 32)
    big = em.create_balancer("ogm", model)
    g_big = step_grads(big, model, batch, y)
    small = em.create_balancer("ogm", twin)
    small.set_epoch(0)
    for half in (slice(0, 16), slice(16, 32)):
        (small.loss(twin({k: v[half] for k, v in batch.items()}), y[half]) / 2).backward()
    small.before_step()
    assert small.stats() == pytest.approx(big.stats())
    for n, p in twin.named_parameters():
        torch.testing.assert_close(p.grad, g_big[n])


def test_ogm_ge_adds_seeded_noise_with_the_gradient_std() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 32)
    ref = joint_grads(copy.deepcopy(model), batch, y)
    runs = []
    for seed in (3, 3, 4):
        twin = copy.deepcopy(model)
        balancer = em.create_balancer("ogm_ge", twin, alpha=0.5, seed=seed)
        runs.append((step_grads(balancer, twin, batch, y), balancer.stats()))
    (grads, stats), (again, _), (other, _) = runs
    z = []
    for n, g in grads.items():
        if not is_weight(n, g):
            torch.testing.assert_close(g, ref[n], rtol=0, atol=0)  # biases and head: no noise
            continue
        k = stats[f"k/{n.split('.')[1]}"]
        noise = g - ref[n] * k
        assert bool((noise != 0).all()), f"{n}: every modality's weights get noise, dominant or not"
        z.append((noise / (ref[n].std() + 1e-8)).flatten())
        assert torch.equal(g, again[n]) and not torch.equal(g, other[n])
    zs = torch.cat(z)
    assert abs(float(zs.mean())) < 0.2 and 0.8 < float(zs.std()) < 1.2


def test_ogm_outside_window_is_joint_training() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 32)
    ref = joint_grads(copy.deepcopy(model), batch, y)
    balancer = em.create_balancer("ogm_ge", model, start_epoch=1, end_epoch=2)
    for epoch in (0, 3):
        balancer.set_epoch(epoch)
        grads = step_grads(balancer, model, batch, y)
        for n, g in grads.items():
            torch.testing.assert_close(g, ref[n], rtol=0, atol=0)


def test_ogm_conv_mode_touches_only_conv_weights() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 32)
    ref = joint_grads(copy.deepcopy(model), batch, y)
    grads = step_grads(em.create_balancer("ogm", model, modulate="conv"), model, batch, y)
    diff = {n for n, g in grads.items() if not torch.equal(g, ref[n])}
    assert len(diff) == 1 and diff.pop().endswith("conv.weight")


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 8)
        self.out_dim = 8

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc(x))


def test_ogm_conv_mode_refuses_encoders_without_convolutions() -> None:
    model = em.MultimodalClassifier({"a": MLP(5), "b": MLP(6)}, 3)
    with pytest.raises(ValueError, match="modulate='weights'"):
        em.create_balancer("ogm", model, modulate="conv")
    with pytest.raises(ValueError, match="reference.? must be one of"):
        em.create_balancer("ogm", model, reference="median")
    with pytest.raises(ValueError, match="'alpha' must be"):
        em.create_balancer("ogm", model, alpha=-1.0)


# ---------------------------------------------------------------------------------------------- AGM
def test_shapley_two_modalities_matches_the_reference_formula() -> None:
    g = torch.Generator().manual_seed(0)
    f = {frozenset(s): torch.randn(4, 3, generator=g) for s in (["a"], ["v"], ["a", "v"])}
    phi = shapley_responses(f, ["a", "v"])
    av, a, v = f[frozenset(["a", "v"])], f[frozenset(["a"])], f[frozenset(["v"])]
    torch.testing.assert_close(phi["a"], 0.5 * (av - v + a))
    torch.testing.assert_close(phi["v"], 0.5 * (av - a + v))


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(0, 1000))
def test_shapley_efficiency_and_dummy(num: int, seed: int) -> None:
    names = [f"m{i}" for i in range(num)]
    g = torch.Generator().manual_seed(seed)
    h = {
        frozenset(c): torch.randn(2, 3, generator=g)
        for r in range(1, num)
        for c in combinations(names[1:], r)
    }
    # m0 is a dummy player: f(S) ignores it (and the empty coalition is zero)
    f = {
        frozenset(c): h.get(frozenset(c) - {"m0"}, torch.zeros(2, 3))
        for r in range(1, num + 1)
        for c in combinations(names, r)
    }
    phi = shapley_responses(f, names)
    torch.testing.assert_close(sum(phi.values()), f[frozenset(names)])
    torch.testing.assert_close(phi["m0"], torch.zeros(2, 3))


def test_agm_coefficients_two_modalities_by_hand() -> None:
    s_a, s_v, bar_a, bar_v, alpha = 0.5, 1.0, 0.7, 0.8, 0.3
    r, rbar, k = agm_coefficients(torch.tensor([s_a, s_v]), torch.tensor([bar_a, bar_v]), alpha)
    # reference code: ratio_a = exp(s_v - s_a), optimal_a = exp(bar_v - bar_a), k = exp(alpha*min(gap, 10))
    assert float(r[0]) == pytest.approx(math.exp(s_v - s_a))
    assert float(rbar[1]) == pytest.approx(math.exp(bar_a - bar_v))
    assert float(k[0]) == pytest.approx(math.exp(alpha * (math.exp(bar_v - bar_a) - math.exp(s_v - s_a))))
    assert float(k[1]) == pytest.approx(math.exp(alpha * (math.exp(bar_a - bar_v) - math.exp(s_a - s_v))))
    _, _, capped = agm_coefficients(torch.tensor([5.0, 5.0]), torch.tensor([0.0, 10.0]), alpha)
    assert float(capped[0]) == pytest.approx(math.exp(alpha * 10.0))
    _, _, seven = agm_coefficients(torch.tensor([5.0, 5.0]), torch.tensor([0.0, 10.0]), alpha, 7.0)
    assert float(seven[0]) == pytest.approx(math.exp(alpha * 7.0))
    # gap exp(3) - 1 > 10: capped by default, not with max_gap=None
    _, _, uncapped = agm_coefficients(torch.tensor([5.0, 5.0]), torch.tensor([0.0, 3.0]), alpha, None)
    assert float(uncapped[0]) == pytest.approx(math.exp(alpha * (math.exp(3.0) - 1.0)), rel=1e-5)


def agm_scores_by_hand(model: nn.Module, batch: dict[str, Tensor], y: Tensor) -> list[float]:
    with torch.no_grad():
        full = model(batch).logits
        only_a = model({"m0": batch["m0"], "m1": torch.zeros_like(batch["m1"])}).logits
        only_v = model({"m0": torch.zeros_like(batch["m0"]), "m1": batch["m1"]}).logits
    phi = [0.5 * (full - only_v + only_a), 0.5 * (full - only_a + only_v)]
    return [
        float((-F.log_softmax(o, 1)[torch.arange(len(y)), y]).clamp_max(-math.log(1e-8)).mean()) for o in phi
    ]


def test_agm_scales_encoder_and_head_grads_by_hand_computed_coefficients() -> None:
    model = make_toy_model(2)
    alpha = 0.4
    balancer = em.create_balancer("agm", model, alpha=alpha, clip=None)
    d0 = model.encoders["m0"].out_dim
    running = [0.0, 0.0]
    for step, seed in enumerate((0, 1)):
        batch, y = make_toy_batch(2, 32, seed=seed)
        ref = joint_grads(copy.deepcopy(model), batch, y)
        s = agm_scores_by_hand(model, batch, y)
        grads = step_grads(balancer, model, batch, y, batch=batch)
        k = [
            math.exp(alpha * min(math.exp(running[1 - i] - running[i]) - math.exp(s[1 - i] - s[i]), 10.0))
            for i in range(2)
        ]
        for i in range(2):
            assert balancer.stats()[f"k/m{i}"] == pytest.approx(k[i], rel=1e-5)
        for n, g in grads.items():
            if n.startswith("encoders."):
                torch.testing.assert_close(g, ref[n] * k[int(n.split(".")[1][1])])
        # the authors' hooks on each modality's response also scale its head columns and bias share
        w = "fusion.fc.weight"
        torch.testing.assert_close(grads[w][:, :d0], ref[w][:, :d0] * k[0])
        torch.testing.assert_close(grads[w][:, d0:], ref[w][:, d0:] * k[1])
        torch.testing.assert_close(grads["fusion.fc.bias"], ref["fusion.fc.bias"] * (k[0] + k[1]) / 2)
        running = [(running[i] * step + s[i]) / (step + 1) for i in range(2)]
        torch.testing.assert_close(balancer.running, torch.tensor(running, dtype=torch.float64))


def test_agm_needs_the_batch_and_costs_two_pow_m_minus_two_forwards() -> None:
    model = make_toy_model(3)
    batch, y = make_toy_batch(3, 8)
    balancer = em.create_balancer("agm", model)
    with pytest.raises(em.DriverError, match="batch=batch"):
        balancer.loss(model(batch), y)
    calls = []
    model.fusion.register_forward_hook(lambda *_: calls.append(1))
    out = model(batch)
    balancer.loss(out, y, batch=batch)
    assert len(calls) == 1 + (2**3 - 2) and model.training
    late = em.create_balancer("agm", model, start_epoch=2)
    late.set_epoch(0)
    calls.clear()
    late.loss(model(batch), y, batch=batch)
    assert len(calls) == 1  # no extra passes outside the window


def test_agm_conditional_clip() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 32)
    balancer = em.create_balancer("agm", model, clip=1e-3)
    step_grads(balancer, model, batch, y, batch=batch)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(norm) == pytest.approx(1e-3, rel=1e-3)


# ---------------------------------------------------------------------------------------------- PMR
def toy_epoch_data(num: int) -> EpochData:
    train = [make_toy_batch(num, 16, seed=21), make_toy_batch(num, 16, seed=22)]
    return EpochData(train=lambda: iter(train), heldout=None, device=torch.device("cpu"))


def class_means(model: nn.Module, data: EpochData, modality: str, num_classes: int = 3) -> Tensor:
    with torch.no_grad():
        pairs = [(model(b).features[modality], y) for b, y in data.train()]
    feats, ys = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    return torch.stack([feats[ys == c].mean(0) for c in range(num_classes)])


def test_pmr_prototypes_are_class_means_with_ema() -> None:
    model = make_toy_model(2)
    data = toy_epoch_data(2)
    balancer = em.create_balancer("pmr", model, momentum=0.3)
    balancer.set_epoch(0)
    balancer.prepare_epoch(data)
    old = {m: class_means(model, data, m) for m in ("m0", "m1")}
    for m in old:
        torch.testing.assert_close(balancer.prototypes[m], old[m])
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.mul_(1.5)
    balancer.set_epoch(1)
    balancer.prepare_epoch(data)
    for m in old:
        torch.testing.assert_close(balancer.prototypes[m], 0.7 * class_means(model, data, m) + 0.3 * old[m])


def test_update_prototypes_keeps_absent_classes() -> None:
    sums, counts = torch.tensor([[2.0, 4.0], [0.0, 0.0]]), torch.tensor([2.0, 0.0])
    first = update_prototypes(sums, counts, None, 0.5)
    torch.testing.assert_close(first, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    old = torch.tensor([[3.0, 3.0], [7.0, 8.0]])
    torch.testing.assert_close(
        update_prototypes(sums, counts, old, 0.5), torch.tensor([[2.0, 2.5], [7.0, 8.0]])
    )


@pytest.mark.parametrize("num", [2, 3])
def test_pmr_adds_prototype_ce_only_for_weak_modalities(num: int) -> None:
    model = make_toy_model(num)
    batch, y = make_toy_batch(num, 32)
    ref = joint_grads(copy.deepcopy(model), batch, y)
    balancer = em.create_balancer("pmr", model, alpha=2.0)
    balancer.set_epoch(0)
    balancer.prepare_epoch(toy_epoch_data(num))
    names = [f"m{i}" for i in range(num)]
    out = model(batch)
    logits = {m: -torch.cdist(out.features[m], balancer.prototypes[m]) for m in names}
    s = [float(F.softmax(logits[m].detach(), 1)[torch.arange(len(y)), y].sum()) for m in names]
    weak = [s[i] < (sum(s) - s[i]) / (num - 1) for i in range(num)]
    assert any(weak) and not all(weak)
    expected = F.cross_entropy(out.logits, y) + 2.0 * sum(
        F.cross_entropy(logits[m], y) for m, w in zip(names, weak, strict=True) if w
    )
    loss = balancer.loss(out, y)
    torch.testing.assert_close(loss, expected)
    model.zero_grad()
    loss.backward()
    for i, m in enumerate(names):
        enc = {n: p.grad for n, p in model.named_parameters() if n.startswith(f"encoders.{m}.")}
        same = all(torch.allclose(g, ref[n]) for n, g in enc.items())
        assert same != weak[i], f"{m}: weak={weak[i]} but its encoder gradient same-as-joint={same}"
        assert balancer.stats()[f"weak/{m}"] == float(weak[i])


def test_pmr_errors() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 8)
    balancer = em.create_balancer("pmr", model)
    with pytest.raises(em.DriverError, match=r"set_epoch\(epoch\)"):
        balancer.loss(model(batch), y)
    balancer.set_epoch(0)
    with pytest.raises(
        em.DriverError, match=r"epoch data at each epoch start: call balancer.start_epoch\(epoch, Epo"
    ):
        balancer.loss(model(batch), y)
    balancer.prepare_epoch(toy_epoch_data(2))
    out = model(batch)
    with pytest.raises(ValueError, match="features"):
        balancer.loss(MultimodalOutput(out.logits, out.unimodal_logits, None), y)
    with pytest.raises(ValueError, match="momentum"):
        em.create_balancer("pmr", model, momentum=1.0)


# ----------------------------------------------------------------------------------------- unimodal
@pytest.mark.parametrize("fusion", ["concat", "sum", "film"])
def test_unimodal_trains_only_its_modality(fusion: str) -> None:
    model = make_toy_model(3, fusion=fusion)
    batch, y = make_toy_batch(3, 16)
    balancer = em.create_balancer("unimodal", model, modality="m1")
    out = model(batch)
    loss = balancer.loss(out, y)
    torch.testing.assert_close(loss, F.cross_entropy(out.unimodal_logits["m1"], y))
    loss.backward()
    for m in ("m0", "m1", "m2"):
        grads = [p.grad for p in model.encoders[m].parameters()]
        if m == "m1":
            assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)
        else:
            assert all(g is None for g in grads), f"encoder {m} must stay gradient-free"
    assert torch.equal(balancer.predict(out), out.unimodal_logits["m1"])


def test_unimodal_errors() -> None:
    model = make_toy_model(2)
    with pytest.raises(ValueError, match="modality="):
        em.create_balancer("unimodal", model)
    with pytest.raises(ValueError, match="Valid modality names: m0, m1"):
        em.create_balancer("unimodal", model, modality="audio")


# --------------------------------------------------------------------------------------------- MSLR
def test_mslr_keep_scales_encoder_and_head_block() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 16)
    ref = joint_grads(copy.deepcopy(model), batch, y)
    scales = {"m0": 2.0, "m1": 0.5}
    balancer = em.create_balancer("mslr", model, scales=scales, mode="keep", warmup_epochs=0)
    grads = step_grads(balancer, model, batch, y)
    for n, g in grads.items():
        if n.startswith("encoders."):
            torch.testing.assert_close(g, ref[n] * scales[n.split(".")[1]])
    d0 = model.encoders["m0"].out_dim
    head = "fusion.fc.weight"
    torch.testing.assert_close(grads[head][:, :d0], ref[head][:, :d0] * 2.0)
    torch.testing.assert_close(grads[head][:, d0:], ref[head][:, d0:] * 0.5)
    torch.testing.assert_close(grads["fusion.fc.bias"], ref["fusion.fc.bias"] * (2.0 + 0.5) / 2)


def test_accuracy_ratio() -> None:
    assert accuracy_ratio([0.4, 0.6], 0.75) == pytest.approx(0.75 / 0.5)
    assert accuracy_ratio([], 0.3) == 1.0 and accuracy_ratio([0.0], 0.3) == 1.0


def unimodal_accuracy(model: nn.Module, batch: dict[str, Tensor], y: Tensor, m: str) -> float:
    with torch.no_grad():
        return float((model(batch).unimodal_logits[m].argmax(1) == y).double().mean())


def test_mslr_dynamic_follows_heldout_accuracy() -> None:
    model = make_toy_model(2)
    held = make_toy_batch(2, 64, seed=30)
    data = EpochData(train=lambda: iter([]), heldout=lambda: iter([held]), device=torch.device("cpu"))
    balancer = em.create_balancer("mslr", model, scales={"m0": 1.3, "m1": 0.7}, window=2, warmup_epochs=2)
    balancer.set_epoch(0)
    balancer.prepare_epoch(data)
    assert balancer.memory == {"m0": [], "m1": []}  # untrained model: nothing measured
    balancer.num_steps = 1
    history: dict[str, list[float]] = {"m0": [], "m1": []}
    for epoch in range(5):
        with torch.no_grad():  # a different model each epoch, so accuracies move
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(epoch)))
        balancer.set_epoch(epoch)
        balancer.prepare_epoch(data)
        for m, init in (("m0", 1.3), ("m1", 0.7)):
            acc = unimodal_accuracy(model, *held, m)
            past = history[m][-2:]
            fused = epoch >= 2  # after the warm start, from the first stored accuracy on
            expected = init * acc / (sum(past) / len(past)) if fused and past else init
            assert balancer.scales[m] == pytest.approx(expected)
            history[m].append(acc)
        assert balancer.memory["m0"] == pytest.approx(history["m0"][-2:])
    with pytest.raises(ValueError, match="heldout"):
        balancer.prepare_epoch(EpochData(train=lambda: iter([]), heldout=None, device=torch.device("cpu")))


def test_mslr_rejects_bad_scales() -> None:
    model = make_toy_model(2)
    with pytest.raises(ValueError, match="unknown modality"):
        em.create_balancer("mslr", model, scales={"audio": 1.0})
    with pytest.raises(ValueError, match="positive"):
        em.create_balancer("mslr", model, scales={"m0": 0.0})
    with pytest.raises(ValueError, match="warmup_epochs"):
        em.create_balancer("mslr", model, warmup_epochs=-1)
