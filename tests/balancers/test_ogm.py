"""OGM for M >= 3: the published comparison rules, and the warning under adaptive optimizers.

Expected values are computed here from the formulas (never stored floats).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import make_toy_batch, make_toy_model, toy_epoch_data
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import equimodal as em
from equimodal.balancers.base import is_adaptive_optimizer
from equimodal.balancers.ogm import REFERENCES, ogm_coefficients, score_ratios


def unimodal_scores(model: nn.Module, batch: dict[str, Tensor], y: Tensor) -> list[float]:
    with torch.no_grad():
        out = model(batch)
    return [float(F.softmax(o, 1)[torch.arange(len(y)), y].sum()) for o in out.unimodal_logits.values()]


def reference_by_hand(scores: list[float], rule: str) -> list[float]:
    """Each modality's comparison value, written out from each source's description."""
    out = []
    for i in range(len(scores)):
        others = scores[:i] + scores[i + 1 :]
        out.append(
            {
                "mean": sum(others) / len(others),  # ours
                "min": min(others),  # BalanceBenchmark (min over all modalities gives the same k)
                "sum": sum(others),  # MLA's official code: score / (sum of the other scores)
                "max": max(others),  # ours
            }[rule]
        )
    return out


def test_references_are_the_published_variants() -> None:
    assert set(REFERENCES) == {"mean", "min", "sum", "max"}


@pytest.mark.parametrize("rule", ["mean", "min", "sum", "max"])
def test_three_modalities_scale_by_each_rule(rule: str) -> None:
    model = make_toy_model(3)
    batch, y = make_toy_batch(3, 32)
    twin = copy.deepcopy(model)
    balancer = em.create_balancer("ogm", model, alpha=0.3, reference=rule)
    balancer.set_epoch(0)
    s = unimodal_scores(model, batch, y)
    balancer.loss(model(batch), y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    F.cross_entropy(twin(batch).logits, y).backward()
    balancer.before_step()
    ref = reference_by_hand(s, rule)
    for i in range(3):
        rho = s[i] / ref[i]
        k = 1 - math.tanh(0.3 * rho) if rho > 1 else 1.0
        assert balancer.stats()[f"k/m{i}"] == pytest.approx(k, rel=1e-5)
        for n, p in model.named_parameters():
            if n.startswith(f"encoders.m{i}.") and p.dim() >= 2:
                torch.testing.assert_close(p.grad, raw[n] * k)


def test_three_modality_rules_differ_as_documented() -> None:
    s = torch.tensor([6.0, 4.0, 1.0], dtype=torch.float64)
    k = {r: ogm_coefficients(score_ratios(s, r), 0.5) for r in REFERENCES}
    slowed = {r: [i for i in range(3) if float(k[r][i]) < 1] for r in REFERENCES}
    assert slowed["mean"] == [0, 1]  # 6 > (4+1)/2 and 4 > (6+1)/2: both above the others' mean
    assert slowed["min"] == [0, 1]  # both above the weakest
    assert slowed["sum"] == [0]  # only 6 > 4+1
    assert slowed["max"] == [0]  # only the leader
    assert float(k["min"][0]) < float(k["mean"][0]) < float(k["sum"][0])  # rho_min > rho_mean > rho_sum


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=3, max_size=5))
def test_sum_reference_slows_at_most_one(scores: list[float]) -> None:
    rho = score_ratios(torch.tensor(scores, dtype=torch.float64), "sum")
    assert int((rho > 1).sum()) <= 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=2, max_size=2))
def test_all_rules_coincide_for_two_modalities(scores: list[float]) -> None:
    s = torch.tensor(scores, dtype=torch.float64)
    ratios = [score_ratios(s, r) for r in REFERENCES]
    for rho in ratios[1:]:
        assert torch.equal(rho, ratios[0])


def test_all_rules_give_the_same_step_for_two_modalities() -> None:
    model = make_toy_model(2)
    batch, y = make_toy_batch(2, 32)
    grads = []
    for rule in REFERENCES:
        twin = copy.deepcopy(model)
        balancer = em.create_balancer("ogm", twin, reference=rule)
        balancer.set_epoch(0)
        balancer.loss(twin(batch), y).backward()
        balancer.before_step()
        grads.append({n: p.grad for n, p in twin.named_parameters()})
    for other in grads[1:]:
        for n, g in other.items():
            assert torch.equal(g, grads[0][n])


# ------------------------------------------------------------------------ adaptive optimizers
def test_adaptive_optimizers_are_recognised() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    for opt in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        assert is_adaptive_optimizer(opt(params))
    assert not is_adaptive_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9))

    class MyLion(torch.optim.SGD):  # recognised by name
        pass

    assert is_adaptive_optimizer(MyLion(params, lr=0.1))


def _scaling_balancer(
    name: str,
) -> tuple[torch.nn.Module, em.Balancer, dict[str, torch.Tensor], torch.Tensor]:
    """A toy model, ``name`` on it at epoch 0 (MSLR in ``keep`` mode) and a batch."""
    model = make_toy_model(2)
    balancer = em.create_balancer(name, model, **({"mode": "keep"} if name == "mslr" else {}))
    balancer.set_epoch(0)
    return model, balancer, *make_toy_batch(2, 16)


@pytest.mark.parametrize("name", ["ogm", "ogm_ge", "agm", "mslr"])
def test_scaling_balancers_warn_once_under_adam_in_train_step(name: str) -> None:
    model, balancer, batch, y = _scaling_balancer(name)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning, match="multiplying gradients") as record:
        balancer.train_step(batch, y, adam)
        balancer.train_step(batch, y, adam)
        assert balancer.check_optimizer(adam)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1


@pytest.mark.parametrize("name", ["ogm", "agm", "mslr"])
def test_no_warning_under_sgd(name: str) -> None:
    model, balancer, batch, y = _scaling_balancer(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not balancer.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        balancer.train_step(batch, y, torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_loss_term_balancer_does_not_warn_under_adam() -> None:
    model = make_toy_model(2)
    balancer = em.create_balancer("pmr", model)
    balancer.set_epoch(0)
    balancer.prepare_epoch(toy_epoch_data(2))
    batch, y = make_toy_batch(2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer.train_step(batch, y, torch.optim.Adam(model.parameters(), lr=1e-3))
