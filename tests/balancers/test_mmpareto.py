"""MMPareto's separate unimodal heads (the reference layout), its conflict statistic and its fusion coverage."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from torch import nn

import equimodal as em
from equimodal.testing import drive_step, optimizer_for, snapshot


def test_separate_heads_by_default_in_parameters_and_state() -> None:
    model = make_toy_model(3, num_classes=4)
    bal = em.create_balancer("mmpareto", model)
    assert bal.heads_mode == "separate" and bal.requirements.parameters
    params = list(bal.parameters())
    assert len(params) == 6  # weight and bias per modality
    assert {(m, tuple(bal.heads.linears[m].weight.shape)) for m in bal.modalities} == {
        (m, (4, 8)) for m in bal.modalities
    }
    own = {id(p) for p in model.parameters()}
    assert not any(id(p) in own for p in params)  # the heads are the balancer's, not the model's
    state = bal.state_dict()
    assert set(state["heads"]) == {f"{m}.{k}" for m in bal.modalities for k in ("weight", "bias")}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = em.create_balancer("mmpareto", make_toy_model(3, num_classes=4), seed=9)
    before = list(fresh.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, params, strict=True))  # another seed
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    after = list(fresh.parameters())
    assert all(
        a is b for a, b in zip(before, after, strict=True)
    )  # loaded in place: the optimizer keeps them
    assert all(torch.equal(a, b) for a, b in zip(after, params, strict=True))


def test_unimodal_losses_come_from_the_separate_heads() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("mmpareto", model)
    batch, y = make_toy_batch(2)
    out = model(batch)
    heads = {m: bal.heads.linears[m](out.features[m]) for m in bal.modalities}
    expected = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(h, y) for h in heads.values())
    assert torch.allclose(bal.loss(out, y), expected)
    uni = bal.predict_unimodal(out)  # reported per-modality accuracy comes from the heads while active
    assert all(torch.allclose(uni[m], heads[m]) for m in bal.modalities)
    late = em.create_balancer("mmpareto", model, start_epoch=3)
    late.set_epoch(0)
    assert late.predict_unimodal(out) is out.unimodal_logits  # outside the window: the model's


def test_one_step_trains_the_heads_and_the_fused_head_by_l_mm_alone() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("mmpareto", model)
    batch, y = make_toy_batch(2)
    ref = copy.deepcopy(model)
    fused_only = torch.autograd.grad(F.cross_entropy(ref(batch).logits, y), ref.fusion.fc.weight)[0]
    before = snapshot(model, bal)
    grads = drive_step(bal, model, batch, y, optimizer_for(model, bal))
    after = snapshot(model, bal)
    assert all(not torch.equal(before[f"balancer.{i}"], after[f"balancer.{i}"]) for i in range(4))
    # With the shared variant L_m would add to the fused head's columns; with separate heads it does not.
    assert torch.allclose(grads["fusion.fc.weight"], fused_only, atol=1e-7)


def negate_fused_blocks(model: nn.Module, bal: em.Balancer) -> None:
    """Set each separate head to minus the modality's concat block: ``head_m(z_m) = -(W_m z_m + b/M)``."""
    blocks = model.fusion.modality_blocks()
    with torch.no_grad():
        for m in bal.modalities:
            weight, cols = blocks[m]
            bal.heads.linears[m].weight.copy_(-weight[:, cols])
            bal.heads.linears[m].bias.copy_(-model.fusion.fc.bias / len(bal.modalities))


def test_pareto_branch_fires_on_conflicting_heads_and_reports_it() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("mmpareto", model)
    negate_fused_blocks(model, bal)
    batch, y = make_toy_batch(2)
    out = model(batch)
    l_mm = F.cross_entropy(out.logits, y)
    uni = bal.heads.logits(out)
    expected = {}
    for m in bal.modalities:
        params = list(model.encoders[m].parameters())
        g_mm = torch.cat([g.flatten() for g in torch.autograd.grad(l_mm, params, retain_graph=True)])
        g_m = torch.cat(
            [g.flatten() for g in torch.autograd.grad(F.cross_entropy(uni[m], y), params, retain_graph=True)]
        )
        cos = F.cosine_similarity(g_mm, g_m, dim=0)
        w = (g_m @ g_m - g_mm @ g_m) / ((g_mm - g_m) @ (g_mm - g_m))
        expected[m] = (float(cos), float(w))
    assert all(cos < 0 for cos, _ in expected.values())  # the construction conflicts
    model.zero_grad(set_to_none=True)
    bal.loss(model(batch), y).backward()
    bal.before_step()
    stats = bal.stats()
    for m, (cos, w) in expected.items():
        assert stats[f"conflict/{m}"] == 1.0
        assert stats[f"cos/{m}"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
        assert stats[f"w_mm/{m}"] == pytest.approx(w, rel=1e-4) and stats[f"w_mm/{m}"] != 0.5


def test_conflict_stat_is_zero_when_the_gradients_agree() -> None:
    model = make_toy_model(3)
    bal = em.create_balancer("mmpareto", model)
    batch, y = make_toy_batch(3)
    drive_step(bal, model, batch, y, optimizer_for(model, bal))
    stats = bal.stats()
    assert set(stats) == {f"{k}/{m}" for k in ("cos", "w_mm", "conflict") for m in bal.modalities}
    for m in bal.modalities:
        assert stats[f"conflict/{m}"] == float(stats[f"cos/{m}"] <= 0)
        assert (stats[f"w_mm/{m}"] == 0.5) == (stats[f"conflict/{m}"] == 0.0)


@pytest.mark.parametrize("fusion", ["film", "gated", "attention"])
def test_auxiliary_head_fusions_train_through_the_separate_heads(fusion: str) -> None:
    model = make_toy_model(2, fusion=fusion)
    twin = copy.deepcopy(model)
    bal = em.create_balancer("mmpareto", model)
    opt = optimizer_for(model, bal)
    for seed in range(3):
        batch, y = make_toy_batch(2, seed=seed)
        grads = drive_step(bal, model, batch, y, opt)
        assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    stats = bal.stats()
    assert all(torch.isfinite(torch.tensor(stats[f"cos/{m}"])) for m in bal.modalities)
    # The unimodal losses reached the encoders: the update differs from plain joint training.
    joint = em.create_balancer("none", twin)
    opt_twin = optimizer_for(twin, joint)
    for seed in range(3):
        drive_step(joint, twin, *make_toy_batch(2, seed=seed), opt_twin)
    enc = "encoders.m0.fc.weight"
    assert not torch.allclose(dict(model.named_parameters())[enc], dict(twin.named_parameters())[enc])


def test_shared_heads_reproduce_the_fusion_head_variant() -> None:
    model = make_toy_model(2, fusion="sum")
    bal = em.create_balancer("mmpareto", model, heads="shared")
    assert bal.heads is None and list(bal.parameters()) == [] and not bal.requirements.parameters
    batch, y = make_toy_batch(2)
    out = model(batch)
    expected = F.cross_entropy(out.logits, y) + sum(
        F.cross_entropy(v, y) for v in out.unimodal_logits.values()
    )
    assert torch.allclose(bal.loss(out, y), expected)
    assert bal.predict_unimodal(out) is out.unimodal_logits
    assert "heads" not in bal.state_dict()
    with pytest.raises(ValueError, match="auxiliary heads on detached features"):
        em.create_balancer("mmpareto", make_toy_model(2, fusion="attention"), heads="shared")
    with pytest.raises(ValueError, match="heads.* must be one of"):
        em.create_balancer("mmpareto", model, heads="own")
    with pytest.raises(ValueError, match="heads='shared'"):  # a separate-heads balancer cannot load it
        em.create_balancer("mmpareto", make_toy_model(2, fusion="sum")).load_state_dict(bal.state_dict())


class NoDims(nn.Module):
    """A contract model whose encoders declare no ``out_dim`` and which has no ``num_classes``."""

    def __init__(self, features: bool = True) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"a": nn.Linear(5, 4), "b": nn.Linear(6, 3)})
        self.head = nn.Linear(7, 3)
        self.features = features

    def forward(self, batch: dict[str, torch.Tensor]) -> em.MultimodalOutput:
        z = {m: torch.tanh(e(batch[m])) for m, e in self.encoders.items()}
        uni = {"a": self.head(F.pad(z["a"], (0, 3))), "b": self.head(F.pad(z["b"], (4, 0)))}
        return em.MultimodalOutput(
            self.head(torch.cat([z["a"], z["b"]], 1)), uni, z if self.features else None
        )


def test_sizes_come_from_options_or_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"feature_dims=\{'a': <size>, 'b': <size>\}"):
        em.create_balancer("mmpareto", NoDims())
    with pytest.raises(ValueError, match="num_classes=<int>"):
        em.create_balancer("mmpareto", NoDims(), feature_dims={"a": 4, "b": 3})
    with pytest.raises(ValueError, match="unknown modalities"):
        em.create_balancer("mmpareto", NoDims(), feature_dims={"a": 4, "c": 3}, num_classes=3)
    model = NoDims()
    bal = em.create_balancer("mmpareto", model, feature_dims={"a": 4, "b": 3}, num_classes=3)
    x = {"a": torch.randn(8, 5), "b": torch.randn(8, 6)}
    y = torch.arange(8) % 3
    drive_step(bal, model, x, y, optimizer_for(model, bal))
    assert set(bal.stats()) >= {"conflict/a", "conflict/b"}
    wrong = em.create_balancer("mmpareto", NoDims(), feature_dims={"a": 5, "b": 3}, num_classes=3)
    with pytest.raises(ValueError, match=r"expects features of shape \(B, 5\), found \(8, 4\)"):
        wrong.loss(model(x), y)


def test_features_none_is_a_clear_error_at_the_first_loss() -> None:
    model = NoDims(features=False)
    bal = em.create_balancer("mmpareto", model, feature_dims={"a": 4, "b": 3}, num_classes=3)
    x, y = {"a": torch.randn(4, 5), "b": torch.randn(4, 6)}, torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"features=None.*features=\{modality: pooled"):
        bal.loss(model(x), y)
    shared = em.create_balancer("mmpareto", model, heads="shared")  # the shared variant needs no features
    assert torch.isfinite(shared.loss(model(x), y))


def test_an_optimizer_without_the_heads_is_refused() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("mmpareto", model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # forgets balancer.parameters()
    batch, y = make_toy_batch(2)
    with pytest.raises(em.DriverError, match=r"\*balancer.parameters\(\)"):
        for _ in range(2):  # found at the second step
            opt.zero_grad()
            bal.loss(model(batch), y).backward()
            bal.before_step()
            opt.step()


def test_heads_follow_the_model_dtype() -> None:
    model = make_toy_model(2).double()
    bal = em.create_balancer("mmpareto", model)
    assert all(p.dtype == torch.float64 for p in bal.parameters())
    batch, y = make_toy_batch(2)
    drive_step(bal, model, {k: v.double() for k, v in batch.items()}, y, optimizer_for(model, bal))
    assert all(bool(torch.isfinite(p).all()) for p in bal.parameters())
