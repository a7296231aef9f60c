"""The Lightning callback drives every registered balancer through Lightning's own loop.

Each balancer trained by Lightning (two epochs, gradient accumulation over 2 micro-batches where the
balancer allows it) must end with exactly the parameters that :func:`equimodal.testing.drive_step`
gives on the same data; what the callback cannot drive it refuses with a message naming the fix.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_toy_batch, make_toy_model, umt_teachers

import equimodal as em
from equimodal.balancers.base import split_batch
from equimodal.integrations.lightning import BalancerCallback
from equimodal.testing import assert_same, drive_step, optimizer_for, snapshot, toy_model_for

OPTIONS: dict[str, dict[str, Any]] = {"unimodal": {"modality": "m0"}}
LR = 0.1


class Module(L.LightningModule):
    def __init__(self, model: torch.nn.Module, balancer: em.Balancer, micro_batches: int = 1) -> None:
        super().__init__()
        self.model = model
        self.balancer = balancer
        self.micro_batches = micro_batches
        self.automatic_optimization = not balancer.requirements.own_step

    def training_step(self, batch: Any, _: int) -> Any:
        x, y = batch
        if not self.automatic_optimization:
            return self.balancer.train_step(x, y, self.optimizers(), micro_batches=self.micro_batches)
        return self.balancer.loss(self.model(x), y, batch=x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        own = self.balancer.parameters() if isinstance(self.balancer, em.Balancer) else []
        return torch.optim.SGD([*self.model.parameters(), *own], lr=LR)


def _trainer(epochs: int = 2, accumulate: int = 1, **callback: Any) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
        callbacks=[BalancerCallback(**callback)],
    )  # fmt: skip


def _data(steps: int = 3) -> tuple[list, list, list]:
    """Whole batches of 16, the same as micro-batches of 8, and a held-out batch."""
    whole = [make_toy_batch(2, 16, seed=i) for i in range(steps)]
    micro = [part for x, y in whole for part in split_batch(x, y, 2)]
    return whole, micro, [make_toy_batch(2, 12, seed=99)]


@pytest.mark.parametrize("name", em.list_balancers())
def test_lightning_equals_the_reference_driver(name: str) -> None:
    model = toy_model_for(name, 2)  # greedy needs its MMTM (mid-fusion) toy model
    twin = copy.deepcopy(model)
    options = {"teachers": umt_teachers(model)} if name == "umt" else OPTIONS.get(name, {})
    lit_bal = em.create_balancer(name, model, seed=1, **options)
    ref_bal = em.create_balancer(name, twin, seed=1, **options)
    whole, micro, held = _data()
    if lit_bal.requirements.epoch_plan:  # refused before any step, naming why
        loader = torch.utils.data.DataLoader(micro, batch_size=None)
        with pytest.raises(ValueError, match="batch count"):
            _trainer(heldout=held).fit(Module(model, lit_bal), train_dataloaders=loader)
        assert lit_bal.num_steps == 0
        return
    owned = lit_bal.requirements.own_step
    accumulate = 1 if owned else 2
    loader = torch.utils.data.DataLoader(whole if owned else micro, batch_size=None)
    _trainer(accumulate=accumulate, heldout=held).fit(Module(model, lit_bal), train_dataloaders=loader)

    opt = optimizer_for(twin, ref_bal, LR)
    train = whole if owned else micro
    data = em.EpochData(train=lambda: iter(train), heldout=lambda: iter(held), device=torch.device("cpu"))
    for epoch in range(2):
        ref_bal.start_epoch(epoch, data)
        for x, y in whole:
            drive_step(ref_bal, twin, x, y, opt, micro_batches=accumulate)
    assert lit_bal.num_steps == ref_bal.num_steps == 6
    assert_same(snapshot(model, lit_bal), snapshot(twin, ref_bal), what=f"{name} under Lightning")


def test_an_owned_step_accumulates_through_train_step_micro_batches() -> None:
    """mla under Lightning (manual optimisation) with train_step(..., micro_batches=2) equals the reference
    driver with 2 micro-batches; 16-bit AMP is refused for it, naming the precisions that work."""
    model = make_toy_model(2)
    twin = copy.deepcopy(model)
    lit_bal, ref_bal = em.create_balancer("mla", model, seed=1), em.create_balancer("mla", twin, seed=1)
    whole, _, _ = _data()
    loader = torch.utils.data.DataLoader(whole, batch_size=None)
    _trainer().fit(Module(model, lit_bal, micro_batches=2), train_dataloaders=loader)
    opt = optimizer_for(twin, ref_bal, LR)
    for epoch in range(2):
        ref_bal.start_epoch(epoch)
        for x, y in whole:
            drive_step(ref_bal, twin, x, y, opt, micro_batches=2)
    assert_same(snapshot(model, lit_bal), snapshot(twin, ref_bal), what="mla with micro_batches=2")
    half = types.SimpleNamespace(precision="16-mixed")  # Lightning turns 16-mixed into bf16 on a CPU
    with pytest.raises(ValueError, match=r"precision='bf16-mixed' or '32-true'"):
        BalancerCallback().on_fit_start(half, Module(model, lit_bal))


def test_before_step_runs_once_per_optimizer_step_and_logs() -> None:
    model = make_toy_model(2)
    module = Module(model, em.create_balancer("amss", model))
    calls = []
    original = module.balancer.before_step
    module.balancer.before_step = lambda: (calls.append(1), original())[1]
    _, micro, _ = _data(3)
    trainer = _trainer(2, accumulate=2)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(micro, batch_size=None))
    assert len(calls) == 6 and module.balancer.epoch == 1
    assert 0.0 < module.balancer.stats()["kept_fraction/m0"] < 1.0
    assert "balancer/kept_fraction/m0" in trainer.callback_metrics


def test_refuses_what_it_cannot_drive_and_says_how() -> None:
    whole, _, _ = _data(1)
    loader = torch.utils.data.DataLoader(whole, batch_size=None)
    model = make_toy_model(2)
    auto = Module(model, em.create_balancer("mla", model))
    auto.automatic_optimization = True
    with pytest.raises(ValueError, match=r"automatic_optimization = False.*train_step"):
        _trainer(1).fit(auto, train_dataloaders=loader)
    with pytest.raises(Exception, match="accumulation is not supported for manual optimization"):
        _trainer(1, accumulate=2).fit(
            Module(model, em.create_balancer("mla", model)), train_dataloaders=loader
        )
    blend = Module(model, em.create_balancer("gblending", model))
    with pytest.raises(ValueError, match=r"BalancerCallback\(heldout=loader\)"):
        _trainer(1).fit(blend, train_dataloaders=loader)
    plain = Module(model, em.create_balancer("none", model))
    plain.balancer = None
    with pytest.raises(TypeError, match="expected `Module.balancer` to be an equimodal Balancer"):
        _trainer(1).fit(plain, train_dataloaders=loader)


def test_checkpoint_round_trips_the_balancer_state_as_plain_data(tmp_path) -> None:
    model = make_toy_model(2)
    module = Module(model, em.create_balancer("agm", model))
    whole, _, _ = _data(2)
    trainer = _trainer(1)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(whole, batch_size=None))
    state = module.balancer.state_dict
    module.balancer.state_dict = lambda: {**state(), "count": np.int64(state()["count"])}  # a numpy number
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    fresh = Module(copy.deepcopy(model), em.create_balancer("agm", model))
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)  # Lightning's default for local files
    BalancerCallback().on_load_checkpoint(trainer, fresh, ckpt)
    assert fresh.balancer.count == module.balancer.count == 2
    assert torch.equal(fresh.balancer.running, module.balancer.running)
