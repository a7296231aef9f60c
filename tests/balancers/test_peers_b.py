"""Method tests for MMPareto, G-Blending and MLA: each changes gradients/losses as its paper says."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import equimodal as em
from equimodal.balancers import EpochData
from equimodal.balancers.gblending import GradientBlending, blend_weights
from equimodal.balancers.mla import entropy_weights, owm_projector_update
from equimodal.balancers.mmpareto import pareto_weights

CPU = torch.device("cpu")


def epoch_data(m: int, n_train: int = 3, heldout: bool = True) -> EpochData:
    train = [make_toy_batch(m, seed=s) for s in range(n_train)]
    held = [make_toy_batch(m, seed=100)]
    return EpochData(train=lambda: train, heldout=(lambda: held) if heldout else None, device=CPU)


# ---------------------------------------------------------------------------------------- MMPareto
vectors = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(vectors, vectors)
def test_pareto_weights_match_min_norm_or_half(a: list[float], b: list[float]) -> None:
    g1, g2 = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    w = pareto_weights(g1, g2)
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    if float(g1 @ g2) > 0 or float(g1.norm()) == 0 or float(g2.norm()) == 0:
        assert torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64))
    else:  # the min-norm point of the segment: no grid point on [0, 1] is shorter
        grid = torch.linspace(0, 1, 201, dtype=torch.float64)[:, None]
        best = (grid * g1 + (1 - grid) * g2).norm(dim=1).min()
        assert float((w[0] * g1 + w[1] * g2).norm()) <= float(best) + 1e-9


def test_pareto_weights_conflicting_closed_form() -> None:
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 2.0])
    v11, v12, v22 = 1.0, -1.0, 5.0
    expected = (v22 - v12) / (v11 + v22 - 2 * v12)
    assert torch.allclose(pareto_weights(g1, g2), torch.tensor([expected, 1 - expected]))
    assert torch.allclose(pareto_weights(g1, 3 * g1), torch.tensor([0.5, 0.5]))


class NegatedUnimodal(nn.Module):
    """Concat model whose unimodal logits are the negated column-block terms: L_m conflicts with L_mm."""

    def __init__(self, m: int = 2, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoders = nn.ModuleDict({f"m{i}": nn.Linear(5 + i, 4) for i in range(m)})
        self.fc = nn.Linear(4 * m, classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> em.MultimodalOutput:
        z = {k: torch.tanh(e(batch[k])) for k, e in self.encoders.items()}
        terms = {k: z[k] @ self.fc.weight[:, 4 * i : 4 * i + 4].t() for i, k in enumerate(z)}
        fused = torch.stack(list(terms.values())).sum(0) + self.fc.bias
        return em.MultimodalOutput(fused, {k: -t for k, t in terms.items()}, z)


def expected_mmpareto_grads(
    model: nn.Module, batch: dict, y: torch.Tensor, gamma: float = 1.5, heads: em.Balancer | None = None
) -> dict:
    """MMPareto's update computed independently: separate grads, min-norm/half weights, per-tensor rescale.

    The unimodal logits are the model's, or those of ``heads`` (a balancer's separate heads) when given.
    """
    out = model(batch)
    l_mm = F.cross_entropy(out.logits, y)
    uni = out.unimodal_logits if heads is None else heads.unimodal_prediction(out)
    l_uni = {m: F.cross_entropy(uni[m], y) for m in model.encoders}
    params = dict(model.named_parameters())
    summed = torch.autograd.grad(l_mm + sum(l_uni.values()), list(params.values()), retain_graph=True)
    plain = dict(zip(params, summed, strict=True))
    expected = dict(plain)
    for m, enc in model.encoders.items():
        names = [f"encoders.{m}.{n}" for n, _ in enc.named_parameters()]
        a = torch.autograd.grad(l_mm, [params[n] for n in names], retain_graph=True)
        b = torch.autograd.grad(l_uni[m], [params[n] for n in names], retain_graph=True)
        fa, fb = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
        if F.cosine_similarity(fa, fb, dim=0) > 0:
            w1 = 0.5
        else:
            w1 = float((fb @ fb - fa @ fb) / ((fa - fb) @ (fa - fb)))
        for n, ga, gb in zip(names, a, b, strict=True):
            new = 2 * (w1 * ga + (1 - w1) * gb)
            ratio = float(plain[n].norm() / new.norm())
            expected[n] = gamma * new * (ratio if ratio > 1 else 1.0)
    return expected


def run_balancer(model: nn.Module, balancer: em.Balancer, batch: dict, y: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    balancer.set_epoch(balancer.epoch)  # a driver starts the epoch (needed by windowed balancers)
    balancer.loss(model(batch), y).backward()
    balancer.before_step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("model_fn", "heads"),
    [
        (lambda: NegatedUnimodal(2), "shared"),
        (lambda: make_toy_model(3), "shared"),
        (lambda: make_toy_model(3), "separate"),
    ],
    ids=["conflict-shared", "toy3-shared", "toy3-separate"],
)
def test_mmpareto_encoder_grad_equals_formula(model_fn, heads: str) -> None:
    model = model_fn()
    batch, y = make_toy_batch(len(model.encoders))
    bal = em.create_balancer("mmpareto", model, heads=heads)
    expected = expected_mmpareto_grads(model, batch, y, heads=bal if heads == "separate" else None)
    got = run_balancer(model, bal, batch, y)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-6, rtol=1e-4), n
    stats = bal.stats()
    if isinstance(model, NegatedUnimodal):  # the conflicting branch really ran
        assert all(stats[f"cos/{m}"] < 0 and stats[f"w_mm/{m}"] != 0.5 for m in model.encoders)
    else:
        assert all(stats[f"w_mm/{m}"] == 0.5 for m in model.encoders if stats[f"cos/{m}"] > 0)


def test_mmpareto_accumulation_and_loss_scaling_add_up() -> None:
    model = NegatedUnimodal(2)
    bal = em.create_balancer("mmpareto", model, heads="shared")
    batch, y = make_toy_batch(2, batch_size=16)
    big = run_balancer(model, bal, batch, y)
    model.zero_grad(set_to_none=True)
    for half in (slice(0, 8), slice(8, 16)):  # two micro-batches, each scaled like GradScaler then unscaled
        (bal.loss(model({k: v[half] for k, v in batch.items()}), y[half]) * 512.0).backward()
    for p in model.parameters():
        p.grad.div_(1024.0)
    bal.before_step()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, big[n], atol=1e-6, rtol=1e-4), n


def test_mmpareto_inactive_is_joint_training_and_shared_heads_reject_aux_fusion() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2)
    bal = em.create_balancer("mmpareto", model, start_epoch=1)
    got = run_balancer(model, bal, batch, y)
    plain = torch.autograd.grad(F.cross_entropy(model(batch).logits, y), list(model.parameters()))
    assert all(torch.allclose(g, got[n]) for (n, _), g in zip(model.named_parameters(), plain, strict=True))
    with pytest.raises(ValueError, match="auxiliary heads"):
        em.create_balancer("mmpareto", make_toy_model(2, fusion="film"), heads="shared")
    with pytest.raises(ValueError, match="gamma"):
        em.create_balancer("mmpareto", model, gamma=0.0)


# -------------------------------------------------------------------------------------- G-Blending
def test_blend_weights_from_hand_made_losses() -> None:
    train_s, held_s = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.2, 1.1, 1.3])
    train_e, held_e = torch.tensor([0.5, 0.8, 0.2]), torch.tensor([0.9, 1.0, 1.25])
    d_g = held_e - held_s
    d_o = (held_e - train_e) - (held_s - train_s)
    raw = (d_g / d_o**2).abs()
    assert torch.allclose(blend_weights(train_s, held_s, train_e, held_e), raw / raw.sum())
    mb = (held_e / (held_e - train_e) ** 2).abs()
    assert torch.allclose(blend_weights(train_s, held_s, train_e, held_e, "multibench"), mb / mb.sum())
    same = blend_weights(train_s, held_s, train_s, held_s)  # no gain anywhere: uniform
    assert torch.allclose(same, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("heads", ["separate", "shared"])
def test_gblending_loss_is_weighted_head_sum(num_modalities: int, heads: str) -> None:
    model = make_toy_model(num_modalities)
    bal = em.create_balancer("gblending", model, super_epoch_len=1, heads=heads)
    batch, y = make_toy_batch(num_modalities)
    bal.set_epoch(0)
    with pytest.raises(em.DriverError, match=r"prepare_epoch\(EpochData"):
        bal.loss(model(batch), y)
    bal.prepare_epoch(epoch_data(num_modalities))
    w = bal.weights
    assert (
        w is not None and w.shape == (num_modalities + 1,) and math.isclose(float(w.sum()), 1.0, rel_tol=1e-5)
    )
    out = model(batch)
    uni = bal.heads.logits(out) if heads == "separate" else out.unimodal_logits
    logits = [out.logits, *uni.values()]
    expected = sum(float(w[i]) * F.cross_entropy(h, y) for i, h in enumerate(logits))
    assert torch.allclose(bal.loss(out, y), expected)
    bal.set_epoch(1)  # not a recomputation epoch: same weights; a loss unlike plain CE
    bal.prepare_epoch(epoch_data(num_modalities))
    assert torch.equal(bal.weights, w)
    assert not torch.allclose(bal.loss(out, y), F.cross_entropy(out.logits, y))


def test_gblending_weights_follow_measured_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_toy_model(2)
    before = copy.deepcopy(model.state_dict())
    bal = em.create_balancer("gblending", model, super_epoch_len=1)
    seen: list[torch.Tensor] = []
    real = GradientBlending._losses

    def spy(self, m, heads, src, device):
        seen.append(real(self, m, heads, src, device))
        return seen[-1]

    monkeypatch.setattr(GradientBlending, "_losses", spy)
    bal.set_epoch(0)
    bal.prepare_epoch(epoch_data(2))
    start_t, start_h = seen[0], seen[1]
    end_t = torch.stack([seen[2 + 2 * i][i] for i in range(3)])
    end_h = torch.stack([seen[3 + 2 * i][i] for i in range(3)])
    assert torch.allclose(bal.weights, blend_weights(start_t, start_h, end_t, end_h))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # copies only


def test_gblending_unimodal_copy_trains_only_its_encoder() -> None:
    model = make_toy_model(3)
    bal = em.create_balancer("gblending", model, super_epoch_len=1)
    clone, heads = bal._train_copy(2, epoch_data(3))  # head 2 = modality m1
    changed = {
        m for m in model.encoders if not torch.equal(clone.encoders[m].fc.weight, model.encoders[m].fc.weight)
    }
    assert changed == {"m1"}
    moved = {
        m for m in model.encoders if not torch.equal(heads.linears[m].weight, bal.heads.linears[m].weight)
    }
    assert moved == {"m1"}  # of the copied heads, only m1's own trained (with its encoder)


def test_gblending_schedule_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(
        GradientBlending,
        "_train_copy",
        lambda self, h, d: (calls.append(self.epoch), (self.model, self.heads))[1],
    )
    for mode, expected in (("online", [0, 2, 4]), ("offline", [0])):
        calls.clear()
        bal = em.create_balancer("gblending", make_toy_model(2), mode=mode, super_epoch=2)
        for e in range(5):
            bal.set_epoch(e)
            bal.prepare_epoch(epoch_data(2, n_train=1))
        assert sorted(set(calls)) == expected and len(calls) == 3 * len(expected)
    bal = em.create_balancer("gblending", make_toy_model(2))
    bal.set_epoch(0)
    with pytest.raises(ValueError, match="held-out"):
        bal.prepare_epoch(epoch_data(2, heldout=False))
    with pytest.raises(ValueError, match="mode"):
        em.create_balancer("gblending", make_toy_model(2), mode="sometimes")
    with pytest.raises(ValueError, match="auxiliary heads"):
        em.create_balancer("gblending", make_toy_model(2, fusion="gated"), heads="shared")


def test_gblending_deterministic_and_state_round_trip() -> None:
    a = em.create_balancer("gblending", make_toy_model(2), super_epoch_len=1, seed=3)
    b = em.create_balancer("gblending", make_toy_model(2), super_epoch_len=1, seed=3)
    for bal in (a, b):
        bal.set_epoch(0)
        bal.prepare_epoch(epoch_data(2))
    assert torch.equal(a.weights, b.weights)
    c = em.create_balancer("gblending", make_toy_model(2))
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.weights, a.weights) and c.stats() == a.stats()


# --------------------------------------------------------------------------------------------- MLA
def test_owm_projector_update_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    P = torch.eye(4, dtype=torch.float64)
    for alpha in (0.1, 0.05):
        r = torch.randn(1, 4, generator=g, dtype=torch.float64)
        k = P @ r.T
        expected = P - k @ k.T / (alpha + float(r @ P @ r.T))
        expected = expected / expected.pow(2).sum().sqrt()
        P_new = owm_projector_update(P, r, alpha)
        assert torch.allclose(P_new, expected)
        P = P_new
    r = torch.randn(1, 4, generator=g, dtype=torch.float64)
    shrink = (owm_projector_update(P, r, 1e-4) @ r.T).norm() / (P @ r.T).norm()
    assert shrink < 0.05  # the update removes the direction of the new input


def replicate_mla(
    model: nn.Module,
    head: nn.Linear,
    batch: dict,
    y: torch.Tensor,
    lr: float,
    P: torch.Tensor,
    count: int,
    alpha: float,
    projection: bool,
) -> tuple[torch.Tensor, int]:
    """MLA's alternating step written out: per modality CE(head(z_m)), projected head grad, SGD step."""
    out = model(batch)
    for m in model.encoders:
        params = [*model.encoders[m].parameters(), head.weight, head.bias]
        grads = list(torch.autograd.grad(F.cross_entropy(head(out.features[m]), y), params))
        if projection and count > 0:
            r = out.features[m].detach().mean(0, keepdim=True)
            k = P @ r.T
            P = P - k @ k.T / (alpha + r @ k)
            P = P / P.norm()
            grads[-2] = grads[-2] @ P.T
        with torch.no_grad():
            for p, gr in zip(params, grads, strict=True):
                p -= lr * gr
        count += 1
    return P, count


@pytest.mark.parametrize("projection", [True, False])
def test_mla_alternating_steps_match_replica(projection: bool, num_modalities: int) -> None:
    model = make_toy_model(num_modalities)
    bal = em.create_balancer("mla", model, projection=projection, steps_per_epoch=4)
    ref_model, ref_head = copy.deepcopy(model), copy.deepcopy(bal.head)
    fused_before = model.fusion.fc.weight.clone()
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    steps = []
    real_step = opt.step
    opt.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]  # type: ignore[method-assign]
    P, count = torch.eye(8), 0
    bal.set_epoch(0)
    for i in range(2):
        batch, y = make_toy_batch(num_modalities, seed=i)
        loss = bal.train_step(batch, y, opt)
        assert torch.isfinite(loss)
        alpha = 0.1 ** (1 + i / 4)
        P, count = replicate_mla(ref_model, ref_head, batch, y, 0.1, P, count, alpha, projection)
    assert len(steps) == 2 * num_modalities  # one step per modality per batch
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n
    assert torch.allclose(bal.head.weight, ref_head.weight, atol=1e-6)
    assert torch.equal(model.fusion.fc.weight, fused_before)  # the model's own head is not MLA's
    if projection:
        assert torch.allclose(bal.P, P, atol=1e-6)


def test_mla_predict_entropy_and_fixed() -> None:
    model = make_toy_model(3)
    batch, _ = make_toy_batch(3)
    out = model(batch)
    dyn = em.create_balancer("mla", model)
    logits = [dyn.head(out.features[m]) for m in dyn.modalities]
    ent = torch.stack([-(F.softmax(o, 1) * F.log_softmax(o, 1)).sum(1) for o in logits])
    g = torch.exp(ent.max(0).values - ent)
    g = g / g.sum(0)
    assert torch.allclose(dyn.predict(out), sum(g[i, :, None] * o for i, o in enumerate(logits)), atol=1e-6)
    assert torch.allclose(entropy_weights(torch.stack(logits)), g, atol=1e-6)
    fixed = em.create_balancer("mla", model, inference="fixed", fusion_weights=[2, 1, 1])
    expected = 0.5 * logits[0] + 0.25 * logits[1] + 0.25 * logits[2]
    assert torch.allclose(fixed.predict(out), expected, atol=1e-6)
    late = em.create_balancer("mla", model, start_epoch=5)
    assert torch.equal(late.predict(out), out.logits)


def test_mla_inactive_step_is_joint_training() -> None:
    model, ref = make_toy_model(2), make_toy_model(2)
    bal = em.create_balancer("mla", model, start_epoch=1)
    batch, y = make_toy_batch(2)
    bal.set_epoch(0)
    bal.train_step(batch, y, torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.cross_entropy(ref(batch).logits, y).backward()
    opt.step()
    assert all(torch.allclose(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))


def test_mla_errors() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("mla", model)
    batch, y = make_toy_batch(2)
    with pytest.raises(em.DriverError, match=r"call balancer.train_step\(batch, labels, optimizer\)"):
        bal.loss(model(batch), y)
    with pytest.raises(em.DriverError, match=r"set_epoch\(epoch\)"):
        bal.train_step(batch, y, torch.optim.SGD(model.parameters(), lr=0.1))
    bal.set_epoch(0)
    with pytest.raises(em.DriverError, match="balancer.parameters"):
        bal.train_step(batch, y, torch.optim.SGD(model.parameters(), lr=0.1))
    encoders = {"a": nn.Linear(3, 4), "b": nn.Linear(3, 5)}
    uneven = em.MultimodalClassifier(encoders, 3, feature_dims={"a": 4, "b": 5})
    with pytest.raises(ValueError, match="same feature"):
        em.create_balancer("mla", uneven, pad_features=False)
    padded = em.create_balancer("mla", uneven, pad_features=True)
    assert padded.head.in_features == 5
    opt = torch.optim.SGD([*uneven.parameters(), *padded.parameters()], lr=0.1)
    x = {"a": torch.randn(6, 3), "b": torch.randn(6, 3)}
    padded.set_epoch(0)
    assert torch.isfinite(padded.train_step(x, torch.tensor([0, 1, 2, 0, 1, 2]), opt))
    assert padded.predict(uneven(x)).shape == (6, 3)
    with pytest.raises(ValueError, match="fusion_weights"):
        em.create_balancer("mla", model, inference="fixed", fusion_weights=[1.0])


def test_mla_state_round_trip_and_determinism() -> None:
    def trained(seed: int) -> tuple[nn.Module, em.Balancer, torch.optim.Optimizer]:
        model = make_toy_model(2)
        bal = em.create_balancer("mla", model, seed=seed)
        opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
        bal.set_epoch(0)
        for s in range(2):
            bal.train_step(*make_toy_batch(2, seed=s), opt)
        return model, bal, opt

    model_a, a, opt_a = trained(1)
    model_b, b, _ = trained(1)
    assert torch.equal(a.P, b.P) and torch.equal(a.head.weight, b.head.weight)
    model_c = copy.deepcopy(model_a)
    c = em.create_balancer("mla", model_c, seed=9)
    c.load_state_dict(a.state_dict())
    opt_c = torch.optim.SGD([*model_c.parameters(), *c.parameters()], lr=0.1)
    batch, y = make_toy_batch(2, seed=5)
    a.train_step(batch, y, opt_a)
    c.train_step(batch, y, opt_c)
    assert torch.allclose(a.P, c.P) and torch.allclose(a.head.weight, c.head.weight)
    assert a.state_dict()["num_updates"] == c.state_dict()["num_updates"] == 6
