"""PMR: the defaults are those of the authors' runs, not their argparse defaults."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import make_toy_batch, make_toy_model

import equimodal as em
from equimodal.balancers import EpochData
from equimodal.balancers.pmr import PMR


def epoch_data() -> EpochData:
    train = [make_toy_batch(2, 16, seed=21), make_toy_batch(2, 16, seed=22)]
    return EpochData(train=lambda: iter(train), heldout=None, device=torch.device("cpu"))


def test_defaults_are_the_authors_runs() -> None:
    params = inspect.signature(PMR.__init__).parameters
    assert params["alpha"].default == 2.0  # CREMA-D concat runs in the authors' bash.sh
    assert params["momentum"].default == 0.0  # nearly every run in bash.sh; 0.2 is only argparse's
    balancer = em.create_balancer("pmr", make_toy_model(2))
    assert (balancer.alpha, balancer.momentum, balancer.last_epoch) == (2.0, 0.0, 70)


def test_default_prototypes_are_this_epochs_class_means() -> None:
    model = make_toy_model(2)
    data = epoch_data()
    balancer = em.create_balancer("pmr", model)
    balancer.set_epoch(0)
    balancer.prepare_epoch(data)
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.mul_(1.5)
    balancer.set_epoch(1)
    balancer.prepare_epoch(data)
    with torch.no_grad():
        pairs = [(model(b).features, y) for b, y in data.train()]
    for m in ("m0", "m1"):
        feats = torch.cat([f[m] for f, _ in pairs])
        ys = torch.cat([y for _, y in pairs])
        means = torch.stack([feats[ys == c].mean(0) for c in range(3)])
        torch.testing.assert_close(balancer.prototypes[m], means)  # no EMA with the old prototypes


def test_pmr_refuses_the_sum_reference() -> None:
    with pytest.raises(ValueError, match="reference"):
        em.create_balancer("pmr", make_toy_model(3), reference="sum")
