"""One contract suite run over every registered balancer with 2-, 3- and 4-modality toy models.

Each balancer must: give finite gradients after a step; be exactly plain joint training outside its
epoch window; round-trip its state (through ``torch.save``/``torch.load(weights_only=True)``) so a
fresh balancer continues identically; be deterministic for a seed; survive an AMP-overflow step.
Balancers that own the step are driven through ``train_step``; those that need epoch data get an
``EpochData`` built from toy batches. A balancer that cannot handle ``M > 2`` must refuse at
construction with a ``ValueError`` naming the modalities and the number found (no built-in one does).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import make_toy_batch, make_toy_model
from torch import Tensor, nn

import equimodal as em
from equimodal.balancers import Balancer, EpochData
from equimodal.types import modality_names

# Required (or test-friendly) constructor arguments per balancer, built from the model.
KWARGS: dict[str, Callable[[nn.Module], dict[str, Any]]] = {
    "unimodal": lambda model: {"modality": modality_names(model)[0]},
}

# Balancers that by design refuse fusions with auxiliary (detached) unimodal heads: they need unimodal
# logits whose gradient reaches the encoders. Every other balancer must work with them.
REFUSE_AUX_FUSION = {"mmpareto", "gblending"}

Grads = dict[str, Tensor]
Params = dict[str, Tensor]


def build(name: str, model: nn.Module, **extra: Any) -> Balancer:
    """Build ``name`` for ``model`` with the test-friendly arguments of ``KWARGS``.

    Every built-in balancer supports any M >= 2, so a refusal of M > 2 fails the suite.
    """
    kwargs = {**KWARGS.get(name, lambda _: {})(model), **extra}
    return em.create_balancer(name, model, **kwargs)


def epoch_data(num: int) -> EpochData:
    train = [make_toy_batch(num, 16, seed=11), make_toy_batch(num, 16, seed=12)]
    heldout = [make_toy_batch(num, 12, seed=13)]
    return EpochData(train=lambda: iter(train), heldout=lambda: iter(heldout), device=torch.device("cpu"))


def loss_kwargs(balancer: Balancer, batch: dict[str, Tensor]) -> dict[str, Any]:
    """Always pass the inputs, as the reference trainer does: every ``loss`` must accept ``batch=``."""
    return {"batch": batch}


def own_params(balancer: Balancer) -> list[nn.Parameter]:
    """Parameters a balancer trains besides the model's (e.g. MLA's shared head)."""
    return list(balancer.parameters())


def snapshot(model: nn.Module, balancer: Balancer) -> Params:
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"balancer.{i}": p.detach().clone() for i, p in enumerate(own_params(balancer))})
    return out


def one_step(
    balancer: Balancer, model: nn.Module, num: int, *, epoch: int = 0, seed: int = 1, prepare: bool = True
) -> tuple[Grads, Params]:
    """One optimizer step (SGD, lr 0.1): gradients as handed to the optimizer, parameters after it."""
    batch, y = make_toy_batch(num, 16, seed=seed)
    balancer.set_epoch(epoch)
    if prepare and balancer.needs_epoch_data:
        balancer.prepare_epoch(epoch_data(num))
    opt = torch.optim.SGD([*model.parameters(), *own_params(balancer)], lr=0.1)
    opt.zero_grad()
    grads: Grads = {}
    if balancer.owns_step:
        balancer.train_step(batch, y, opt)
    else:
        balancer.loss(model(batch), y, **loss_kwargs(balancer, batch)).backward()
        balancer.before_step()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return grads, snapshot(model, balancer)


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor], exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.fixture(params=em.list_balancers())
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_finite_after_one_step(name: str, num_modalities: int) -> None:
    model = make_toy_model(num_modalities)
    balancer = build(name, model)
    before = snapshot(model, balancer)
    grads, params = one_step(balancer, model, num_modalities)
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    assert all(bool(torch.isfinite(p).all()) for p in params.values())
    assert any(not torch.equal(before[n], params[n]) for n in params), "the step changed no parameter"
    stats = balancer.stats()
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in stats.items())


def test_film_fusion_finite(name: str) -> None:
    """Auxiliary-head fusions work, or are refused at construction with a message naming the fusion."""
    model = make_toy_model(2, fusion="film")
    if name in REFUSE_AUX_FUSION:
        with pytest.raises(ValueError, match="(?i)fusion"):
            build(name, model)
        return
    balancer = build(name, model)
    grads, params = one_step(balancer, model, 2)
    assert all(bool(torch.isfinite(t).all()) for t in [*grads.values(), *params.values()])


def test_noop_outside_epoch_window(name: str, num_modalities: int) -> None:
    model = make_toy_model(num_modalities)
    twin = copy.deepcopy(model)
    late = build(name, model, start_epoch=3)
    assert not late.active or late.epoch < 3
    grads, params = one_step(late, model, num_modalities, epoch=1)
    ref_grads, ref_params = one_step(em.create_balancer("none", twin), twin, num_modalities, epoch=1)
    if grads:
        assert_same(grads, ref_grads)
    assert_same({k: v for k, v in params.items() if not k.startswith("balancer.")}, ref_params)


def test_state_round_trip(name: str, num_modalities: int) -> None:
    model = make_toy_model(num_modalities)
    first = build(name, model, seed=5)
    one_step(first, model, num_modalities, seed=1)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    twin = copy.deepcopy(model)
    fresh = build(name, twin, seed=5)
    fresh.load_state_dict(state)
    assert fresh.epoch == first.epoch and fresh.num_steps == first.num_steps
    grads, params = one_step(first, model, num_modalities, seed=2, prepare=False)
    grads2, params2 = one_step(fresh, twin, num_modalities, seed=2, prepare=False)
    assert_same(grads, grads2)
    assert_same(params, params2)


def test_deterministic_with_seed(name: str, num_modalities: int) -> None:
    model = make_toy_model(num_modalities)
    twin = copy.deepcopy(model)
    grads, params = one_step(build(name, model, seed=7), model, num_modalities)
    grads2, params2 = one_step(build(name, twin, seed=7), twin, num_modalities)
    assert_same(grads, grads2, exact=True)
    assert_same(params, params2, exact=True)


@pytest.mark.parametrize(
    "name", [n for n in em.list_balancers() if not em.balancers.get_balancer_class(n).owns_step]
)
def test_tolerates_overflow_step(name: str, num_modalities: int) -> None:
    """(Balancers that own the step run no GradScaler path and are not driven through before_step.)"""
    model = make_toy_model(num_modalities)
    balancer = build(name, model)
    batch, y = make_toy_batch(num_modalities, 16, seed=1)
    if balancer.needs_epoch_data:
        balancer.prepare_epoch(epoch_data(num_modalities))
    balancer.loss(model(batch), y, **loss_kwargs(balancer, batch)).backward()
    first = next(model.encoders[modality_names(model)[0]].parameters())
    first.grad.fill_(float("inf"))
    balancer.before_step()  # must not raise: GradScaler will skip this step
    model.zero_grad()
    grads, _ = one_step(balancer, model, num_modalities, seed=2, prepare=False)
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
