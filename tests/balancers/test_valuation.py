"""Sample- and modality-level valuation: the Shapley contributions against the code's formula, the copies
against the code's bins and counts, the plan and the copies' absent modality in training, bad options."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import equimodal as em
from equimodal.balancers import EpochData
from equimodal.balancers.plan import INDEX_KEY, PLAN_WEIGHT_KEY, PLAN_ZEROED_KEY, indexed_loader
from equimodal.balancers.valuation import (
    modality_resample_count,
    sample_copies,
    shapley_contributions,
    subset_masks,
)
from equimodal.data.base import TensorSplit
from equimodal.testing import toy_batch, toy_model
from equimodal.types import MultimodalOutput


def _data(num=2, n=40, seed=0, batch_size=16):
    inputs, y = toy_batch(num, n, seed=seed)
    split = TensorSplit(inputs, y)
    data = EpochData(
        train=[], heldout=None, device="cpu", indexed=indexed_loader(split, batch_size=batch_size), size=n
    )
    return split, data


def _trained(num, split, steps=60):
    """A toy model trained a little on ``split`` (an untrained one values every modality alike)."""
    model = toy_model(num)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(split.inputs).logits, split.labels).backward()
        opt.step()
    opt.zero_grad()
    return model


def _code_contributions(model, inputs, y):
    """The code's ``execute_modulation`` for two modalities, in plain torch: fused, audio-only and
    visual-only predictions (the other modality's pooled feature zeroed, ``exec_drop``), then
    ``(value_a + value_all - value_v) / 2`` with ``value_all = 2``."""
    with torch.no_grad():
        model.eval()
        a, v = (model.encoders[m](inputs[m]) for m in ("m0", "m1"))
        out = model.fusion({"m0": a, "m1": v})[0]
        out_a = model.fusion({"m0": a, "m1": torch.zeros_like(v)})[0]  # drop visual
        out_v = model.fusion({"m0": torch.zeros_like(a), "m1": v})[0]  # drop audio
        model.train()
    rows = []
    for i in range(len(y)):
        value_all = 2.0 if int(out[i].argmax()) == int(y[i]) else 0.0
        value_a = 1.0 if int(out_a[i].argmax()) == int(y[i]) else 0.0
        value_v = 1.0 if int(out_v[i].argmax()) == int(y[i]) else 0.0
        rows.append(((value_a + value_all - value_v) / 2.0, (value_v + value_all - value_a) / 2.0))
    return rows


def _code_copies(c):
    """``AV_KS_Dataset_sample_level``'s branches for one contribution."""
    if 0.4 < c < 0.9:
        return 1
    if -0.1 < c < 0.4:
        return 2
    if c < -0.1:
        return 3
    return 0


def _brute_shapley(correct_of):
    """Shapley values by the average over every order of the modalities (``v(S) = |S| 1[correct_S]``)."""
    m = len(next(iter(correct_of)))
    value = {s: sum(s) * float(correct_of[s]) if any(s) else 0.0 for s in correct_of}
    phi = [0.0] * m
    orders = list(itertools.permutations(range(m)))
    for order in orders:
        present = [False] * m
        for j in order:
            before = value[tuple(present)]
            present[j] = True
            phi[j] += (value[tuple(present)] - before) / len(orders)
    return phi


def test_two_modality_shapley_is_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    correct = torch.rand(64, 4, generator=g) < 0.5  # subsets: none, {a}, {v}, {a, v}
    phi = shapley_contributions(correct)
    a, v, both = correct[:, 1].float(), correct[:, 2].float(), correct[:, 3].float()
    assert torch.equal(phi[:, 0], (a + 2 * both - v) / 2)
    assert torch.equal(phi[:, 1], (v + 2 * both - a) / 2)
    assert set(phi.flatten().tolist()) <= {-0.5, 0.0, 0.5, 1.0, 1.5}


@pytest.mark.parametrize("m", [3, 4])
def test_shapley_matches_the_average_over_orders(m):
    masks = subset_masks(m)
    g = torch.Generator().manual_seed(m)
    correct = torch.rand(12, 2**m, generator=g) < 0.5
    phi = shapley_contributions(correct)
    for i in range(12):
        table = {tuple(masks[k].tolist()): bool(correct[i, k]) for k in range(2**m)}
        assert torch.allclose(
            phi[i].double(), torch.tensor(_brute_shapley(table), dtype=torch.float64), atol=1e-6
        )
    # efficiency: the values sum to v(all) = M 1[fused correct]; all subsets correct -> 1 each
    assert torch.allclose(phi.sum(1), m * correct[:, -1].float(), atol=1e-6)
    assert torch.allclose(shapley_contributions(torch.ones(1, 2**m, dtype=torch.bool)), torch.ones(1, m))


def test_copy_bins_are_the_codes():
    values = [-0.5, 0.0, 0.5, 1.0, 1.5, 0.4, -0.1, 0.9, 0.25]
    ours = sample_copies(torch.tensor(values, dtype=torch.float64), "code").tolist()
    assert ours == [_code_copies(c) for c in values]
    closed = sample_copies(torch.tensor(values), "closed").tolist()
    assert closed == [3, 2, 1, 0, 0, 1, 2, 0, 2]  # the code's gaps at 0.4 and -0.1 closed (lower bin)


def test_sample_valuation_plan_equals_the_code():
    """FIDELITY: contributions and copies of the code's two-modality pass, re-enacted in plain torch."""
    split, data = _data(2, n=40)
    model = _trained(2, split)
    balancer = em.create_balancer("sample_valuation", model, start_epoch=0)
    assert balancer.absent == "features"
    balancer.start_epoch(0, data)
    rows = _code_contributions(model, split.inputs, split.labels)
    plan = balancer.epoch_plan
    assert torch.equal(plan.indices[:40], torch.arange(40)) and not bool(plan.zeroed[:40].any())
    extra_idx, extra_zero = plan.indices[40:], plan.zeroed[40:]
    for i, (ca, cv) in enumerate(rows):
        # audio (m0) copies: visual dropped (the code's drop = 2); visual copies: audio dropped (drop = 1)
        n_a = int(((extra_idx == i) & extra_zero[:, 1] & ~extra_zero[:, 0]).sum())
        n_v = int(((extra_idx == i) & extra_zero[:, 0] & ~extra_zero[:, 1]).sum())
        assert (n_a, n_v) == (_code_copies(ca), _code_copies(cv)), i
    expected = sum(_code_copies(ca) + _code_copies(cv) for ca, cv in rows)
    assert len(plan) == 40 + expected and expected > 0
    assert balancer.figures["copies"] == {
        "m0": sum(_code_copies(ca) for ca, _ in rows),
        "m1": sum(_code_copies(cv) for _, cv in rows),
    }
    assert sum(balancer.figures["histogram"]["m0"].values()) == 40
    assert set(balancer.figures["histogram"]["m0"]) <= {"-0.5", "0", "0.5", "1", "1.5"}


def test_modality_valuation_plan_equals_the_code():
    """FIDELITY: part mean, gaps, ``int(|gap_a - gap_v| / 3 * 2 * alpha * N)`` copies for the modality with
    the larger gap (the other dropped), the draws re-made from a generator seeded as the balancer's."""
    split, data = _data(2, n=40)
    model = _trained(2, split)
    balancer = em.create_balancer("modality_valuation", model, start_epoch=0, alpha=3.0, seed=7)
    balancer.start_epoch(0, data)
    rows = _code_contributions(model, split.inputs, split.labels)
    gen = torch.Generator().manual_seed(7)
    num = int(40 * 0.2)
    choice = torch.randint(40, (num,), generator=gen).tolist()
    part_cona = sum(rows[i][0] for i in choice) / num
    part_conv = sum(rows[i][1] for i in choice) / num
    gap_a, gap_v = 1.0 - part_cona, 1.0 - part_conv
    resample_num = int(abs(gap_a - gap_v) / 3 * 2 * 3.0 * 40)
    assert resample_num > 0
    sample_choice = torch.randint(40, (resample_num,), generator=gen)
    plan = balancer.epoch_plan
    assert len(plan) == 40 + resample_num
    assert torch.equal(plan.indices[40:], sample_choice)
    keep = 0 if gap_a > gap_v else 1  # drop = 2 (visual) when audio's gap is larger
    assert bool(plan.zeroed[40:, 1 - keep].all()) and not bool(plan.zeroed[40:, keep].any())
    assert balancer.figures["weak"] == f"m{keep}" and balancer.figures["part"] == num
    assert math.isclose(balancer.figures["gap"]["m0"], gap_a, abs_tol=1e-6)


def test_resample_count_curves_and_many_modalities():
    mean = torch.tensor([0.8, 0.2])  # gaps 0.2, 0.8: visual is weak, d = 0.4
    assert modality_resample_count(mean, 100, 1.0) == (1, int(0.4 * 100), pytest.approx(0.4))
    assert modality_resample_count(mean, 100, 2.0, "tanh")[1] == int(math.tanh(0.8) * 100)
    assert modality_resample_count(mean, 100, 1.0, "square")[1] == int(0.4**1.5 * 100)
    weak, count, diff = modality_resample_count(torch.tensor([1.0, 0.4, 0.7], dtype=torch.float64), 30, 1.0)
    assert weak == 1 and math.isclose(diff, (0.6 - (0.0 + 0.3) / 2) * 2 / 3) and count == int(diff * 30)


def test_inputs_mode_values_with_zeroed_inputs_for_three_modalities():
    """``absent="inputs"``: v(S) from the model on inputs with the absent modalities zeroed; the values
    equal the average over orders computed here from those predictions."""
    split, data = _data(3, n=24)
    model = _trained(3, split)
    balancer = em.create_balancer("sample_valuation", model, start_epoch=0, absent="inputs")
    phi = balancer.contributions(data)
    masks = subset_masks(3)
    with torch.no_grad():
        model.eval()
        preds = {}
        for k in range(1, 8):
            present = masks[k].tolist()
            x = {m: split.inputs[m] if present[j] else torch.zeros_like(split.inputs[m]) for j, m in
                 enumerate(("m0", "m1", "m2"))}  # fmt: skip
            preds[tuple(present)] = model(x).logits.argmax(1) == split.labels
    for i in range(24):
        table = {s: bool(p[i]) for s, p in preds.items()}
        table[(False, False, False)] = False
        assert torch.allclose(
            phi[i].double(), torch.tensor(_brute_shapley(table), dtype=torch.float64), atol=1e-6
        )


def test_a_copy_trains_only_its_modality():
    """MECHANISM: a copy with m1 zeroed: m1's pooled feature is zeroed before the fusion, so m1's encoder
    gets no gradient from it and the loss is the CE of the fusion on (f0, 0); an original keeps the model's
    logits. With absent="inputs" only the input is zeroed (m1's encoder still gets a gradient)."""
    split, data = _data(2, n=40)
    for absent in ("features", "inputs"):
        model = toy_model(2)
        balancer = em.create_balancer("sample_valuation", model, start_epoch=0, absent=absent)
        balancer.start_epoch(0, data)
        x = {"m0": split.inputs["m0"][:4], "m1": torch.zeros_like(split.inputs["m1"][:4])}
        copies = torch.tensor([[False, True]] * 4)  # the plan's flags: m1 zeroed in these 4 copies
        batch = {**x, INDEX_KEY: torch.arange(4), PLAN_WEIGHT_KEY: torch.ones(4), PLAN_ZEROED_KEY: copies}
        y = split.labels[:4]
        out = model(batch)
        loss = balancer.loss(out, y, batch=batch)
        loss.backward()
        grad = model.encoders["m1"].fc.weight.grad
        if absent == "features":
            f0 = out.features["m0"]
            expected = F.cross_entropy(
                model.fusion({"m0": f0, "m1": torch.zeros_like(out.features["m1"])})[0], y
            )
            assert torch.allclose(loss, expected)
            assert grad is None or bool((grad == 0).all())
        else:
            assert torch.allclose(loss, F.cross_entropy(out.logits, y))
            assert grad is not None and bool((grad != 0).any())
        assert balancer.stats()["zeroed/m1"] == 1.0 and balancer.stats()["zeroed/m0"] == 0.0
        model.zero_grad()
        full = {
            **{m: split.inputs[m][:4] for m in ("m0", "m1")},
            INDEX_KEY: torch.arange(4),
            PLAN_WEIGHT_KEY: torch.ones(4),
            PLAN_ZEROED_KEY: torch.zeros(4, 2, dtype=torch.bool),
        }
        out = model(full)
        assert torch.allclose(balancer.loss(out, y, batch=full), F.cross_entropy(out.logits, y))
        model.zero_grad()
        silent = {**full, "m1": torch.zeros_like(full["m1"])}  # originals whose m1 is all zeros in the data
        out = model(silent)
        assert torch.allclose(balancer.loss(out, y, batch=silent), F.cross_entropy(out.logits, y))
        assert balancer.stats()["zeroed/m1"] == 0.0  # not counted as copies
        model.zero_grad()
        with pytest.raises(em.DriverError, match="plan_zeroed"):
            balancer.loss(
                model(x), y, batch={**x, INDEX_KEY: torch.arange(4), PLAN_WEIGHT_KEY: torch.ones(4)}
            )


def test_plans_only_inside_the_window_and_trains_on_them():
    """MECHANISM: epoch 0 (warm-up) trains each sample once; epoch 1 on the plan (originals plus copies);
    the plan, the copies and the figures survive a state round-trip."""
    split, data = _data(2, n=40)
    model = toy_model(2)
    balancer = em.create_balancer("sample_valuation", model, start_epoch=1)
    loader = balancer.planned_loader(split, batch_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for epoch in range(2):
        balancer.start_epoch(epoch, data)
        count = 0
        for inputs, y in loader:
            count += len(y)
            balancer.loss(model(inputs), y, batch=inputs).backward()
            balancer.before_step()
            opt.step()
            opt.zero_grad()
        seen.append(count)
        if epoch == 0:
            assert balancer.epoch_plan is None and balancer.figures == {}
    assert seen[0] == 40 and seen[1] == len(balancer.epoch_plan) > 40
    assert sum(balancer.figures["copies"].values()) == seen[1] - 40
    twin = em.create_balancer("sample_valuation", toy_model(2), start_epoch=1)
    twin.load_state_dict(balancer.state_dict())
    assert torch.equal(twin.epoch_plan.indices, balancer.epoch_plan.indices)
    assert twin.figures == balancer.figures and torch.equal(twin.copies, balancer.copies)


def test_modality_valuation_alpha_zero_plans_no_copies():
    _, data = _data(2, n=20)
    balancer = em.create_balancer("modality_valuation", toy_model(2), start_epoch=0, alpha=0.0)
    balancer.start_epoch(0, data)
    assert len(balancer.epoch_plan) == 20 and balancer.figures["copies"] == {"m0": 0, "m1": 0}


def test_an_indexed_pass_that_misses_samples_is_refused():
    split, _ = _data(2, n=20)
    partial = EpochData(
        train=[], heldout=None, device="cpu", indexed=indexed_loader(split, batch_size=8), size=30
    )
    balancer = em.create_balancer("sample_valuation", toy_model(2), start_epoch=0)
    with pytest.raises(ValueError, match="saw 20 of the 30 training samples"):
        balancer.start_epoch(0, partial)


class _NoFusionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(3, 4)})
        self.fusion = nn.Linear(8, 2)

    def forward(self, batch):
        f = {m: enc(batch[m]) for m, enc in self.encoders.items()}
        return MultimodalOutput(self.fusion(torch.cat([f["a"], f["b"]], 1)), {m: f[m][:, :2] for m in f}, f)


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        ("sample_valuation", {"absent": "feature"}, r"option 'absent' must be one of 'auto', 'features'"),
        ("sample_valuation", {"bins": "open"}, r"option 'bins' must be one of 'closed', 'code'"),
        (
            "modality_valuation",
            {"part_ratio": 0.0},
            r"option 'part_ratio' must be a finite number in \(0, 1\]",
        ),
        ("modality_valuation", {"alpha": -1.0}, r"option 'alpha' must be a finite number >= 0, found -1.0"),
        ("modality_valuation", {"curve": "cubic"}, r"option 'curve' must be one of 'linear', 'tanh'"),
    ],
)
def test_bad_options_are_refused(name, options, words):
    with pytest.raises(ValueError, match=words):
        em.create_balancer(name, toy_model(2), **options)


def test_features_need_an_equimodal_fusion():
    model = _NoFusionModel()
    with pytest.raises(ValueError, match=r"option 'absent' must be 'inputs' or 'auto'.*found 'features'"):
        em.create_balancer("sample_valuation", model, absent="features")
    assert em.create_balancer("sample_valuation", model).absent == "inputs"
