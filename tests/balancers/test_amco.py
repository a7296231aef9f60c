"""amco: adaptive mask co-optimization, checked against a literal re-enactment of BalanceMM's AMCo step
(``AMCo_trainer.py`` ``train_loop`` / ``training_step``, ``BaseClassifierAMCoModel.unimodality_calculate``)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model

import equimodal as em
from equimodal.balancers.amco import amco_ratio


def _balancemm_step(model, batch, label, mask, dependent, sigma):
    """One BalanceMM AMCo training step on our concat toy model, literally, with the class mask as the
    ``(1, C)`` row it meant (the released ``expand(2, -1)`` fails for batches of more than 2).
    Returns the new dependent flags; leaves the gradients in ``model``."""
    mods = list(model.encoders)
    encoder_result = {m: model.encoders[m](batch[m]) for m in mods}
    fc = model.fusion.fc
    all_nums = len(mods)
    unimodal_result, now_size, output = {}, 0, 0
    for m, size in zip(mods, [encoder_result[m].shape[1] for m in mods], strict=True):
        unimodal_result[m] = (
            encoder_result[m] @ fc.weight[:, now_size : now_size + size].t() + fc.bias / all_nums
        )
        now_size += size
        if dependent.get(m, False):
            unimodal_result[m] = torch.mul(unimodal_result[m], mask)
        output = output + unimodal_result[m]
    loss = F.cross_entropy(output, label)
    loss.backward(retain_graph=True)
    for m in mods:
        F.cross_entropy(unimodal_result[m], label).backward()
    sft_out = torch.softmax(torch.cat([unimodal_result[m] for m in mods], 1), dim=1)
    n_classes, now_dim, new = output.shape[1], 0, {}
    for m in mods:
        if now_dim < sft_out.shape[1] - n_classes:
            sft_uni = torch.sum(sft_out[:, now_dim : now_dim + n_classes]) / len(label)
        else:
            sft_uni = torch.sum(sft_out[:, now_dim:]) / len(label)
        new[m] = bool(sft_uni > sigma)
        now_dim += n_classes
    return new


@pytest.mark.parametrize("num_mod", [2, 3])
def test_fidelity_to_balancemm(num_mod: int) -> None:
    """Gradients, masked-class counts (the sin ramp of ``l_t``) and dependent flags of every step equal
    BalanceMM's, over three epochs of four batches (sigma 0.4 lets a modality of three be dependent)."""
    sigma, eps = (0.5, 0.3) if num_mod == 2 else (0.4, 0.3)
    ours = make_toy_model(num_mod)
    ref = copy.deepcopy(ours)
    bal = em.create_balancer("amco", ours, sigma=sigma, eps=eps)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    masked_steps = 0
    for epoch in range(3):
        bal.start_epoch(epoch)
        dependent = {m: False for m in ref.encoders}
        l_t = 0
        for i in range(4):
            pt = np.sin(np.pi / 2 * (min(eps, l_t) / eps))
            n_masked = int(pt * 3)
            l_t += epoch / 10
            batch, y = make_toy_batch(num_mod, seed=10 * epoch + i)
            used = bal.dependent.clone()
            bal.loss(ours(batch), y).backward()
            mask = bal.mask.clone()
            assert int((mask == 0).sum()) == n_masked
            bal.before_step()
            stats = bal.stats()
            assert stats["ratio"] == pytest.approx(pt)
            assert used.tolist() == [dependent[m] for m in ref.encoders]
            dependent = _balancemm_step(ref, batch, y, mask[None, :], dependent, sigma)
            assert bal.dependent.tolist() == [dependent[m] for m in ref.encoders]
            for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(
                    p.grad, q.grad, msg=lambda msg, n=f"{epoch}/{i} {name}": f"{n}: {msg}"
                )
            masked_steps += int(any(stats[f"mask_ratio/{m}"] > 0 for m in bal.modalities))
            for o in (opt, ref_opt):
                o.step()
                o.zero_grad()
    assert masked_steps > 0  # the masking path ran


def test_ratio_ramp() -> None:
    assert amco_ratio(0.0, 0.3) == 0.0
    assert amco_ratio(0.1, 0.3) == pytest.approx(0.5)
    assert amco_ratio(0.3, 0.3) == pytest.approx(1.0) and amco_ratio(5.0, 0.3) == pytest.approx(1.0)
    assert amco_ratio(0.15, 0.3) == pytest.approx(math.sin(math.pi / 4))


def test_a_dependent_modality_loses_its_masked_classes() -> None:
    model = make_toy_model(2)
    bal = em.create_balancer("amco", model)
    batch, y = make_toy_batch(2)
    bal.start_epoch(2)
    bal.epoch_step = 5  # t = 0.1 * 2 * 5 = 1 >= eps: every class masked
    bal.dependent = torch.tensor([True, False])
    out = model(batch)
    loss = bal.loss(out, y)
    assert torch.equal(bal.mask, torch.zeros(3))
    # m0 leaves the fused sum; its own CE is that of zero logits
    fused = out.unimodal_logits["m1"]
    expected = F.cross_entropy(fused, y) + math.log(3) + F.cross_entropy(out.unimodal_logits["m1"], y)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.encoders["m0"].parameters())
    bal.before_step()
    stats = bal.stats()
    assert stats["mask_ratio/m0"] == 1.0 and stats["mask_ratio/m1"] == 0.0 and stats["ratio"] == 1.0
    assert bal.epoch_step == 6


def test_epoch_start_resets_and_a_resumed_epoch_keeps_its_count() -> None:
    bal = em.create_balancer("amco", make_toy_model(2))
    bal.start_epoch(1)
    batch, y = make_toy_batch(2)
    for _ in range(3):
        bal.loss(bal.model(batch), y).backward()
        bal.before_step()
    assert bal.epoch_step == 3 and bool(bal.dependent.any())
    state = bal.state_dict()
    again = em.create_balancer("amco", make_toy_model(2))
    again.load_state_dict(state)
    again.start_epoch(1)  # resumed mid-epoch: the count and the flags stay
    assert again.epoch_step == 3 and torch.equal(again.dependent, bal.dependent)
    bal.start_epoch(2)
    assert bal.epoch_step == 0 and not bool(bal.dependent.any())


@pytest.mark.parametrize("fusion", ["film", "weighted"])
def test_fusions_whose_logits_are_not_the_sum_are_refused(fusion: str) -> None:
    with pytest.raises(ValueError, match=f"fusion is '{fusion}'"):
        em.create_balancer("amco", make_toy_model(2, fusion=fusion))
    assert em.create_balancer("amco", make_toy_model(2, fusion="sum")).name == "amco"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"sigma": 1.5}, r"'sigma' must be a finite number in \[0, 1\], found 1.5"),
        ({"eps": 0.0}, r"'eps' must be a finite number > 0, found 0.0"),
        ({"rate": -0.1}, "'rate' must be a finite number"),
        ({"uni_weight": float("inf")}, "'uni_weight' must be a finite number"),
    ],
)
def test_bad_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        em.create_balancer("amco", make_toy_model(2), **options)


class _OwnModel(torch.nn.Module):
    """A model of the user's own (no ``fusion`` attribute); ``scale`` != 1 breaks fused = sum of unimodal."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = make_toy_model(2), scale
        self.encoders = self.inner.encoders

    def forward(self, batch):
        out = self.inner(batch)
        return out._replace(logits=out.logits * self.scale)


def test_a_model_of_the_users_own_is_checked_at_the_first_loss() -> None:
    batch, y = make_toy_batch(2)
    for scale, ok in ((1.0, True), (2.0, False)):
        model = _OwnModel(scale)
        bal = em.create_balancer("amco", model)
        bal.start_epoch(0)
        if ok:
            assert torch.isfinite(bal.loss(model(batch), y))
            continue
        with pytest.raises(ValueError, match="not the sum of its unimodal logits"):
            bal.loss(model(batch), y)
