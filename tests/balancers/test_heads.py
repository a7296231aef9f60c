"""Balancers that train heads of their own: the sizes they need from a user's model, and the check that
the optimizer holds the heads (found at the second optimizer step, without false alarms)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import make_toy_batch, make_toy_model

import equimodal as em
from equimodal.testing import start_epoch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_loop.py"
SIZES = {"feature_dims": {"audio": 32, "image": 16}, "num_classes": 10}
# balancer -> (options it is built with, the options that give it the sizes, the size option's name)
OWN_HEADS = {
    "mmpareto": ({}, SIZES, "feature_dims="),
    "gblending": ({}, SIZES, "feature_dims="),
    "multitask": ({}, SIZES, "feature_dims="),
    "amss": ({"head_weight": 1.0}, SIZES, "feature_dims="),
    "mla": ({}, {"feature_dim": 32, "num_classes": 10}, "feature_dim="),
}


def _example():
    spec = importlib.util.spec_from_file_location("own_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(OWN_HEADS))
def test_sizes_on_a_model_written_without_equimodal(name: str) -> None:
    """The error names the balancer, the attribute it read and the option; the option then works."""
    example = _example()
    base, sizes, option = OWN_HEADS[name]
    with pytest.raises(ValueError) as err:
        em.create_balancer(name, example.TwoTowerNet(declare_sizes=False), **base)
    text = str(err.value)
    assert f"Balancer {name!r}" in text and "model.encoders['audio'].out_dim" in text and option in text
    no_classes = example.TwoTowerNet(declare_sizes=False)
    no_classes.encoders["audio"].out_dim, no_classes.encoders["image"].out_dim = 32, 16
    with pytest.raises(ValueError, match=rf"Balancer '{name}'.*model\.num_classes.*num_classes=<int>"):
        em.create_balancer(name, no_classes, **base)
    losses = example.main(name, steps=45, declare_sizes=False, **base, **sizes)
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8


def test_the_two_size_options_say_how_they_differ() -> None:
    example = _example()
    with pytest.raises(ValueError, match="one size per modality; mla's feature_dim is another option"):
        em.create_balancer("multitask", example.TwoTowerNet(declare_sizes=False), num_classes=10)
    with pytest.raises(ValueError, match="one int: the shared head's width.*take feature_dims"):
        em.create_balancer("mla", example.TwoTowerNet(declare_sizes=False), num_classes=10)


def test_mla_refuses_features_wider_than_its_head() -> None:
    """A feature wider than ``feature_dim`` used to be cut silently by a negative pad."""
    example = _example()
    model = example.TwoTowerNet(declare_sizes=False)
    bal = em.create_balancer("mla", model, feature_dim=20, num_classes=10)  # audio features are 32 wide
    bal.set_epoch(0)
    batch = example.synthetic_loader(1)[0]
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    with pytest.raises(ValueError, match=r"size 20 or less.*out\.features\['audio'\] of shape \(32, 32\)"):
        bal.train_step(batch, batch["label"], opt)


# ------------------------------------------------------------------------------ heads left out of the optimizer
def _loop(name: str, optimizers: list[torch.optim.Optimizer], bal: em.Balancer, model, steps: int, lrs=None):
    """A two-call loop; returns the number of before_step calls made. ``lrs[i]`` sets every group's lr."""
    batch, y = make_toy_batch(2)
    for i in range(steps):
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = 0.1 if lrs is None or i >= len(lrs) else lrs[i]
        bal.loss(model(batch), y).backward()
        bal.before_step()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    return steps


def _build(name: str):
    model = make_toy_model(2)
    bal = em.create_balancer(name, model, **OWN_HEADS[name][0])
    start_epoch(bal, 0)
    return model, bal


TWO_CALL = ["mmpareto", "gblending", "multitask", "amss"]


@pytest.mark.parametrize("name", TWO_CALL)
def test_heads_left_out_are_found_at_the_second_step(name: str) -> None:
    model, bal = _build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # balancer.parameters() forgotten
    _loop(name, [opt], bal, model, 1)  # the first step cannot know
    with pytest.raises(em.DriverError, match=r"\[\*model.parameters\(\), \*balancer.parameters\(\)\]"):
        _loop(name, [opt], bal, model, 1)


@pytest.mark.parametrize("name", TWO_CALL)
def test_no_false_alarm_for_a_second_optimizer_or_frozen_heads(name: str) -> None:
    model, bal = _build(name)
    heads = list(bal.parameters())
    before = [p.detach().clone() for p in heads]
    second = [torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(heads, lr=1e-3)]
    _loop(name, second, bal, model, 6)
    assert all(not torch.equal(a, p) for a, p in zip(before, heads, strict=True))  # the heads trained
    model, bal = _build(name)
    for p in bal.parameters():
        p.requires_grad_(False)  # frozen on purpose, not in the optimizer
    _loop(name, [torch.optim.SGD(model.parameters(), lr=0.1)], bal, model, 6)


def test_a_learning_rate_warm_up_from_zero_is_no_false_alarm() -> None:
    """lr 0 for every group: nothing moves, so nothing can be told yet; heads left out are found once the
    model moves, within twice the warm-up."""
    model, bal = _build("multitask")
    _loop("multitask", [torch.optim.SGD([*model.parameters(), *bal.parameters()])], bal, model, 12, [0.0] * 5)
    model, bal = _build("multitask")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _loop("multitask", [opt], bal, model, 6, [0.0] * 5)  # during the warm-up: no verdict
    with pytest.raises(em.DriverError):
        _loop("multitask", [opt], bal, model, 8)


def test_the_check_reads_the_device_once_then_never(monkeypatch: pytest.MonkeyPatch) -> None:
    from equimodal.balancers import step_check

    reads: list[list[bool]] = []
    real = step_check.read_flags
    monkeypatch.setattr(step_check, "read_flags", lambda flags: reads.append(real(flags)) or reads[-1])
    model, bal = _build("mmpareto")
    _loop("mmpareto", [torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)], bal, model, 20)
    assert len(reads) == 1 and reads[0][1]  # one read, at the second step: the heads moved
    reads.clear()
    model, bal = _build("mmpareto")
    opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=0.1)
    _loop("mmpareto", [opt], bal, model, 40, [0.0] * 30)  # a long warm-up: reads at steps 2, 4, 8, 16, 32
    assert len(reads) == 5 and reads[-1][1]
