"""OPM and OGM+ (Wei et al., T-PAMI'24): fidelity to the official code's formulas, and the mechanism.

The ``literal_*`` functions re-enact the official code (GeWu-Lab/BML_TPAMI2024) as it computes:
``calcu_q`` and ``Modality_drop.execute_drop`` of ``code/models/Classifier.py``, the score and loss of
``Classifier.forward`` and ``main.py``'s ``train``, and the OGM+ branch of ``main.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model
from torch import nn

import equimodal as em
from equimodal.balancers.opm import ogm_plus_coefficients, opm_drop, opm_drop_probabilities, opm_theta
from equimodal.testing import check_ranks_agree, optimizer_for, snapshot


# ---------------------------------------------------------------------- the official code, re-enacted
def literal_calcu_q(performance_1: torch.Tensor, performance_2: torch.Tensor, q_base: float, lam: float):
    q = torch.tensor([0.0, 0.0])
    relu = nn.ReLU(inplace=True)
    ratio_1 = torch.tanh(relu(performance_1 / performance_2 - 1))
    ratio_2 = torch.tanh(relu(performance_2 / performance_1 - 1))
    q[0] = q_base * (1 + lam * ratio_1) if ratio_1 > 0 else 0
    q[1] = q_base * (1 + lam * ratio_2) if ratio_2 > 0 else 0
    return torch.clip(q, 0.0, 1.0)


def literal_execute_drop(fead_list, q, dim_list, mask):
    """``execute_drop`` after its ``exe_drop`` test, with ``mask`` the ``[num_mod, B, 1]`` Bernoulli(1 - q)
    sample; l.53 read without its stray ``]``; ``custom_autograd`` is a division by ``1 - theta``."""
    num_mod, D = len(fead_list), fead_list[0].shape[1]
    theta = sum(dim_list * q) / sum(dim_list)
    concat_list = torch.stack(fead_list, dim=0)
    concat_list = torch.mul(concat_list, mask)
    concat_list = concat_list / (1 - theta.item())
    mask = torch.transpose(mask, 0, 1).squeeze(-1)
    update_flag = torch.sum(mask, dim=1) > 0
    cleaned = torch.masked_select(concat_list, update_flag.unsqueeze(-1)).reshape(num_mod, -1, D)
    cleaned = [c.squeeze(0) for c in torch.chunk(cleaned, num_mod, dim=0)]
    return cleaned, update_flag


def literal_performance(h: torch.Tensor, w_block: torch.Tensor, b: torch.Tensor, label: torch.Tensor):
    """``Classifier.forward`` l.112-143: the score from detached head weights and half the bias."""
    t = torch.mm(h, torch.transpose(w_block.clone().detach(), 0, 1)) + b.clone().detach() / 2
    return sum([torch.softmax(t, 1)[i][int(label[i].item())] for i in range(t.shape[0])])


def literal_ogm_plus(performance_1, performance_2, boost=4):
    """``main.py`` l.119-136 (``--use_OGM_plus``): the coefficients of modalities 1 and 2."""
    radio_1 = performance_1 / performance_2
    return (1, boost) if radio_1 > 1 else (boost, 1)


# ---------------------------------------------------------------------- fidelity
def test_q_equals_calcu_q() -> None:
    g = torch.Generator().manual_seed(0)
    perf = torch.rand(200, 2, generator=g) * 16 + 0.01
    perf[:5, 1] = perf[:5, 0]  # ties: q = 0 for both
    for q_base, lam in ((0.5, 0.5), (0.4, 0.5), (0.9, 1.0)):
        for p in perf:
            ours = opm_drop_probabilities(p, q_base, lam)
            torch.testing.assert_close(ours, literal_calcu_q(p[0], p[1], q_base, lam))


def test_drop_theta_and_loss_equal_execute_drop_and_the_training_loss() -> None:
    """Features, kept samples, loss and gradients for fixed masks, with q > 0 for both modalities so that
    some samples lose every modality and are removed from the loss (main.py l.95-104)."""
    torch.manual_seed(3)
    B, D, C = 12, 5, 4
    feats = [torch.randn(B, D, requires_grad=True) for _ in range(2)]
    head = nn.Linear(2 * D, C)
    label = torch.randint(0, C, (B,))
    q = torch.tensor([0.6, 0.7])
    dim_list = torch.tensor([D, D])
    mask = torch.distributions.Bernoulli(1 - q).sample([B, 1]).permute(2, 1, 0).contiguous().reshape(2, B, -1)
    assert not bool((mask.sum(0) > 0).all()), "the draw should remove a sample"
    cleaned, flag = literal_execute_drop(feats, q, dim_list, mask)
    ref_loss = F.cross_entropy(head(torch.cat(cleaned, 1)), label[flag])
    ref_grads = torch.autograd.grad(ref_loss, [*feats, head.weight])

    theta = opm_theta(q, [D, D])
    torch.testing.assert_close(theta, sum(dim_list * q) / sum(dim_list))
    dropped, kept = opm_drop({"a": feats[0], "v": feats[1]}, mask.squeeze(-1).bool(), 1 / (1 - theta))
    assert torch.equal(kept, flag)
    for i, m in enumerate(("a", "v")):
        torch.testing.assert_close(dropped[m][kept], cleaned[i])
    ce = F.cross_entropy(head(torch.cat([dropped["a"], dropped["v"]], 1)), label, reduction="none")
    loss = (ce * kept.float()).sum() / kept.sum()
    torch.testing.assert_close(loss, ref_loss)
    for ours, ref in zip(torch.autograd.grad(loss, [*feats, head.weight]), ref_grads, strict=True):
        torch.testing.assert_close(ours, ref)


def _literal_step(model, batch, label, gen, *, q_base=0.5, lam=0.5, p_exe=0.7):
    """One step of the official training as the code runs it (Classifier.forward + main.py train) on our toy
    model, with the random draws taken from ``gen`` in the order opm takes them."""
    h = [model.encoders[m](batch[m]) for m in ("m0", "m1")]
    w, b = model.fusion.fc.weight, model.fusion.fc.bias
    d0 = h[0].shape[1]
    # our concat head spreads the bias over the modalities, b/M, which for M = 2 is the code's b/2
    p1 = literal_performance(h[0], w[:, :d0], b, label)
    p2 = literal_performance(h[1], w[:, d0:], b, label)
    q = literal_calcu_q(p1, p2, q_base, lam)
    u = torch.rand((), generator=gen)
    draws = torch.rand((2, label.shape[0]), generator=gen)
    if not bool(u >= 1 - p_exe):
        out = model.fusion.fc(torch.cat(h, 1))
        return F.cross_entropy(out, label), q
    mask = (draws < (1 - q)[:, None]).float().unsqueeze(-1)  # the Bernoulli(1 - q) sample, [2, B, 1]
    cleaned, flag = literal_execute_drop(h, q, torch.tensor([h[0].shape[1], h[1].shape[1]]), mask)
    out = model.fusion.fc(torch.cat(cleaned, 1))
    return F.cross_entropy(out, label[flag]), q


@pytest.mark.parametrize("p_exe", [1.0, 0.7])
def test_train_step_equals_the_official_step(p_exe: float) -> None:
    """Five SGD steps of opm equal the official step re-enacted with the same draws (q, masks, loss, update)."""
    model = make_toy_model(2)
    twin = copy.deepcopy(model)
    bal = em.create_balancer("opm", model, start_epoch=0, p_exe=p_exe, seed=4)
    bal.start_epoch(0)
    opt, opt_ref = optimizer_for(model, bal), torch.optim.SGD(twin.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(4)
    executed = []
    for step in range(5):
        batch, y = make_toy_batch(2, 16, seed=step)
        loss = bal.train_step(batch, y, opt)
        opt_ref.zero_grad()
        ref_loss, q = _literal_step(twin, batch, y, gen, p_exe=p_exe)
        ref_loss.backward()
        opt_ref.step()
        stats = bal.stats()
        executed.append(stats["executed"])
        torch.testing.assert_close(torch.tensor([stats["q/m0"], stats["q/m1"]]), q)
        torch.testing.assert_close(loss, ref_loss.detach())
        for k, v in snapshot(twin, bal).items():
            torch.testing.assert_close(
                snapshot(model, bal)[k], v, msg=lambda s, k=k, step=step: f"step {step}: {k}: {s}"
            )
    assert 1.0 in executed and (p_exe == 1.0 or 0.0 in executed)


# ---------------------------------------------------------------------- mechanism
def test_the_dominant_modality_alone_is_dropped_with_probability_q_and_rescaled() -> None:
    scores = torch.tensor([3.0, 9.0, 4.0])
    q = opm_drop_probabilities(scores, 0.5, 0.5)
    expect = 0.5 * (1 + 0.5 * torch.tanh(torch.tensor(9.0 / 3.5 - 1)))
    torch.testing.assert_close(q, torch.stack([torch.tensor(0.0), expect, torch.tensor(0.0)]))
    assert opm_drop_probabilities(scores, 0.5, 0.5, "sum")[1] > 0.5  # 9 > 3 + 4
    assert opm_drop_probabilities(torch.tensor([3.0, 9.0, 7.0]), 0.5, 0.5, "sum").sum() == 0  # 9 < 3 + 7
    assert opm_drop_probabilities(torch.tensor([2.0, 2.0]), 0.5, 0.5).sum() == 0  # a tie drops nothing
    torch.testing.assert_close(
        opm_drop_probabilities(torch.tensor([1.0, 1e6]), 0.9, 1.0), torch.tensor([0, 1.0])
    )


def test_drops_happen_about_p_exe_of_the_steps_and_q_of_the_samples() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("opm", model, start_epoch=0, seed=1)
    bal.start_epoch(0)
    opt = optimizer_for(model, bal, lr=0.0)
    runs, dropped, expected = [], 0.0, 0.0
    for step in range(60):
        batch, y = make_toy_batch(2, 64, seed=step)
        bal.train_step(batch, y, opt)
        s = bal.stats()
        runs.append(s["executed"])
        dropped += s["dropped/m0"] + s["dropped/m1"]
        expected += s["executed"] * (s["q/m0"] + s["q/m1"])
        assert min(s["q/m0"], s["q/m1"]) == 0 and max(s["q/m0"], s["q/m1"]) >= 0.5
        assert s["removed"] == 0  # one modality is always kept
        theta = max(s["q/m0"], s["q/m1"]) / 2  # equal feature sizes
        assert s["scale"] == pytest.approx(1 / (1 - theta) if s["executed"] else 1.0, rel=1e-6)
    assert 0.5 < sum(runs) / len(runs) < 0.9  # p_exe 0.7
    assert dropped == pytest.approx(expected, rel=0.1)


def test_nothing_changes_in_the_warm_up_epochs_and_evaluation_is_untouched() -> None:
    model = make_toy_model(2)
    twin = copy.deepcopy(model)
    bal, ref = em.create_balancer("opm", model), em.create_balancer("none", twin)
    assert bal.first_epoch == 6 and bal.requirements.own_step and bal.requirements.set_epoch
    opt, opt_ref = optimizer_for(model, bal), optimizer_for(twin, ref)
    batch, y = make_toy_batch(2, 16, seed=0)
    for epoch in range(6):  # epochs 0-5: the code's warm-up
        bal.start_epoch(epoch)
        ref.start_epoch(epoch)
        bal.train_step(batch, y, opt)
        ref.train_step(batch, y, opt_ref)
        assert bal.stats() == {}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    bal.start_epoch(6)
    ref.start_epoch(6)
    for _ in range(3):
        bal.train_step(batch, y, opt)
        ref.train_step(batch, y, opt_ref)
    assert bal.stats()["executed"] in (0.0, 1.0) and "q/m0" in bal.stats()
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    assert not model.fusion._forward_hooks  # the hook lives only during the training forward
    out = model(batch)
    assert torch.equal(bal.predict(out), out.logits)


def test_micro_batches_equal_one_batch_and_ranks_agree() -> None:
    model = make_toy_model(3)
    twin = copy.deepcopy(model)
    a = em.create_balancer("opm", model, start_epoch=0, p_exe=1.0)
    b = em.create_balancer("opm", twin, start_epoch=0, p_exe=1.0)
    a.start_epoch(0)
    b.start_epoch(0)
    oa, ob = optimizer_for(model, a), optimizer_for(twin, b)
    for step in range(3):
        batch, y = make_toy_batch(3, 16, seed=step)
        torch.testing.assert_close(a.train_step(batch, y, oa), b.train_step(batch, y, ob, micro_batches=4))
    for k, v in snapshot(model, a).items():
        torch.testing.assert_close(v, snapshot(twin, b)[k])
    check_ranks_agree("opm", 2, {"start_epoch": 0})


def test_a_fusion_called_with_something_else_is_refused() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_toy_model(2)
            self.encoders, self.fusion = self.inner.encoders, self.inner.fusion

        def forward(self, batch):
            feats = {m: e(batch[m]) for m, e in self.encoders.items()}
            fused, uni = self.fusion(feats)
            self.fusion(feats)
            return em.MultimodalOutput(fused, uni, feats)

    model = Odd()
    bal = em.create_balancer("opm", model, start_epoch=0)
    with pytest.raises(
        ValueError,
        match=r"each of \[.fusion.\] to be called once per forward of the model, found {.fusion.: 2}",
    ):
        bal.train_step(*make_toy_batch(2, 8), optimizer_for(model, bal))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("q_base", 1.5, r"'q_base' must be a finite number in \[0, 1\], found 1.5"),
        ("p_exe", -0.1, r"'p_exe' must be a finite number in \[0, 1\], found -0.1"),
        ("lam", float("nan"), r"'lam' must be a finite number >= 0, found nan"),
        ("reference", "median", r"option 'reference' must be one of .*found 'median'"),
    ],
)
def test_bad_options_are_named(option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        em.create_balancer("opm", make_toy_model(2), **{option: value})


class ContractOnly(nn.Module):
    """The toy model's modules behind a forward that names no ``fusion`` (a model that only follows the
    contract), with dropout and batch norm in its encoders to show the second forward leaves them alone."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        for enc in inner.encoders.values():
            enc.fc = nn.Sequential(enc.fc, nn.BatchNorm1d(enc.out_dim, affine=False), nn.Dropout(0.0))
        self.encoders, self.head = inner.encoders, inner.fusion

    def forward(self, batch):
        feats = {m: e(batch[m]) for m, e in self.encoders.items()}
        fused, uni = self.head(feats)
        return em.MultimodalOutput(fused, uni, feats)


def test_a_contract_only_model_takes_the_encoder_path_and_trains_as_the_fusion_path() -> None:
    """Without an equimodal ``model.fusion``, the encoders' outputs are dropped and replaced in a second
    forward; the update equals the fusion path's, batch-norm statistics included (updated once)."""
    plain = ContractOnly(make_toy_model(2))
    named = copy.deepcopy(plain)
    named.fusion = named.head  # the same model with its head reachable as model.fusion: the fusion path
    a = em.create_balancer("opm", plain, start_epoch=0, p_exe=1.0, seed=2)
    b = em.create_balancer("opm", named, start_epoch=0, p_exe=1.0, seed=2)
    assert a.fusion is None and b.fusion is named.head
    a.start_epoch(0)
    b.start_epoch(0)
    oa, ob = optimizer_for(plain, a), optimizer_for(named, b)
    for step in range(3):
        batch, y = make_toy_batch(2, 16, seed=step)
        torch.testing.assert_close(a.train_step(batch, y, oa), b.train_step(batch, y, ob))
        assert a.stats() == b.stats()
    assert a.stats()["dropped/m1"] > 0
    torch.testing.assert_close(
        plain.state_dict(), {k: v for k, v in named.state_dict().items() if k in plain.state_dict()}
    )
    assert plain.training and all(m.training for m in plain.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())


# ---------------------------------------------------------------------- OGM+
def test_ogm_plus_coefficients_equal_the_code() -> None:
    g = torch.Generator().manual_seed(1)
    for p in torch.rand(100, 2, generator=g) + 0.05:
        ratios = torch.stack([p[0] / p[1], p[1] / p[0]])
        assert tuple(ogm_plus_coefficients(ratios, 4.0).tolist()) == literal_ogm_plus(p[0], p[1])


def test_ogm_plus_multiplies_the_weak_modalitys_gradients_by_boost() -> None:
    model = make_toy_model(2)
    twin = copy.deepcopy(model)
    bal = em.create_balancer("ogm_plus", model, noise=False, start_epoch=0)
    ref = em.create_balancer("none", twin)
    assert (bal.first_epoch, bal.last_epoch, bal.gradient_noise) == (0, 60, False)
    bal.start_epoch(0)
    batch, y = make_toy_batch(2, 16, seed=2)
    bal.loss(model(batch), y).backward()
    ref.loss(twin(batch), y).backward()
    bal.before_step()
    k = bal.stats()
    weak = min(("m0", "m1"), key=lambda m: k[f"ratio/{m}"])
    assert k[f"k/{weak}"] == 4.0 and sum(k[f"k/{m}"] for m in ("m0", "m1")) == 5.0
    for name, p in model.named_parameters():
        q = dict(twin.named_parameters())[name]
        factor = 4.0 if name.startswith(f"encoders.{weak}.") and p.dim() >= 2 else 1.0
        torch.testing.assert_close(p.grad, q.grad * factor)
    defaults = em.create_balancer("ogm_plus", make_toy_model(2))
    assert (defaults.first_epoch, defaults.last_epoch, defaults.gradient_noise, defaults.boost) == (
        6,
        60,
        True,
        4.0,
    )


def test_ogm_plus_refuses_alpha_and_a_bad_boost() -> None:
    with pytest.raises(ValueError, match=r"ogm_plus has no option alpha.*use boost="):
        em.create_balancer("ogm_plus", make_toy_model(2), alpha=0.8)
    with pytest.raises(ValueError, match=r"'ogm_plus' option 'boost' must be a finite number > 0, found 0"):
        em.create_balancer("ogm_plus", make_toy_model(2), boost=0)
