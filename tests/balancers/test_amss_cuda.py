"""AMSS on a CUDA device: device-following state, exact counts, no host sync.

Marked ``cuda`` and kept out of the default (CPU) run; run with ``pytest -m cuda`` on a GPU machine.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_toy_batch, make_toy_model
from torch import nn

import equimodal as em
from equimodal.amss.masker import GradientMasker
from equimodal.balancers.amss import AMSS

pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")


def cuda_step(balancer: AMSS, model: nn.Module, num: int, seed: int) -> None:
    batch, y = make_toy_batch(num, 16, seed=seed)
    batch, y = {m: x.to(DEV) for m, x in batch.items()}, y.to(DEV)
    model.zero_grad()
    balancer.loss(model(batch), y).backward()
    balancer.before_step()


@pytest.mark.parametrize("name", ["amss", "amss_plus", "uniform_mask"])
def test_trains_on_cuda_with_a_cuda_generator(name: str) -> None:
    model = make_toy_model(3).to(DEV)
    balancer = em.create_balancer(name, model, seed=1)
    for s in range(4):
        cuda_step(balancer, model, 3, s)
    assert balancer._gen is not None and balancer._gen.device.type == "cuda"
    stats = balancer.stats()
    assert balancer.counters()["active_steps"] == 4 and all(math.isfinite(v) for v in stats.values())


def test_before_step_does_not_synchronise() -> None:
    model = make_toy_model(2).to(DEV)
    balancer = em.create_balancer("amss_plus", model, seed=1)
    cuda_step(balancer, model, 2, 0)  # builds the index layout and the generator
    batch, y = make_toy_batch(2, 16, seed=1)
    batch, y = {m: x.to(DEV) for m, x in batch.items()}, y.to(DEV)
    model.zero_grad()
    balancer.loss(model(batch), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        balancer.before_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert balancer.counters()["active_steps"] == 2


def test_exact_counts_on_cuda() -> None:
    model = make_toy_model(2, num_classes=5).to(DEV)
    balancer = em.create_balancer("amss", model)
    units = balancer.units
    for us in units.values():
        for u in us:
            u.param.grad = torch.rand_like(u.param) + 0.1
    masker = GradientMasker(units, reweight="inverse_inclusion")
    ratios = torch.tensor([0.3, 0.7], device=DEV)
    masker.apply(ratios, torch.Generator(device=DEV).manual_seed(0))
    for k, m in zip(ratios.tolist(), ("m0", "m1"), strict=True):
        for u in units[m]:
            kept = (u.sq_norms(u.param.grad) > 0).view(u.groups, u.units).sum(1)
            expected = max(1, math.ceil(k * u.units * (1 - 1e-6)))
            assert kept.tolist() == [expected] * u.groups


def test_same_seed_and_state_round_trip_on_cuda() -> None:
    model = make_toy_model(2).to(DEV)
    twin = copy.deepcopy(model)
    a = em.create_balancer("amss_plus", model, seed=4, k_min=0.5, k_max=0.5)
    cuda_step(a, model, 2, 0)
    b = em.create_balancer("amss_plus", twin, seed=99, k_min=0.5, k_max=0.5)
    b.load_state_dict(a.state_dict())
    cuda_step(a, model, 2, 1)
    cuda_step(b, twin, 2, 1)
    for ua, ub in zip(a.masker.tensors, b.masker.tensors, strict=True):
        assert torch.equal(ua.param.grad, ub.param.grad)
